"""cxr-node: a DICOM node that segments lungs and COVID-19 opacity on frontal chest radiographs."""
__version__ = "0.4.0"
