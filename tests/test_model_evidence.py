"""The model card's figures from committed evidence (no TensorFlow, no images)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model.evidence import with_intervals
from tests.harness import REPO


def test_intervals_resample_patients_so_films_of_one_patient_move_together():
    """Two patients, fifty films each: an image-level bootstrap would give a narrow interval around the
    mean; resampling patients gives the whole range between them."""
    rows = [{"patient": patient, "lung_dice": dice, "opacity_pct": 1.0, "extent": None}
            for patient, dice in (("a", 0.9), ("b", 1.0)) for _ in range(50)]
    interval = with_intervals(rows, [], samples=200)["lung_dice"]
    assert interval["value"] == pytest.approx(0.95)
    assert interval["ci95"] == pytest.approx([0.9, 1.0])


def test_qu_ex_figures_count_normals_apart_and_pool_overlaps():
    rows = [{"patient": "n1", "normal": True, "opacity_pct": 0.0, "truth_pct": 0.0,
             "opacity_counts": {"intersection": 0, "union": 0, "pred": 0, "truth": 0},
             "boundary_counts": {"pred": 0, "pred_matched": 0, "truth": 0, "truth_matched": 0}},
            {"patient": "n2", "normal": True, "opacity_pct": 8.0, "truth_pct": 0.0,
             "opacity_counts": {"intersection": 0, "union": 40, "pred": 40, "truth": 0},
             "boundary_counts": {"pred": 20, "pred_matched": 0, "truth": 0, "truth_matched": 0}},
            {"patient": "c1", "normal": False, "opacity_pct": 50.0, "truth_pct": 70.0,
             "opacity_counts": {"intersection": 30, "union": 90, "pred": 40, "truth": 80},
             "boundary_counts": {"pred": 10, "pred_matched": 5, "truth": 10, "truth_matched": 5}},
            {"patient": "c2", "normal": False, "opacity_pct": 20.0, "truth_pct": 10.0,
             "opacity_counts": {"intersection": 10, "union": 10, "pred": 10, "truth": 10},
             "boundary_counts": {"pred": 10, "pred_matched": 10, "truth": 10, "truth_matched": 10}}]
    figures = {name: value["value"] for name, value in with_intervals([], rows, samples=50).items()}
    assert figures["quex_iou_pooled"] == pytest.approx(40 / 100)  # the normal's false positives are not in it
    assert figures["quex_opacity_pct_mae"] == pytest.approx(15.0)
    assert figures["normals_median_opacity_pct"] == pytest.approx(4.0)
    assert figures["normals_share_over_5_pct"] == pytest.approx(0.5)
    assert figures["quex_boundary_f1_pooled"] == pytest.approx(0.75)
    assert figures["quex_severe_mean_predicted_pct"] == pytest.approx(50.0)


def test_the_committed_evidence_reproduces_the_committed_metrics(tmp_path):
    """`cxr-node evaluate --evidence model/evidence` recomputes every figure of the card: its metrics.json
    equals model/metrics.json."""
    from model.evidence import evaluate_evidence

    evaluate_evidence(REPO / "model" / "evidence", tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads((REPO / "model" / "metrics.json").read_text())
    assert (tmp_path / "calibration-locked.png").stat().st_size > 0


def test_the_locked_test_set_is_never_scored_over(tmp_path):
    scored = tmp_path / "locked.json"
    scored.write_text("{}")
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "--data", str(tmp_path),
                             "--locked-test", str(scored)], capture_output=True, text=True)
    assert result.returncode != 0 and "scored once" in result.stderr
    assert scored.read_text() == "{}"
