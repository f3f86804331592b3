"""The kinds of result, in one registry that the worker, the queue, the sender and the outputs read:
what each is called in the queue (a StrEnum: the same text in SQL and file names), its result series
and its SOP class."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydicom.uid import (ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage,
                         SecondaryCaptureImageStorage, SegmentationStorage)


class Kind(StrEnum):
    SEG = "SEG"  # lungs and opacity
    SR = "SR"    # the measurement report
    SC = "SC"    # optional: outlines and figures burned into a copy of the image
    PR = "PR"    # optional: outlines and figures as a presentation state


@dataclass(frozen=True)
class ResultKind:
    series_number: int  # one result series per (source series, kind, algorithm version)
    series_description: str
    sop_class_uid: str


# The SR carries 2D image coordinates only, so it is Comprehensive SR, which more PACS store than
# Comprehensive 3D SR; Enhanced SR cannot carry TID 1500's by-reference content.
RESULT_KINDS = {
    Kind.SEG: ResultKind(9901, "AI lung and opacity (cxr-node)", SegmentationStorage),
    Kind.SR: ResultKind(9902, "AI opacity measurements (cxr-node)", ComprehensiveSRStorage),
    Kind.SC: ResultKind(9903, "AI outlines (cxr-node) - not for primary diagnosis", SecondaryCaptureImageStorage),
    Kind.PR: ResultKind(9904, "AI outlines and figures (cxr-node) - presentation state",
                        GrayscaleSoftcopyPresentationStateStorage),
}
