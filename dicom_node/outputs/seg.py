"""DICOM Segmentation (BINARY): right lung, left lung, opacity, on the source image's pixel grid.

A projection radiograph has no patient space, so the SEG has no Frame of Reference, whatever geometry
the source carries; its rows and columns are the source's. The standard then leaves out Pixel Measures
and Plane Orientation (PS3.3 A.51), but OHIF (3.13) draws a SEG overlay only with both (measured:
tests/test_viewer.py fails without either). So when the source states a pixel spacing, the SEG repeats
it, verbatim, with an orientation read from the source's Patient Orientation; a source with no spacing
gets neither, and OHIF shows no overlay for it (docs/CONFORMANCE.md). Slice Thickness means nothing for
a projection, but highdicom reads Pixel Measures only with one: it is 1 mm, used by nothing (areas
come from the SR's stated calibration)."""
from __future__ import annotations

from datetime import datetime

import highdicom as hd
import numpy as np
import pydicom

from dicom_node.kinds import Kind
from dicom_node.outputs.codes import LATERALITY, LUNG
from dicom_node.outputs.identity import Algorithm, derived_uid, finish_header, lo, result_identity
from dicom_node.outputs.segments import SEGMENTS
from dicom_node.outputs.source import SPACINGS

# Patient Orientation letters -> direction in the patient coordinate system (LPS: +x left, +y posterior,
# +z head).
DIRECTIONS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "H": (0, 0, 1), "F": (0, 0, -1)}


def orientation_of(patient_orientation) -> list[int]:
    """Image Orientation (row direction, column direction) that agrees with Patient Orientation, e.g.
    L\\F (a PA chest) -> 1\\0\\0\\0\\0\\-1; the identity when the source does not say."""
    letters = [str(value) for value in (patient_orientation or [])]
    if len(letters) == 2 and all(letter in DIRECTIONS for letter in letters):
        return [*DIRECTIONS[letters[0]], *DIRECTIONS[letters[1]]]
    return [1, 0, 0, 0, 1, 0]
from model.infer import Segmentation


def build_segmentation(source: pydicom.Dataset, seg: Segmentation, algorithm: Algorithm,
                       started: datetime) -> hd.seg.Segmentation:
    """`source` as `prepare_source` gives it (no patient geometry)."""
    masks = np.stack([segment.mask(seg) for segment in SEGMENTS], axis=-1)[None].astype(np.uint8)
    descriptions = []
    for segment in SEGMENTS:
        description = hd.seg.SegmentDescription(
            segment_number=segment.number, segment_label=segment.label, segmented_property_category=segment.category,
            segmented_property_type=segment.property_type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.identification,
            tracking_uid=segment.tracking_uid(source.SOPInstanceUID, algorithm), tracking_id=segment.label,
            anatomic_regions=None if segment.property_type == LUNG else [LUNG],
            display_color=hd.color.CIELabColor.from_rgb(*segment.rgb))
        laterality = segment.laterality(seg)
        if laterality:  # which lung(s): a laterality modifier (CID 244) inside the lung's or the opacity region's code item
            modifier = [hd.sr.CodedConcept.from_code(LATERALITY[laterality])]
            if segment.property_type == LUNG:
                description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = modifier
            else:
                description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = modifier
        description.SegmentDescription = lo(segment.description(seg))  # the figures, in any viewer's segment list
        descriptions.append(description)
    # Spacing and orientation are added below for the viewers, or not at all (see the module docstring).
    pixel_grid_only = pydicom.Dataset()
    pixel_grid_only.update({element.tag: element for element in source if element.keyword not in SPACINGS})
    pixel_grid_only.file_meta = source.file_meta
    result = hd.seg.Segmentation(
        source_images=[pixel_grid_only], pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, **result_identity(source, Kind.SEG, algorithm),
        manufacturer_model_name=lo(algorithm.name), software_versions=algorithm.software_versions,
        device_serial_number="0", content_label="LUNG_OPACITY", omit_empty_frames=False,
        content_description="AI lung and opacity segmentation - not for primary diagnosis",
        contributing_equipment=[algorithm.contributing_equipment(started)])
    result.PatientOrientation = source.get("PatientOrientation", "")  # Type 2C: copied, else empty
    spacing = next((source[keyword].value for keyword in SPACINGS if keyword in source), None)
    if spacing:
        measures, orientation, shared = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
        measures.PixelSpacing = list(spacing)
        measures.SliceThickness = 1  # for highdicom's reader only (see the module docstring)
        orientation.ImageOrientationPatient = orientation_of(source.get("PatientOrientation"))
        shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
        result.SharedFunctionalGroupsSequence = [shared]
    # Same source, same bytes: the dimension organisation is named after the SEG, not drawn at random.
    organisation_uid = derived_uid(result.SOPInstanceUID, "dimension-organization")
    result.DimensionOrganizationSequence[0].DimensionOrganizationUID = organisation_uid
    for index in result.DimensionIndexSequence:
        index.DimensionOrganizationUID = organisation_uid
    finish_header(result, source, Kind.SEG, started)
    return result
