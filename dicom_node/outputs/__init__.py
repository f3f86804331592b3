"""DICOM objects the node sends back: a SEG with the masks and a TID 1500 SR with the figures."""
from __future__ import annotations

import contextlib
import re
import socket
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import __version__

MANUFACTURER = "cxr-node"
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
OPACITY = codes.DCM.Opacity  # DCM 112001
# No standard code exists for "opacity area as a percentage of lung area": a private scheme, as
# DICOM PS3.16 allows (designators starting with 99 are private).
OPACITY_PERCENT = Code("CXRN-1", "99CXRNODE", "Opacity percentage of lung area")
# Nor for the Brixia score (Borghesi & Maroldi 2020) of a lung zone (0-3) or of both lungs (0-18).
BRIXIA_ZONE_SCORE = Code("CXRN-2", "99CXRNODE", "Brixia zone score")
BRIXIA_GLOBAL_SCORE = Code("CXRN-3", "99CXRNODE", "Brixia global score")
SCORE_UNIT = Code("{score}", "UCUM", "score")
PIXELS = Code("{pixels}", "UCUM", "pixels")


@dataclass(frozen=True)
class Algorithm:
    """Who made the result: the model (name, version with weight hashes) and this node."""
    name: str
    version: str
    node_version: str = __version__

    @property
    def identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(name=self.name, family=codes.cid7162.ArtificialIntelligence,
                                                  version=self.version[:64])

    def contributing_equipment(self, started: datetime) -> hd.ContributingEquipment:
        """IHE AI Results: the algorithm as processing equipment, with when it ran."""
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name[:64], software_versions=[self.version[:64], self.node_version],
            station_name=socket.gethostname()[:16], contribution_datetime=started,
            contribution_description="Lung and opacity segmentation (AI), not verified by a physician")


# (pydicom's generate_uid(prefix=None, entropy_srcs=...) ignores the sources and returns a random UID.)
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "cxr-node derived UIDs")


def derived_uid(*parts: str) -> str:
    """A UID that is the same every time for the same inputs: `2.25.` and the integer of the UUID5
    of the parts (PS3.5 B.2). Reprocessing an image after a crash yields the same SOP Instance UIDs,
    so a PACS never stores a result twice, and SEG and SR derive the same tracking UIDs."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(parts)).int}"


def pixel_spacing_mm(source: pydicom.Dataset) -> tuple[float, float] | None:
    """Row and column spacing in mm at the detector (ImagerPixelSpacing) or in the patient
    (PixelSpacing); None when neither is known."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return None


TYPE2_HEADER = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
AGE = re.compile(r"^\d{3}[DWMY]$")


@contextlib.contextmanager
def no_patient_data_in_warnings():
    """highdicom warns about odd person names by printing the name: keep that out of the logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="highdicom")
        yield


def prepare_source(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source header as the output builders need it: Type 2 attributes present (empty when the
    sender left them out) and values that would make the outputs invalid (a malformed Patient's
    Age) left out. The source pixels are not copied."""
    header = pydicom.Dataset()
    header.update({element.tag: element for element in source if element.tag != 0x7FE00010})
    header.file_meta = getattr(source, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in TYPE2_HEADER:
        if keyword not in header:
            setattr(header, keyword, "")
    if "PatientAge" in header and not AGE.match(str(header.PatientAge)):
        del header.PatientAge
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):  # 0\0 is seen in the wild
        if keyword in header and not (header[keyword].VM == 2 and all(float(v) > 0 for v in header[keyword].value)):
            del header[keyword]
    return header
