"""Optional Secondary Capture for PACS viewers that cannot show SEG: the radiograph with the lung and
opacity outlines and the opacity percentage burned in, marked as derived and not for primary diagnosis."""
from __future__ import annotations

from datetime import datetime

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless

from dicom_node.history import Change
from dicom_node.kinds import Kind
from dicom_node.outputs import summary
from dicom_node.outputs.identity import Algorithm, finish_header, result_identity
from dicom_node.outputs.segments import SEGMENTS
from model.image import normalize_gray
from model.infer import ZONES, Segmentation

NOTICE = "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"
LOSSY_DETAILS = ("LossyImageCompressionRatio", "LossyImageCompressionMethod")
LOSSY_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless}


def burn_in(gray: np.ndarray, seg: Segmentation, change: Change | None = None) -> np.ndarray:
    """RGB picture: the image, the outline of every segment in its SEG colour, and the figures (with the
    change since the prior film, if there is one)."""
    picture = cv2.cvtColor(normalize_gray(gray), cv2.COLOR_GRAY2RGB)
    thickness = max(2, round(max(gray.shape) / 400))
    for segment in SEGMENTS:
        contours, _ = cv2.findContours(segment.mask(seg).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(picture, contours, -1, segment.rgb, thickness)
    scale = max(gray.shape) / 1400
    lines = [summary.opacity_sentence(seg)]
    if seg.brixia:
        lines.append(f"Brixia {seg.brixia_global}/18 (A-F: {' '.join(str(seg.brixia[z]) for z in ZONES)})")
    if change:
        lines.append(change.sentence())
    lines.append(NOTICE)
    for index, text in enumerate(lines):
        origin = (round(20 * scale), round((40 + 36 * index) * scale))
        cv2.putText(picture, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (0, 0, 0), 4 * thickness, cv2.LINE_AA)
        cv2.putText(picture, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (255, 255, 0), thickness, cv2.LINE_AA)
    return picture


def build_capture(source: pydicom.Dataset, gray: np.ndarray, seg: Segmentation, algorithm: Algorithm,
                  started: datetime, change: Change | None = None) -> hd.sc.SCImage:
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=burn_in(gray, seg, change), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", **result_identity(source, Kind.SC, algorithm),
        patient_orientation=("L", "F"),  # highdicom insists on one; replaced by the source's below
        contributing_equipment=[algorithm.contributing_equipment(started)])
    capture.PatientOrientation = source.get("PatientOrientation", "")  # Type 2C: copied, else empty
    # Laterality (Type 2C) is for paired body parts; a validator can only tell that it is not needed
    # from Body Part Examined. The node has found a chest in the image (its filter), so the SC says so
    # where its source did not, and carries no laterality.
    capture.BodyPartExamined = source.get("BodyPartExamined") or "CHEST"
    if "Laterality" in capture:
        del capture.Laterality
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.ConversionType = "WSD"  # made on a workstation from another image
    capture.BurnedInAnnotation = "YES"
    # Once lossy, always lossy (PS3.3 C.7.6.1.1.5): the picture shows the source's pixels.
    lossy_transfer = source.file_meta.get("TransferSyntaxUID") in LOSSY_SYNTAXES
    if source.get("LossyImageCompression") == "01" or lossy_transfer:
        capture.LossyImageCompression = "01"
        for keyword in LOSSY_DETAILS:
            if keyword in source:
                capture[keyword] = source[keyword]
    capture.DerivationDescription = f"{NOTICE}: outlines and figures by {algorithm.name} {algorithm.version}"[:1024]
    source_image = pydicom.Dataset()
    source_image.ReferencedSOPClassUID, source_image.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    capture.SourceImageSequence = [source_image]
    finish_header(capture, source, Kind.SC, started)
    return capture
