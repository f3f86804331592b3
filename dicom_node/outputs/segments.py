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
from model.infer import LEFT, RIGHT, Segmentation


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
