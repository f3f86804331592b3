"""Optional Secondary Capture for PACS viewers that cannot show SEG: the radiograph with the lung and
opacity outlines and the opacity percentage burned in, marked as derived and not for primary diagnosis."""
from __future__ import annotations

from datetime import datetime

import cv2
import highdicom as hd
import numpy as np
import pydicom

from dicom_node.outputs import MANUFACTURER, Algorithm, derived_uid
from model.image import normalize_gray
from model.infer import LEFT, RIGHT, ZONES, Segmentation

OUTLINES = ((RIGHT, (0, 200, 0)), (LEFT, (0, 160, 255)))  # RGB, the SEG's segment colours
OPACITY_RGB = (255, 60, 0)
NOTICE = "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"


def burn_in(gray: np.ndarray, seg: Segmentation) -> np.ndarray:
    """RGB picture: the image, the outlines of both lungs and of the opacity, and the figures."""
    picture = cv2.cvtColor(normalize_gray(gray), cv2.COLOR_GRAY2RGB)
    thickness = max(2, round(max(gray.shape) / 400))
    masks = [(seg.lungs == label, colour) for label, colour in OUTLINES] + [(seg.opacity, OPACITY_RGB)]
    for mask, colour in masks:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(picture, contours, -1, colour, thickness)
    scale = max(gray.shape) / 1400
    lines = [f"Opacity {seg.opacity_pct:.1f}% of lung area (R {seg.right_opacity_pct:.1f}%, L {seg.left_opacity_pct:.1f}%)"]
    if seg.brixia:
        lines.append(f"Brixia {seg.brixia_global}/18 (A-F: {' '.join(str(seg.brixia[z]) for z in ZONES)})")
    lines.append(NOTICE)
    for index, text in enumerate(lines):
        origin = (round(20 * scale), round((40 + 36 * index) * scale))
        cv2.putText(picture, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (0, 0, 0), 4 * thickness, cv2.LINE_AA)
        cv2.putText(picture, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (255, 255, 0), thickness, cv2.LINE_AA)
    return picture


def build_capture(source: pydicom.Dataset, gray: np.ndarray, seg: Segmentation, algorithm: Algorithm,
                  started: datetime) -> hd.sc.SCImage:
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=burn_in(gray, seg), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=derived_uid(source.SeriesInstanceUID, "SC", algorithm.version),
        series_number=9903, sop_instance_uid=derived_uid(source.SOPInstanceUID, "SC", algorithm.version),
        instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # highdicom insists on one; replaced by the source's below
        contributing_equipment=[algorithm.contributing_equipment(started)])
    capture.PatientOrientation = source.get("PatientOrientation", "")  # Type 2C: copied, else empty
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.BurnedInAnnotation = "YES"
    capture.SeriesDescription = "AI outlines (cxr-node) - not for primary diagnosis"
    capture.Laterality = source.get("Laterality", "")  # Type 2C; a chest is not a paired part
    capture.DerivationDescription = f"{NOTICE}: outlines and figures by {algorithm.name} {algorithm.version}"[:1024]
    source_image = pydicom.Dataset()
    source_image.ReferencedSOPClassUID, source_image.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    capture.SourceImageSequence = [source_image]
    capture.ContentDate, capture.ContentTime = started.strftime("%Y%m%d"), started.strftime("%H%M%S.%f")
    return capture
