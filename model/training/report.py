"""What training shows a person: the ablation table and the training curves."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def ablation_table(ablation: dict) -> str:
    """Markdown table: what each source of opacity supervision gives, cross-validated by patient."""
    lines = ["| supervision | r² vs extent (Spearman) | r² vs Brixia global | zone AUC senior / junior (area %) | "
             "median % in zones scored 0 | polygon IoU pooled / mean | polygon Dice pooled | opacity % MAE | Brixia zone / global MAE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, m in ablation.items():
        extent, brixia = m.get("opacity_pct_vs_extent", {}), m.get("opacity_pct_vs_brixia_global", {})
        polygons = m.get("opacity_vs_polygons", {})
        zones = m.get("zones_scored_0_by_both", {})
        mae = m.get("brixia", {}).get("vs_senior", {})
        lines.append(
            f"| {variant} | {_fmt(extent.get('r2'))} ({_fmt(extent.get('spearman_rho'))}) | {_fmt(brixia.get('r2'))} | "
            f"{_fmt(m.get('zone_auc_senior', {}).get('pooled'))} / {_fmt(m.get('zone_auc_junior', {}).get('pooled'))} "
            f"({_fmt(m.get('zone_auc_area_senior', {}).get('pooled'))} / {_fmt(m.get('zone_auc_area_junior', {}).get('pooled'))}) | "
            f"{_fmt(zones.get('median_opacity_pct'), 2)} | {_fmt(polygons.get('iou_pooled'))} / {_fmt(polygons.get('iou_mean'))} | "
            f"{_fmt(polygons.get('dice_pooled'))} | {_fmt(polygons.get('opacity_pct_mae'), 1)} | "
            f"{_fmt(mae.get('zone_mae'), 2)} / {_fmt(mae.get('global_mae'), 2)} |")
    return "\n".join(lines)


def plot_history(stage_a_dir: Path, final_dir: Path | None, out_path: Path) -> Path:
    """Loss terms per epoch of stage A and, where one is shipped, of the final stage B with the mean
    predicted opacity fraction of positive vs negative Brixia zones (a collapse to "no opacity" shows
    as both at 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(stage_a_dir, "stage A: QU-Ex")] + ([(final_dir, "stage B: Cohen + QU-Ex")] if final_dir else [])
    fig, axes = plt.subplots(1, 3 if final_dir else 1, figsize=(13 if final_dir else 5, 3.8), squeeze=False)
    axes = axes[0]
    for ax, (folder, title) in zip(axes, stages):
        history = json.loads((folder / "history.json").read_text())
        for key in ("loss", "pixels", "zone_negative", "zone_positive", "zone_ranking", "extent"):
            values = [h.get(key) for h in history]
            if any(v for v in values):
                ax.plot([h["epoch"] for h in history], values, marker="o", label=key)
        ax.set(title=title, xlabel="epoch", ylabel="loss"); ax.legend(fontsize=7)
    if final_dir:
        history = json.loads((final_dir / "history.json").read_text())
        for key, label in (("positive_zone_fraction", "zones scored >= 1"), ("negative_zone_fraction", "zones scored 0")):
            axes[2].plot([h["epoch"] for h in history], [h.get(key) for h in history], marker="o", label=label)
        axes[2].set(title="stage B: mean opacity probability per zone", xlabel="epoch", ylim=(0, 1))
        axes[2].legend(fontsize=7)
    fig.tight_layout(); fig.savefig(out_path, dpi=110); plt.close(fig)
    return out_path
