"""DICOM Segmentation (BINARY): right lung, left lung, opacity, on the source image's pixel grid."""
from __future__ import annotations

from datetime import datetime

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from dicom_node.outputs import (LEFT_LUNG, MANUFACTURER, OPACITY, RIGHT_LUNG, Algorithm, derived_uid,
                                pixel_spacing_mm)
from model.infer import LEFT, RIGHT, Segmentation

SEGMENTS = (  # number, label a radiologist reads in the viewer, category, type, display colour (CIELab)
    (1, "Right lung", codes.SCT.AnatomicalStructure, RIGHT_LUNG, (70.0, -60.0, 50.0)),
    (2, "Left lung", codes.SCT.AnatomicalStructure, LEFT_LUNG, (60.0, -10.0, -55.0)),
    (3, "Opacity (AI)", codes.SCT.MorphologicallyAbnormalStructure, OPACITY, (55.0, 75.0, 60.0)),
)


def segment_tracking_uid(source_uid: str, segment_number: int, algorithm: Algorithm) -> str:
    """Shared by the SEG segment and the SR measurement group that describes it."""
    return derived_uid(source_uid, f"segment-{segment_number}", algorithm.version)


def build_segmentation(source: pydicom.Dataset, seg: Segmentation, algorithm: Algorithm,
                       started: datetime) -> hd.seg.Segmentation:
    masks = np.stack([seg.lungs == RIGHT, seg.lungs == LEFT, seg.opacity], axis=-1)[None].astype(np.uint8)
    identification = algorithm.identification
    descriptions = []
    for number, label, category, kind, colour in SEGMENTS:
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_uid=segment_tracking_uid(source.SOPInstanceUID, number, algorithm), tracking_id=label,
            anatomic_regions=[codes.SCT.Lung] if kind == OPACITY else None,
            display_color=hd.color.CIELabColor(*colour)))
    result = hd.seg.Segmentation(
        source_images=[source], pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(source.SeriesInstanceUID, "SEG", algorithm.version),
        series_number=9901, sop_instance_uid=derived_uid(source.SOPInstanceUID, "SEG", algorithm.version),
        instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name[:64], software_versions=[algorithm.version[:64], algorithm.node_version],
        device_serial_number="0", content_label="LUNG_OPACITY", omit_empty_frames=False,
        content_description="AI lung and opacity segmentation - not for primary diagnosis",
        series_description="AI lung and opacity (cxr-node)",
        contributing_equipment=[algorithm.contributing_equipment(started)])
    result.PatientOrientation = source.get("PatientOrientation", "")  # Type 2C: copied, else empty
    if "FrameOfReferenceUID" not in source:
        # A projection radiograph has no patient space, so these shared groups are optional here, but
        # OHIF's SEG loader reads Pixel Measures and an in-plane orientation (identity: the SEG's rows
        # and columns are the source image's), and highdicom's reader needs PixelSpacing and
        # SliceThickness. The spacing is the source's (1 mm placeholder when unknown; the SR then
        # reports pixels).
        measures, orientation, shared = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
        measures.PixelSpacing = list(pixel_spacing_mm(source) or (1.0, 1.0))
        measures.SliceThickness = 1.0
        orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
        result.SharedFunctionalGroupsSequence = [shared]
    result.ContentDate, result.ContentTime = started.strftime("%Y%m%d"), started.strftime("%H%M%S.%f")
    return result
