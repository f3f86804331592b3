"""Is this a frontal (AP/PA) chest radiograph? Tags first, then descriptions, then the image.

Every decision records how it was made (`decided_by`: tags, description or image), because a
missing ViewPosition is common (e.g. NHS NCCID exports) and ops must be able to see why an
image was or was not analysed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pydicom

from model.infer import LEFT, RIGHT, Segmentation

RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
MODALITIES = {"CR", "DX"}
BODY_PARTS = {"CHEST", "THORAX"}
FRONTAL_VIEWS = {"AP", "PA"}
DESCRIPTION_TAGS = ("ProtocolName", "AcquisitionDeviceProcessingDescription", "SeriesDescription",
                    "StudyDescription", "PerformedProcedureStepDescription")
LATERAL_WORDS = re.compile(r"\b(LAT|LATERAL|LL|RL|LLD|RLD|DECUB\w*|OBL\w*)\b")
FRONTAL_WORDS = re.compile(r"\b(PA|AP|FRONTAL|AP SUPINE)\b")


@dataclass(frozen=True)
class Decision:
    frontal_chest: bool | None  # None: the tags cannot tell, ask the image
    reason: str
    decided_by: str


def by_tags(ds: pydicom.Dataset) -> Decision:
    """Decide from the header alone, or defer to the image (frontal_chest None)."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        name = getattr(pydicom.uid.UID(sop_class), "name", sop_class) if sop_class else "missing"
        return Decision(False, f"SOP class {name} is not a radiograph", "tags")
    if "PixelData" not in ds:
        return Decision(False, "no pixel data", "tags")
    modality = str(ds.get("Modality", "")).upper()
    if modality and modality not in MODALITIES:
        return Decision(False, f"modality {modality} is not CR or DX", "tags")
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if body_part and body_part not in BODY_PARTS:
        return Decision(False, f"body part {body_part} is not the chest", "tags")
    view = str(ds.get("ViewPosition", "")).upper()
    if view:
        if view in FRONTAL_VIEWS:
            return Decision(True, f"ViewPosition {view}", "tags")
        return Decision(False, f"ViewPosition {view} is not frontal (AP/PA)", "tags")
    for keyword in DESCRIPTION_TAGS:
        text = str(ds.get(keyword, "")).upper()
        if LATERAL_WORDS.search(text):
            return Decision(False, f"{keyword} names a lateral or oblique view", "description")
    for keyword in DESCRIPTION_TAGS:
        if FRONTAL_WORDS.search(str(ds.get(keyword, "")).upper()):
            return Decision(True, f"{keyword} names a frontal view", "description")
    return Decision(None, "no view in the header", "image")


def by_image(seg: Segmentation) -> Decision:
    """A frontal chest shows two lungs side by side, of similar height and plausible size, found
    with high confidence. Thresholds sit well outside the range seen on the training images."""
    area = seg.lungs.size
    right, left = seg.lungs == RIGHT, seg.lungs == LEFT
    if not right.any() or not left.any():
        return Decision(False, "the lung model did not find two lungs", "image")
    fractions = right.sum() / area, left.sum() / area
    rows = [np.nonzero(m.any(axis=1))[0] for m in (right, left)]
    overlap = min(rows[0].max(), rows[1].max()) - max(rows[0].min(), rows[1].min())
    shorter = min(np.ptp(rows[0]), np.ptp(rows[1])) or 1
    checks = {
        "each lung covers 3-40 % of the image": all(0.03 <= f <= 0.40 for f in fractions),
        "lungs of similar size (ratio <= 3)": max(fractions) / min(fractions) <= 3,
        "lungs side by side (vertical overlap >= 60 %)": overlap / shorter >= 0.6,
        "lung confidence >= 0.85": seg.lung_confidence >= 0.85,
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        return Decision(False, "image does not look like a frontal chest: failed " + "; ".join(failed), "image")
    return Decision(True, f"two lungs found (confidence {seg.lung_confidence:.2f})", "image")


def with_image(decision: Decision, seg: Segmentation) -> Decision:
    """The final decision once the image is segmented: no lung found rejects whatever the tags said;
    a decision the tags deferred is made by the image."""
    if seg.lung_area_px == 0:
        return Decision(False, "the lung model found no lung", "image")
    return by_image(seg) if decision.frontal_chest is None else decision
