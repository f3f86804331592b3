"""Metric definitions (the model card quotes these docstrings).

Masks are boolean arrays at the image's own size; `valid` marks pixels that count (V7 "ignore"
pixels are excluded).
"""
from __future__ import annotations

import numpy as np


def overlap(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """Pixel counts: intersection, union, predicted, true."""
    if valid is not None:
        pred, truth = pred & valid, truth & valid
    return {"intersection": int((pred & truth).sum()), "union": int((pred | truth).sum()),
            "pred": int(pred.sum()), "truth": int(truth.sum())}


def iou(counts: dict) -> float:
    """|P & T| / |P | T|. Convention: an empty prediction of an empty truth scores 1 (perfect
    agreement). Means over images that include such cases are therefore also reported without them."""
    return counts["intersection"] / counts["union"] if counts["union"] else 1.0


def dice(counts: dict) -> float:
    """2 |P & T| / (|P| + |T|), F1 of the pixels; empty/empty scores 1 as for IoU."""
    total = counts["pred"] + counts["truth"]
    return 2 * counts["intersection"] / total if total else 1.0


def segmentation_summary(per_image: list[dict]) -> dict:
    """Per-image means (all images, and only images whose truth is non-empty) and pooled figures
    (sums of intersections over sums of unions across images: empty images weigh nothing)."""
    if not per_image:
        return {"n": 0}
    nonempty = [c for c in per_image if c["truth"] > 0]
    pooled = {k: sum(c[k] for c in per_image) for k in ("intersection", "union", "pred", "truth")}
    mean = lambda f, cs: float(np.mean([f(c) for c in cs])) if cs else None  # noqa: E731
    return {
        "n": len(per_image), "n_nonempty_truth": len(nonempty),
        "iou_mean": mean(iou, per_image), "iou_mean_nonempty": mean(iou, nonempty), "iou_pooled": iou(pooled),
        "dice_mean": mean(dice, per_image), "dice_mean_nonempty": mean(dice, nonempty), "dice_pooled": dice(pooled),
    }


def correlation(x, y) -> dict:
    """Pearson r and r^2, and Spearman rho, between paired figures (n >= 3, else None)."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"n": int(len(x)), "pearson_r": None, "r2": None, "spearman_rho": None}
    r = float(stats.pearsonr(x, y)[0])
    return {"n": int(len(x)), "pearson_r": r, "r2": r * r, "spearman_rho": float(stats.spearmanr(x, y)[0])}


def roc_auc(scores, positive) -> dict:
    """Area under the ROC curve of `scores` for the binary outcome `positive`, with the curve."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return {"n": int(len(scores)), "positives": int(positive.sum()), "auc": None}
    fpr, tpr, _ = roc_curve(positive, scores)
    return {"n": int(len(scores)), "positives": int(positive.sum()),
            "auc": float(roc_auc_score(positive, scores)), "fpr": fpr.tolist(), "tpr": tpr.tolist()}


def boundary_counts(pred: np.ndarray, truth: np.ndarray, tolerance_px: int) -> dict:
    """Boundary pixels of each mask and how many lie within `tolerance_px` of the other's boundary
    (Csurka et al. 2013); `boundary_f1` of the sums over images gives a pooled figure."""
    import cv2

    def edge(mask):
        mask = mask.astype(np.uint8)
        return (mask - cv2.erode(mask, np.ones((3, 3), np.uint8))) > 0

    def near(edges):  # pixels within the tolerance of any edge pixel
        if not edges.any():
            return np.zeros_like(edges)
        return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, 3) <= tolerance_px

    pred_edge, truth_edge = edge(pred), edge(truth)
    return {"pred": int(pred_edge.sum()), "pred_matched": int((pred_edge & near(truth_edge)).sum()),
            "truth": int(truth_edge.sum()), "truth_matched": int((truth_edge & near(pred_edge)).sum())}


def boundary_f1(counts: dict) -> float | None:
    """F1 of boundary precision (predicted boundary near the truth's) and recall (truth's boundary near the
    prediction's); None when neither mask has a boundary."""
    if not counts["pred"] and not counts["truth"]:
        return None
    precision = counts["pred_matched"] / counts["pred"] if counts["pred"] else 0.0
    recall = counts["truth_matched"] / counts["truth"] if counts["truth"] else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
