"""Every figure of the model card from the per-image predictions committed under `model/evidence/`,
without TensorFlow or images: `cxr-node evaluate --evidence model/evidence --out DIR` writes
DIR/metrics.json, which must equal `model/metrics.json`.

Evidence files (JSON, no masks): `cv.json` holds one row per Cohen image scored by the fold model that
never saw its patient (`model.evaluate.score_image` rows with the fold's Brixia predictions); `locked.json`
holds the locked test set scored once by the shipped model: Cohen rows as above and COVID-QU-Ex rows
(`score_quex_image`); `repeatability.json` pairs of figures that should agree (`model/repeatability.py`);
`ablation/<run>.json` the cross-validated rows of each variant of a recipe trial. Each row names its
merged patient (`model/patients.py`): the 95 % intervals are percentile bootstraps over patients, so
several films of one patient move together."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.metrics import boundary_counts, boundary_f1, correlation, overlap, roc_auc
from model.repeatability import limits as repeatability_limits

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 20261130
BOUNDARY_TOLERANCE_PX = 3  # at the 256 px QU-Ex grid: about 1 % of the image side
SEVERE_PCT = 60.0          # "severe lungs" of the issue: QU-Ex infection over 60 % of the lung


def score_quex_image(record, seg) -> dict:
    """A COVID-QU-Ex image against its infection mask (empty for normals), at the mask's 256 px grid: pixel
    overlap, boundary counts, and the opacity % beside the annotated infection % of the lung."""
    import cv2

    from model.image import read_gray

    truth = (read_gray(record.infection_mask_path) > 127) if record.infection_mask_path else None
    lung_truth = read_gray(record.lung_mask_path) > 127
    shape = lung_truth.shape[::-1]
    pred = cv2.resize(seg.opacity.astype(np.uint8), shape, interpolation=cv2.INTER_NEAREST) > 0
    truth = truth if truth is not None else np.zeros_like(lung_truth)
    return {"filename": record.filename, "normal": record.infection_mask_path is None,
            "opacity_pct": seg.opacity_pct, "truth_pct": 100.0 * (truth & lung_truth).sum() / max(1, lung_truth.sum()),
            "opacity_counts": overlap(pred, truth),
            "boundary_counts": boundary_counts(pred, truth, BOUNDARY_TOLERANCE_PX)}


def _pooled_iou(rows) -> float | None:
    counts = [r["opacity_counts"] for r in rows if "opacity_counts" in r]
    union = sum(c["union"] for c in counts)
    return sum(c["intersection"] for c in counts) / union if union else None


def _pooled_boundary_f1(rows) -> float | None:
    counts = [r["boundary_counts"] for r in rows if "boundary_counts" in r]
    return boundary_f1({k: sum(c[k] for c in counts) for k in ("pred", "pred_matched", "truth", "truth_matched")}) \
        if counts else None


def _per_patient_r2(rows, score: str) -> float | None:
    """r² between each patient's mean opacity % and mean score (films of one patient count once)."""
    patients = {}
    for r in rows:
        if r.get(score) is not None:
            patients.setdefault(r["patient"], []).append((r["opacity_pct"], r[score]))
    means = np.array([np.mean(v, axis=0) for v in patients.values()])
    return correlation(means[:, 0], means[:, 1])["r2"] if len(means) >= 3 else None


def _patient_auc(rows, column: str, positive: str) -> float | None:
    patients = {}
    for r in rows:
        if r.get(column) in ("Y", "N"):
            entry = patients.setdefault(r["patient"], [[], False])
            entry[0].append(r["opacity_pct"])
            entry[1] |= r[column] == positive
    if len(patients) < 3:
        return None
    return roc_auc([max(v[0]) for v in patients.values()], [v[1] for v in patients.values()])["auc"]


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _zone_auc(rows) -> float | None:
    pairs = [(r["zone_opacity_score"][z], r["brixia_zones"]["senior"][z] >= 1) for r in rows
             if "senior" in r.get("brixia_zones", {}) for z in "ABCDEF"]
    return roc_auc(*zip(*pairs))["auc"] if pairs else None


def _brixia_bias(rows, rater: str) -> float | None:
    """Mean predicted Brixia global minus the rater's, per patient."""
    patients = {}
    for r in rows:
        if rater in r.get("brixia_zones", {}) and r.get("brixia_global_predicted") is not None:
            patients.setdefault(r["patient"], []).append(r["brixia_global_predicted"] - sum(r["brixia_zones"][rater].values()))
    return _mean(np.mean(v) for v in patients.values())


COHEN_FIGURES = {
    "r2_opacity_pct_vs_extent_per_patient": lambda rows: _per_patient_r2(rows, "extent"),
    "r2_opacity_pct_vs_extent_per_image": lambda rows: correlation(
        *zip(*[(r["opacity_pct"], r["extent"]) for r in rows if r["extent"] is not None]))["r2"]
    if sum(r["extent"] is not None for r in rows) >= 3 else None,
    "polygon_iou_pooled": lambda rows: _pooled_iou([r for r in rows if "labelme_opacity_pct" in r]),
    "polygon_opacity_pct_mae": lambda rows: _mean(r["opacity_pct_abs_error"] for r in rows if "opacity_pct_abs_error" in r),
    "lung_dice": lambda rows: _mean(r["lung_dice"] for r in rows if "lung_dice" in r),
    "zone_auc_senior": _zone_auc,
    "brixia_global_bias_vs_senior_per_patient": lambda rows: _brixia_bias(rows, "senior"),
    "brixia_global_bias_vs_junior_per_patient": lambda rows: _brixia_bias(rows, "junior"),
    "auc_icu_per_patient": lambda rows: _patient_auc(rows, "went_icu", "Y"),
    "auc_mortality_per_patient": lambda rows: _patient_auc(rows, "survival", "N"),
}
QUEX_FIGURES = {
    "quex_iou_pooled": lambda rows: _pooled_iou([r for r in rows if not r["normal"]]),
    "quex_opacity_pct_mae": lambda rows: _mean(abs(r["opacity_pct"] - r["truth_pct"]) for r in rows if not r["normal"]),
    "quex_r2_opacity_pct_vs_truth": lambda rows: correlation(
        *zip(*[(r["opacity_pct"], r["truth_pct"]) for r in rows if not r["normal"]]))["r2"]
    if sum(not r["normal"] for r in rows) >= 3 else None,
    "quex_boundary_f1_pooled": lambda rows: _pooled_boundary_f1([r for r in rows if not r["normal"]]),
    "quex_severe_mean_predicted_pct": lambda rows: _mean(r["opacity_pct"] for r in rows if r["truth_pct"] > SEVERE_PCT),
    "quex_severe_mean_truth_pct": lambda rows: _mean(r["truth_pct"] for r in rows if r["truth_pct"] > SEVERE_PCT),
    "normals_median_opacity_pct": lambda rows: float(np.median([r["opacity_pct"] for r in rows if r["normal"]]))
    if any(r["normal"] for r in rows) else None,
    "normals_share_over_5_pct": lambda rows: _mean(r["opacity_pct"] > 5 for r in rows if r["normal"]),
}


def figures(cohen: list[dict], quex: list[dict]) -> dict:
    result = {name: f(cohen) for name, f in COHEN_FIGURES.items()} if cohen else {}
    return result | ({name: f(quex) for name, f in QUEX_FIGURES.items()} if quex else {})


def with_intervals(cohen: list[dict], quex: list[dict], samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """{figure: {"value", "ci95": [low, high]}}: percentile bootstrap over patients (both sets resampled by
    the same draw of merged patients; a figure undefined in a resample is left out of its interval)."""
    point = figures(cohen, quex)
    by_patient = {}
    for kind, rows in (("cohen", cohen), ("quex", quex)):
        for row in rows:
            by_patient.setdefault(row["patient"], {"cohen": [], "quex": []})[kind].append(row)
    patients = sorted(by_patient)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = {name: [] for name in point}
    for _ in range(samples):
        picked = [patients[i] for i in rng.integers(0, len(patients), len(patients))]
        resampled = figures([r for p in picked for r in by_patient[p]["cohen"]],
                            [r for p in picked for r in by_patient[p]["quex"]])
        for name, value in resampled.items():
            if value is not None and name in draws:
                draws[name].append(value)
    return {name: {"value": value, "ci95": [float(np.percentile(draws[name], 2.5)), float(np.percentile(draws[name], 97.5))]
                   if value is not None and draws[name] else None} for name, value in point.items()}


def evaluate_evidence(evidence_dir: Path, out_dir: Path, samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """metrics.json of the card from the evidence files: cross-validated and locked-test figures with
    patient-level 95 % intervals."""
    evidence_dir, out_dir = Path(evidence_dir), Path(out_dir)
    metrics = {"definitions": "model/evidence.py and model/metrics.py", "bootstrap_samples": samples}
    for path in sorted(evidence_dir.glob("*.json")):  # cv, locked, and earlier weights on the locked test
        doc = json.loads(path.read_text())
        if path.stem == "repeatability":
            metrics["repeatability"] = {"about": doc["about"], **repeatability_limits(doc)}
            continue
        metrics[path.stem] = {"about": doc["about"], "images": {"cohen": len(doc.get("cohen", [])),
                                                                "quex": len(doc.get("quex", []))},
                              "figures": with_intervals(doc.get("cohen", []), doc.get("quex", []), samples)}
    for path in sorted((evidence_dir / "ablation").glob("*.json")):  # recipe trials: point figures per variant
        doc = json.loads(path.read_text())
        metrics.setdefault("ablation", {})[path.stem] = {
            "about": doc["about"], **{variant: figures(rows, []) for variant, rows in doc["variants"].items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    if (evidence_dir / "locked.json").exists():
        plot_calibration(json.loads((evidence_dir / "locked.json").read_text())["quex"], out_dir / "calibration-locked.png")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def plot_calibration(quex: list[dict], out_path: Path) -> Path:
    """Predicted opacity % against the annotated infection % of the lung, per COVID-QU-Ex film, with the
    mean prediction per 10-point band of the annotation (an under-read shows as bands below the diagonal)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in quex if not r["normal"]]
    truth, predicted = np.array([r["truth_pct"] for r in rows]), np.array([r["opacity_pct"] for r in rows])
    bands = [(lo, predicted[(truth >= lo) & (truth < lo + 10)]) for lo in range(0, 100, 10)]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(truth, predicted, s=8, alpha=0.4, label=f"films (n={len(rows)})")
    ax.plot(*zip(*[(lo + 5, v.mean()) for lo, v in bands if len(v)]), "o-", color="C3", label="mean per 10-point band")
    ax.plot([0, 100], [0, 100], "k--", lw=1)
    ax.axvline(SEVERE_PCT, color="gray", lw=0.8)
    ax.set(xlabel="annotated infection % of lung (QU-Ex mask)", ylabel="predicted opacity % of lung",
           xlim=(0, 100), ylim=(0, 100), title="Calibration on the locked test (COVID-QU-Ex)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout(); fig.savefig(out_path, dpi=110); plt.close(fig)
    return out_path
