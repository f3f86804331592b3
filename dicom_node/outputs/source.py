"""The source radiograph as the result builders need it: its header made safe to copy, read as a
projection image (no patient space), and the pixel calibration that decides whether areas are known."""
from __future__ import annotations

import re
from dataclasses import dataclass

import pydicom

TYPE2_HEADER = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
AGE = re.compile(r"^\d{3}[DWMY]$")
# A CR/DX radiograph is a projection: its rows and columns are not a plane in patient space, so the
# results carry no Frame of Reference and no patient geometry, whatever part of one the source has.
# (A partial geometry, e.g. a Frame of Reference without SliceThickness, made an invalid SEG.)
PATIENT_GEOMETRY = ("FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
                    "ImageOrientationPatient", "SliceThickness", "SpacingBetweenSlices", "SliceLocation")
SPACINGS = ("PixelSpacing", "ImagerPixelSpacing")


def _valid_spacing(value) -> bool:
    try:
        return value is not None and len(value) == 2 and all(float(v) > 0 for v in value)
    except (TypeError, ValueError):
        return False


def prepare_source(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source header as the output builders need it: Type 2 attributes present (empty when the
    sender left them out), values that would make the outputs invalid (a malformed Patient's Age, a
    0\\0 spacing) and the patient geometry left out. The source pixels are not copied."""
    header = pydicom.Dataset()
    header.update({element.tag: element for element in source
                   if element.tag != 0x7FE00010 and element.keyword not in PATIENT_GEOMETRY})
    header.file_meta = getattr(source, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in TYPE2_HEADER:
        if keyword not in header:
            setattr(header, keyword, "")
    if "PatientAge" in header and not AGE.match(str(header.PatientAge)):
        del header.PatientAge
    for keyword in SPACINGS:  # 0\0 is seen in the wild
        if keyword in header and not _valid_spacing(header[keyword].value):
            del header[keyword]
    return header


@dataclass(frozen=True)
class Calibration:
    """Size of a pixel in the patient (mm) and where that figure came from, as the SR states it."""
    row_mm: float
    column_mm: float
    basis: str

    @property
    def pixel_area_mm2(self) -> float:
        return self.row_mm * self.column_mm


def calibration(source: pydicom.Dataset) -> Calibration | None:
    """The pixel size in the patient plane, or None when it is not known. PixelSpacing is the
    modality's calibrated patient-plane spacing; ImagerPixelSpacing is measured at the detector,
    magnified by the beam's divergence (10-20 % for a chest), so it counts only divided by the
    EstimatedRadiographicMagnificationFactor. Without either: no areas, only percentages."""
    if _valid_spacing(source.get("PixelSpacing")):
        row, column = map(float, source.PixelSpacing)
        kind = source.get("PixelSpacingCalibrationType")
        return Calibration(row, column, "PixelSpacing" + (f" ({kind})" if kind else ""))
    factor = source.get("EstimatedRadiographicMagnificationFactor")
    if _valid_spacing(source.get("ImagerPixelSpacing")) and factor and float(factor) > 0:
        row, column = (float(v) / float(factor) for v in source.ImagerPixelSpacing)
        return Calibration(row, column, f"ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor {float(factor):g}")
    return None
