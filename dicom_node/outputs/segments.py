"""The one table of result segments: SEG segment numbers, labels, codes and colours, the SR groups that
describe them and the Secondary Capture's outlines all read it, so they cannot drift apart."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.outputs.codes import LUNG, OPACITY
from dicom_node.outputs.identity import Algorithm, derived_uid
from dicom_node.outputs.summary import percent
from model.infer import LEFT, RIGHT, ZONES, Segmentation


def opacity_laterality(seg: Segmentation) -> str | None:
    """Which lungs hold opacity: 'right', 'left', 'bilateral', or None when neither does."""
    right, left = bool((seg.opacity & (seg.lungs == RIGHT)).any()), bool((seg.opacity & (seg.lungs == LEFT)).any())
    return "bilateral" if right and left else "right" if right else "left" if left else None


@dataclass(frozen=True)
class Segment:
    number: int                 # SEG segment number = frame number (one frame per segment)
    label: str                  # what a radiologist reads in the viewer; also the SR tracking identifier
    category: Code
    property_type: Code
    rgb: tuple[int, int, int]   # display colour (the SEG carries it as CIELab)
    mask: Callable[[Segmentation], np.ndarray]
    laterality: Callable[[Segmentation], str | None]  # 'right' / 'left' / 'bilateral' / None

    def tracking_uid(self, source_uid: str, algorithm: Algorithm) -> str:
        """Shared by the SEG segment and the SR measurement group that describes it."""
        return derived_uid(source_uid, f"segment-{self.number}", algorithm.version)

    def description(self, seg: Segmentation) -> str:
        """What the segment list of a viewer shows beside the label: the segment's figures, e.g.
        'Opacity 24 % of both lungs (R 12 %, L 38 %); Brixia 7/18' or 'Right lung: opacity 12 %; Brixia A1 B2 C0'."""
        if self.property_type == OPACITY:
            text = (f"Opacity {percent(seg.opacity_pct)} of both lungs (R {percent(seg.right_opacity_pct)}, "
                    f"L {percent(seg.left_opacity_pct)})")
            return text + (f"; Brixia {seg.brixia_global}/18" if seg.brixia else "")
        text = f"{self.label}: opacity {percent(self.opacity_pct(seg))}"
        zones = ZONES[:3] if self.laterality(seg) == "right" else ZONES[3:]
        return text + (f"; Brixia {' '.join(f'{z}{seg.brixia[z]}' for z in zones)}" if seg.brixia else "")

    def opacity_pct(self, seg: Segmentation) -> float:
        """Opacity % of this lung; of both lungs for the opacity segment."""
        return seg.opacity_pct_of(seg.lungs > 0) if self.property_type == OPACITY else seg.opacity_pct_of(self.mask(seg))


SEGMENTS = (
    Segment(1, "Right lung", codes.SCT.AnatomicalStructure, LUNG, (0, 200, 0), lambda s: s.lungs == RIGHT,
            lambda s: "right"),
    Segment(2, "Left lung", codes.SCT.AnatomicalStructure, LUNG, (0, 160, 255), lambda s: s.lungs == LEFT,
            lambda s: "left"),
    Segment(3, "Opacity (AI)", codes.SCT.MorphologicallyAbnormalStructure, OPACITY, (255, 60, 0),
            lambda s: s.opacity, opacity_laterality),
)
assert [s.number for s in SEGMENTS] == list(range(1, len(SEGMENTS) + 1))  # frame k holds segment k
