"""Who made a result and what it is called: deterministic UIDs, the algorithm's identity, and the
header every result (SEG, SR, SC) shares with its source."""
from __future__ import annotations

import copy
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from dicom_node import __version__
from dicom_node.history import ChangeLimits
from dicom_node.kinds import RESULT_KINDS, Kind

MANUFACTURER = "cxr-node"
# Patient and study attributes a result carries exactly as its source has them (Patient, General
# Study and Patient Study modules), so a PACS files it with the right patient and order.
PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "ReferencedStudySequence",
)


def lo(text: str) -> str:
    """A value cut to the 64 characters of DICOM's LO (Long String) VR."""
    return text[:64]


# (pydicom's generate_uid(prefix=None, entropy_srcs=...) ignores the sources and returns a random UID.)
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "cxr-node derived UIDs")


def derived_uid(*parts: str) -> str:
    """A UID that is the same every time for the same inputs: `2.25.` and the integer of the UUID5
    of the parts (PS3.5 B.2). Reprocessing an image after a crash yields the same SOP Instance UIDs,
    so a PACS never stores a result twice, and SEG and SR derive the same tracking UIDs."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(parts)).int}"


@dataclass(frozen=True)
class Algorithm:
    """Who made the result: the model (name, version with weight hashes) and this node; `model_version`
    (the weights' own, e.g. 3.0.0) decides which earlier films are comparable, and `change_limits` how far
    a figure must move to be a change (None until the weights' repeatability is measured)."""
    name: str
    version: str
    model_version: str = ""
    change_limits: ChangeLimits | None = None
    node_version: str = __version__

    @property
    def identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(name=lo(self.name), family=codes.cid7162.ArtificialIntelligence,
                                                  version=lo(self.version))

    @property
    def software_versions(self) -> list[str]:
        return [lo(self.version), self.node_version]

    def contributing_equipment(self, started: datetime) -> hd.ContributingEquipment:
        """IHE AI Results: the algorithm as processing equipment, with when it ran."""
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=lo(self.name), software_versions=self.software_versions,
            station_name=socket.gethostname()[:16], contribution_datetime=started,
            contribution_description="Lung and opacity segmentation (AI), not verified by a physician")


def result_identity(source: pydicom.Dataset, kind: Kind, algorithm: Algorithm) -> dict:
    """Series and instance identity of the `kind` result of `source`, as highdicom's keyword arguments:
    UIDs derived from the source's UIDs, the kind and the algorithm version."""
    series_number = RESULT_KINDS[kind].series_number
    return {"series_instance_uid": derived_uid(source.SeriesInstanceUID, kind, algorithm.version),
            "series_number": series_number,
            "sop_instance_uid": derived_uid(source.SOPInstanceUID, kind, algorithm.version),
            "instance_number": int(source.get("InstanceNumber") or 1), "manufacturer": MANUFACTURER}


def finish_header(result: pydicom.Dataset, source: pydicom.Dataset, kind: Kind, started: datetime) -> None:
    """What every result shares: the source's patient and study attributes, the series description,
    and content and instance creation date/time = `started`, the time the node received the source:
    a re-run of the same source (after a crash, or `cxr-node retry`) writes the same bytes under the
    same SOP Instance UID."""
    for keyword in PATIENT_AND_STUDY:
        if keyword in source:
            result[keyword] = copy.deepcopy(source[keyword])
    if "SpecificCharacterSet" in source and "SpecificCharacterSet" not in result:
        result.SpecificCharacterSet = source.SpecificCharacterSet
    result.SeriesDescription = RESULT_KINDS[kind].series_description
    result.ContentDate, result.ContentTime = started.strftime("%Y%m%d"), started.strftime("%H%M%S.%f")
    result.InstanceCreationDate, result.InstanceCreationTime = result.ContentDate, result.ContentTime
    for equipment in result.get("ContributingEquipmentSequence", []):  # highdicom's own item says "now"
        equipment.ContributionDateTime = started.strftime("%Y%m%d%H%M%S.%f%z")
    if "TimeOfSecondaryCapture" in result:
        result.DateOfSecondaryCapture, result.TimeOfSecondaryCapture = result.ContentDate, result.ContentTime
