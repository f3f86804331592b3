"""What a radiologist reads in five seconds, worded once for every result: the qualitative
evaluations (opacity present or absent, its severity) and the key figures in one sentence. The SR opens
with it, the SEG's segment descriptions and the Secondary Capture repeat it."""
from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from model.infer import Segmentation

# Opacity counts as present from 5 % of a lung's area: 91 % of COVID-QU-Ex normals read below it on
# both lungs (model card), so a lower cut would call one normal film in ten abnormal.
PRESENT_FROM_PCT = 5.0
# Severity by the share of the more involved lung, on the bands of the geographic extent score
# (Cohen et al. 2020: <25 %, 25-50 %, >50 % of a lung), which the opacity % is read against.
SEVERITY_BANDS = ((25.0, codes.SCT.Mild), (50.0, codes.SCT.Moderate), (float("inf"), codes.SCT.Severe))


def percent(value: float) -> str:
    """A percentage as a reader wants it: whole numbers, one decimal below 10 %."""
    return f"{value:.0f} %" if value >= 10 else f"{value:.1f} %"


def worse_lung_pct(seg: Segmentation) -> float:
    return max(seg.right_opacity_pct, seg.left_opacity_pct)


def presence(seg: Segmentation) -> Code:
    return codes.SCT.Present if worse_lung_pct(seg) >= PRESENT_FROM_PCT else codes.SCT.Absent


def severity(seg: Segmentation) -> Code | None:
    """Mild / moderate / severe by the more involved lung; None when opacity is absent."""
    if presence(seg) == codes.SCT.Absent:
        return None
    return next(code for upper, code in SEVERITY_BANDS if worse_lung_pct(seg) < upper)


def opacity_sentence(seg: Segmentation) -> str:
    """E.g. 'Opacity 41 % of both lungs (right 41 %, left 41 %), moderate'."""
    grade = severity(seg)
    return (f"Opacity {percent(seg.opacity_pct)} of both lungs (right {percent(seg.right_opacity_pct)}, "
            f"left {percent(seg.left_opacity_pct)}), {grade.meaning.lower() if grade else 'absent'}")


def sentence(seg: Segmentation) -> str:
    """The opacity sentence and the Brixia global score, e.g. '...), moderate; Brixia 5/18'."""
    return opacity_sentence(seg) + (f"; Brixia {seg.brixia_global}/18" if seg.brixia else "")
