"""Brixia scores (Borghesi & Maroldi 2020) from the expected opacity % of each lung zone.

Zones A-C are the upper, middle and lower thirds of the right lung's height, D-F of the left lung's
(`model.lungs.zone_map`: a geometric stand-in for the anatomical lines a model does not see). A zone
scores 0-3, the global score is their sum (0-18). The mapping from a zone's expected opacity % (the
mean opacity probability over the zone, `Segmentation.zone_opacity_score`) to its score is monotone (isotonic regression on the radiologists' mean zone score), fitted on cross-validated
predictions only, and ships with the weights as brixia.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ZONE_LETTERS = "ABCDEF"


@dataclass(frozen=True)
class BrixiaMapping:
    opacity_pct: tuple[float, ...]  # increasing breakpoints of the expected opacity %
    score: tuple[float, ...]        # fitted mean zone score at each breakpoint (non-decreasing)

    def zone_scores(self, zone_opacity_score: dict) -> dict[str, int]:
        """{zone letter: expected opacity %} -> {zone letter: score 0-3}."""
        values = np.interp([zone_opacity_score[z] for z in ZONE_LETTERS], self.opacity_pct, self.score)
        return dict(zip(ZONE_LETTERS, np.clip(np.rint(values), 0, 3).astype(int).tolist()))

    @classmethod
    def fit(cls, zone_opacity_score, zone_score) -> "BrixiaMapping":
        """Isotonic fit of paired zone figures (needs scikit-learn, a training/evaluation extra)."""
        from sklearn.isotonic import IsotonicRegression

        fitted = IsotonicRegression(y_min=0, y_max=3, out_of_bounds="clip").fit(zone_opacity_score, zone_score)
        return cls(tuple(map(float, fitted.X_thresholds_)), tuple(map(float, fitted.y_thresholds_)))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"opacity_pct": self.opacity_pct, "score": self.score}) + "\n")

    @classmethod
    def load(cls, path: Path) -> "BrixiaMapping":
        doc = json.loads(Path(path).read_text())
        return cls(tuple(doc["opacity_pct"]), tuple(doc["score"]))


def mean_rater_zone_scores(rows: list[dict]) -> tuple[list[float], list[float]]:
    """(zone expected opacity %, mean of the raters' scores) for every zone of every scored row."""
    pairs = [(r["zone_opacity_score"][z], float(np.mean([zones[z] for zones in r["brixia_zones"].values()])))
             for r in rows if r.get("brixia_zones") for z in ZONE_LETTERS]
    return [p for p, _ in pairs], [s for _, s in pairs]
