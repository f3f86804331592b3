"""`cxr-node evaluate`: the shipped pipeline on any folder laid out like ../shared/data/cxr.

Whatever annotations the folder has are used: V7 lung masks (lung Dice), labelme polygons (opacity
IoU/Dice and opacity % error), extent and Brixia scores (correlation), outcomes (ROC AUC).
Writes metrics.json, per_image.csv, ROC and scatter PNGs and overlay PNGs; prints a table.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from model.data import Record, load_records, read_lung_labels, read_split, rasterize_labelme
from model.image import read_gray
from model.infer import Pipeline, Segmentation
from model.lungs import LEFT, RIGHT, ZONES
from model.metrics import correlation, dice, overlap, roc_auc, segmentation_summary

OVERLAY_SIZE = 640


def score_image(record: Record, seg: Segmentation) -> dict:
    """One image's figures against every annotation it has (no masks kept)."""
    row = {"filename": record.filename, "patient": record.patient, "opacity_pct": seg.opacity_pct,
           "extent": record.extent, "brixia_global": record.brixia_global,
           "went_icu": record.row.get("went_icu", ""), "survival": record.row.get("survival", ""),
           "view": record.row.get("view", ""), "inverted": seg.inverted,
           "zone_opacity_pct": dict(seg.zone_opacity_pct), "zone_opacity_score": dict(seg.zone_opacity_score),
           **({"brixia_predicted": seg.brixia, "brixia_global_predicted": seg.brixia_global} if seg.brixia else {}),
           "brixia_zones": {rater: zones for rater, zones in (("senior", record.brixia_zones),
                                                               ("junior", record.brixia_junior_zones)) if zones}}
    if record.lung_mask_path:
        truth, ignore = read_lung_labels(record.lung_mask_path)
        valid = ~ignore
        row["lung_dice"] = dice(overlap(seg.lungs > 0, truth > 0, valid))
        row["right_lung_dice"] = dice(overlap(seg.lungs == RIGHT, truth == RIGHT, valid))
        row["left_lung_dice"] = dice(overlap(seg.lungs == LEFT, truth == LEFT, valid))
    if record.labelme_path:
        polygons = rasterize_labelme(record.labelme_path, seg.lungs.shape)
        lungs = polygons["right_lung"] | polygons["left_lung"]
        row["opacity_counts"] = overlap(seg.opacity, polygons["opacity"])
        row["labelme_opacity_pct"] = 100.0 * (polygons["opacity"] & lungs).sum() / max(1, lungs.sum())
        row["opacity_pct_abs_error"] = abs(seg.opacity_pct - row["labelme_opacity_pct"])
    return row


def summarize(rows: list[dict]) -> dict:
    """Metrics over scored images (see model/metrics.py for the definitions)."""
    metrics = {"images": len(rows)}
    lung = [r for r in rows if "lung_dice" in r]
    if lung:
        metrics["lung_dice"] = {k: float(np.mean([r[k] for r in lung]))
                                for k in ("lung_dice", "right_lung_dice", "left_lung_dice")}
        metrics["lung_dice"]["n"] = len(lung)
    polygon = [r for r in rows if "opacity_counts" in r]
    if polygon:
        metrics["opacity_vs_polygons"] = segmentation_summary([r["opacity_counts"] for r in polygon])
        metrics["opacity_vs_polygons"]["opacity_pct_mae"] = float(np.mean([r["opacity_pct_abs_error"] for r in polygon]))
    for score in ("extent", "brixia_global"):
        paired = [r for r in rows if r[score] is not None]
        if paired:
            metrics[f"opacity_pct_vs_{score}"] = correlation([r["opacity_pct"] for r in paired],
                                                             [r[score] for r in paired])
    metrics.update(zone_metrics(rows))
    if any(r.get("brixia_zones") and r.get("brixia_predicted") for r in rows):
        metrics["brixia"] = brixia_errors(rows)
    metrics.update(outcome_aucs(rows))
    return metrics


def brixia_errors(rows: list[dict]) -> dict:
    """Predicted zone and global Brixia scores against each rater: mean absolute error, and linearly
    weighted Cohen's kappa per zone; the junior rater against the senior beside them (the bar)."""
    from sklearn.metrics import cohen_kappa_score

    def compare(pairs_of_zones):  # [(zones a, zones b)] -> figures
        kappa = {z: float(cohen_kappa_score([a[z] for a, _ in pairs_of_zones], [b[z] for _, b in pairs_of_zones],
                                            weights="linear", labels=[0, 1, 2, 3])) for z in "ABCDEF"}
        return {"images": len(pairs_of_zones),
                "zone_mae": float(np.mean([abs(a[z] - b[z]) for a, b in pairs_of_zones for z in "ABCDEF"])),
                "global_mae": float(np.mean([abs(sum(a.values()) - sum(b.values())) for a, b in pairs_of_zones])),
                "zone_kappa_linear": kappa}

    scored = [r for r in rows if r.get("brixia_zones") and r.get("brixia_predicted")]
    result = {f"vs_{rater}": compare([(r["brixia_predicted"], r["brixia_zones"][rater]) for r in scored
                                      if rater in r["brixia_zones"]]) for rater in ("senior", "junior")}
    both = [r for r in scored if len(r["brixia_zones"]) == 2]
    result["junior_vs_senior"] = compare([(r["brixia_zones"]["junior"], r["brixia_zones"]["senior"]) for r in both])
    return result


def zone_metrics(rows: list[dict]) -> dict:
    """Brixia zones (A-F, thirds of each lung) against the same zone's expected opacity % (the figure the
    Brixia scores are read from; `zone_auc_<rater>`) and its opacity area % (`zone_auc_area_<rater>`):
    ROC AUC for "zone score >= 1" per rater, pooled over zones and per zone; the median opacity area %
    in zones both raters scored 0."""
    result = {}
    scored = [r for r in rows if r.get("brixia_zones")]
    for rater, figure, key in [(rater, figure, key) for rater in ("senior", "junior") for figure, key in
                               (("zone_opacity_score", f"zone_auc_{rater}"), ("zone_opacity_pct", f"zone_auc_area_{rater}"))]:
        pairs = [(r[figure][z], r["brixia_zones"][rater][z], z) for r in scored
                 if rater in r["brixia_zones"] for z in ZONES]
        if pairs:
            result[key] = {"pooled": roc_auc([p for p, _, _ in pairs], [s >= 1 for _, s, _ in pairs])["auc"],
                           **{z: roc_auc([p for p, _, zz in pairs if zz == z],
                                         [s >= 1 for _, s, zz in pairs if zz == z])["auc"] for z in ZONES},
                           "zones": len(pairs)}
    clean = [r["zone_opacity_pct"][z] for r in scored if len(r["brixia_zones"]) == 2 for z in ZONES
             if r["brixia_zones"]["senior"][z] == 0 and r["brixia_zones"]["junior"][z] == 0]
    if clean:
        result["zones_scored_0_by_both"] = {"zones": len(clean), "median_opacity_pct": float(np.median(clean)),
                                            "share_over_5_pct": float(np.mean(np.array(clean) > 5))}
    return result


def outcome_aucs(rows: list[dict]) -> dict:
    """Per patient (score = the patient's highest opacity % over their images): ROC AUC for ICU
    admission (went_icu = Y) and death (survival = N); beside it the predicted Brixia global score's
    (where rows carry one), the extent score's own AUC and that of the projection alone (1 if any
    image is AP, bedside films being taken of the sickest)."""
    result = {}
    for outcome, column, positive in (("icu", "went_icu", "Y"), ("mortality", "survival", "N")):
        patients = {}
        for r in rows:
            if r[column] in ("Y", "N"):
                entry = patients.setdefault(r["patient"], {"pct": [], "brixia": [], "extent": [], "positive": False,
                                                           "ap": False})
                entry["pct"].append(r["opacity_pct"])
                if r.get("brixia_global_predicted") is not None:
                    entry["brixia"].append(r["brixia_global_predicted"])
                entry["positive"] |= r[column] == positive
                entry["ap"] |= r.get("view", "").upper().startswith("AP")
                if r["extent"] is not None:
                    entry["extent"].append(r["extent"])
        result[f"auc_{outcome}_opacity_pct"] = roc_auc([max(p["pct"]) for p in patients.values()],
                                                       [p["positive"] for p in patients.values()])
        with_brixia = [p for p in patients.values() if p["brixia"]]
        if with_brixia:
            result[f"auc_{outcome}_brixia_global"] = roc_auc([max(p["brixia"]) for p in with_brixia],
                                                             [p["positive"] for p in with_brixia])
        result[f"auc_{outcome}_projection_ap"] = roc_auc([float(p["ap"]) for p in patients.values()],
                                                         [p["positive"] for p in patients.values()])
        with_extent = [p for p in patients.values() if p["extent"]]
        result[f"auc_{outcome}_extent_score"] = roc_auc([max(p["extent"]) for p in with_extent],
                                                        [p["positive"] for p in with_extent])
    return result


def overlay(gray: np.ndarray, seg: Segmentation, truth_opacity: np.ndarray | None = None) -> np.ndarray:
    """Image with lung outlines (green right, blue left), predicted opacity (red fill) and the
    annotators' opacity outline (yellow), downscaled to OVERLAY_SIZE on the long side."""
    from model.image import normalize_gray

    scale = OVERLAY_SIZE / max(gray.shape)
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    small = lambda m: cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)  # noqa: E731
    image = cv2.cvtColor(cv2.resize(normalize_gray(gray), size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    red = image.copy()
    red[small(seg.opacity) > 0] = (0, 0, 255)
    image = cv2.addWeighted(image, 0.6, red, 0.4, 0)
    for mask, colour in ((seg.lungs == RIGHT, (0, 200, 0)), (seg.lungs == LEFT, (255, 128, 0)),
                         (truth_opacity, (0, 255, 255))):
        if mask is not None:
            contours, _ = cv2.findContours(small(mask), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(image, contours, -1, colour, 2)
    cv2.putText(image, f"opacity {seg.opacity_pct:.1f}%", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
    return image


def contact_sheet(folder: Path, out_path: Path, columns: int = 6, tile: int = 256) -> Path:
    """The cross-validated overlays in `folder` tiled into one PNG."""
    tiles = []
    for path in sorted(folder.glob("*.png")):
        image = cv2.imread(str(path))
        scale = tile / max(image.shape[:2])
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((tile, tile, 3), np.uint8)
        canvas[:image.shape[0], :image.shape[1]] = image
        tiles.append(canvas)
    while len(tiles) % columns:
        tiles.append(np.zeros((tile, tile, 3), np.uint8))
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_path), np.vstack(rows))
    return out_path


def plot_curves(metrics: dict, rows: list[dict], out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for outcome, title in (("icu", "ICU admission"), ("mortality", "Mortality")):
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for key, label in ((f"auc_{outcome}_opacity_pct", "opacity %"), (f"auc_{outcome}_brixia_global", "Brixia global (predicted)"),
                           (f"auc_{outcome}_extent_score", "extent score"),
                           (f"auc_{outcome}_projection_ap", "AP projection alone")):
            roc = metrics.get(key, {})
            if roc.get("auc") is not None:
                ax.plot(roc["fpr"], roc["tpr"], label=f"{label}: AUC {roc['auc']:.3f} (n={roc['n']})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{title}, per patient")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout(); fig.savefig(out_dir / f"roc_{outcome}.png", dpi=120); plt.close(fig)
    for score, label in (("extent", "geographic extent score (0-8)"), ("brixia_global", "Brixia global score (0-18)")):
        paired = [r for r in rows if r[score] is not None]
        if paired:
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            ax.scatter([r[score] for r in paired], [r["opacity_pct"] for r in paired], s=12)
            stats = metrics[f"opacity_pct_vs_{score}"]
            r2 = f"r^2 {stats['r2']:.2f}" if stats["r2"] is not None else "r^2 n/a"
            ax.set(xlabel=label, ylabel="predicted opacity %", title=f"{r2}, n={stats['n']}")
            fig.tight_layout(); fig.savefig(out_dir / f"scatter_{score}.png", dpi=120); plt.close(fig)


def print_table(metrics: dict) -> None:
    lines = [f"images evaluated: {metrics['images']}"]
    if "lung_dice" in metrics:
        d = metrics["lung_dice"]
        lines.append(f"lung Dice (n={d['n']}): both {d['lung_dice']:.4f}  right {d['right_lung_dice']:.4f}  left {d['left_lung_dice']:.4f}")
    if "opacity_vs_polygons" in metrics:
        o = metrics["opacity_vs_polygons"]
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"opacity vs polygons (n={o['n']}, {o['n_nonempty_truth']} with opacity): "
                     f"IoU mean {fmt(o['iou_mean'])} / non-empty {fmt(o['iou_mean_nonempty'])} / pooled {fmt(o['iou_pooled'])}; "
                     f"Dice mean {fmt(o['dice_mean'])} / pooled {fmt(o['dice_pooled'])}; opacity % MAE {o['opacity_pct_mae']:.2f}")
    for score in ("extent", "brixia_global"):
        c = metrics.get(f"opacity_pct_vs_{score}")
        if c and c["r2"] is not None:
            lines.append(f"opacity % vs {score} (n={c['n']}): r^2 {c['r2']:.3f}  Spearman {c['spearman_rho']:.3f}")
    for rater in ("senior", "junior"):
        for figure, key in (("expected opacity %", f"zone_auc_{rater}"), ("opacity area %", f"zone_auc_area_{rater}")):
            z = metrics.get(key)
            if z and z["pooled"] is not None:
                lines.append(f"zone AUC for score >= 1 by {figure}, {rater} (zones={z['zones']}): pooled {z['pooled']:.3f}; "
                             + " ".join(f"{k} {z[k]:.2f}" for k in ZONES if z[k] is not None))
    if "zones_scored_0_by_both" in metrics:
        c = metrics["zones_scored_0_by_both"]
        lines.append(f"zones both raters scored 0 (n={c['zones']}): median opacity {c['median_opacity_pct']:.2f} %, "
                     f"{100 * c['share_over_5_pct']:.0f} % of them over 5 %")
    for name, figures in metrics.get("brixia", {}).items():
        lines.append(f"Brixia {name.replace('_', ' ')} (n={figures['images']}): zone MAE {figures['zone_mae']:.2f}, "
                     f"global MAE {figures['global_mae']:.2f}, linear kappa "
                     + " ".join(f"{z} {k:.2f}" for z, k in figures["zone_kappa_linear"].items()))
    for outcome in ("icu", "mortality"):
        for source in ("opacity_pct", "brixia_global", "extent_score", "projection_ap"):
            roc = metrics.get(f"auc_{outcome}_{source}", {})
            if roc.get("auc") is not None:
                lines.append(f"AUC {outcome} by {source} (patients={roc['n']}, positive={roc['positives']}): {roc['auc']:.3f}")
    print("\n".join(lines))


def evaluate(data_dir: Path, out_dir: Path, pipeline: Pipeline, split: str = "all") -> dict:
    """Run the pipeline over the folder (or one split of the project's own data) and score it."""
    out_dir = Path(out_dir)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    records = load_records(data_dir)
    if split != "all":
        known = read_split()
        records = [r for r in records if known.get(r.filename) == split]
    rows = []
    for record in tqdm(records, desc="evaluate"):
        gray = read_gray(record.image_path)
        seg = pipeline.segment(gray)
        row = score_image(record, seg)
        rows.append(row)
        if record.labelme_path or row.get("lung_dice", 1.0) < 0.85:
            truth = rasterize_labelme(record.labelme_path, gray.shape)["opacity"] if record.labelme_path else None
            cv2.imwrite(str(out_dir / "overlays" / f"{Path(record.filename).stem}.png"), overlay(gray, seg, truth))
    return write_report(rows, out_dir, {"split": split, "model_version": pipeline.version})


def write_report(rows: list[dict], out_dir: Path, about: dict) -> dict:
    """metrics.json, per_image.csv (zone columns: opacity area % and expected opacity % of Brixia zones
    A-F), ROC and scatter PNGs, and the table on stdout."""
    metrics = summarize(rows)
    metrics.update(about)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    zone_columns = {f"zone_{z}_{name}": (figure, z) for figure, name in
                    (("zone_opacity_pct", "opacity_pct"), ("zone_opacity_score", "expected_opacity_pct")) for z in ZONES}
    with open(out_dir / "per_image.csv", "w", newline="") as handle:
        columns = ["filename", "patient", "view", "inverted", "opacity_pct", *zone_columns, "lung_dice",
                   "labelme_opacity_pct", "opacity_pct_abs_error", "extent", "brixia_global", "went_icu", "survival"]
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(dict(r, **{c: r[figure][z] for c, (figure, z) in zone_columns.items()}) for r in rows)
    plot_curves(metrics, rows, out_dir)
    print_table(metrics)
    return metrics


def score_locked_test(cxr_dir: Path, quex_dir: Path, pipeline: Pipeline, out_path: Path,
                      sheet_path: Path | None = None, sheet_images: int = 24) -> dict:
    """The locked test set (model/locked_test.csv) scored by `pipeline`, written as evidence (one row per
    image, no masks; `patient` the merged key), and a contact sheet of the overlays of `sheet_images`
    seeded random locked images. To be run once, with the shipped model."""
    import tempfile

    from model.data import load_quex_records
    from model.evidence import score_quex_image
    from model.patients import image_id, read_locked

    locked = read_locked()
    doc = {"about": {"model_version": pipeline.version, "set": "locked test (model/locked_test.csv)"},
           "cohen": [], "quex": []}
    cohen = [r for r in load_records(cxr_dir) if image_id("cxr", r.filename) in locked]
    quex = [q for q in load_quex_records(quex_dir) if image_id("qu-ex", q.filename) in locked]
    names = sorted([image_id("cxr", r.filename) for r in cohen] + [image_id("qu-ex", q.filename) for q in quex])
    sheet = {names[i] for i in np.random.default_rng(20261130).permutation(len(names))[:sheet_images]}
    with tempfile.TemporaryDirectory() as overlays:
        def draw(name, gray, seg, truth):
            if name in sheet:
                cv2.imwrite(str(Path(overlays) / f"{name.replace('/', '_')}.png"), overlay(gray, seg, truth))

        for record in tqdm(cohen, desc="locked cxr"):
            gray = read_gray(record.image_path)
            seg = pipeline.segment(gray)
            doc["cohen"].append(dict(score_image(record, seg), patient=locked[image_id("cxr", record.filename)]))
            truth = rasterize_labelme(record.labelme_path, gray.shape)["opacity"] if record.labelme_path else None
            draw(image_id("cxr", record.filename), gray, seg, truth)
        for record in tqdm(quex, desc="locked qu-ex"):
            gray = read_gray(record.image_path)
            seg = pipeline.segment(gray)
            doc["quex"].append(dict(score_quex_image(record, seg), patient=locked[image_id("qu-ex", record.filename)]))
            truth = read_gray(record.infection_mask_path) > 127 if record.infection_mask_path else None
            draw(image_id("qu-ex", record.filename), gray, seg, truth)
        if sheet_path:
            contact_sheet(Path(overlays), Path(sheet_path))
    Path(out_path).write_text(json.dumps(doc, default=float, indent=0) + "\n")
    return doc
