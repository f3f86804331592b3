"""Lung and opacity segmentation of frontal chest radiographs (Tang, Sun & Li 2020).

Nothing here knows about DICOM networking: the node calls `model.infer.Pipeline.segment`.
"""
