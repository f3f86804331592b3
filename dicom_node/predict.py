"""`cxr-node predict`: masks and opacity percentages for image files, with the same frontal-chest
decision `serve` makes (tags, then descriptions, then the image for DICOM; the image for PNG/JPEG)."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pydicom
from tqdm import tqdm

from dicom_node import filter as chest_filter
from dicom_node.pixels import dataset_gray, is_dicom
from model.image import read_gray
from model.infer import ZONE_NAMES, ZONES, Pipeline

ZONE_COLUMNS = [f"{ZONE_NAMES[z].replace(' ', '_')}_opacity_pct" for z in ZONES]
BRIXIA_COLUMNS = [f"brixia_{z}" for z in ZONES] + ["brixia_global"]
COLUMNS = ["filename", "frontal_chest", "decided_by", "reason", "inverted", "lung_area_px", "opacity_area_px",
           "opacity_pct", "right_opacity_pct", "left_opacity_pct"] + ZONE_COLUMNS + BRIXIA_COLUMNS


def predict_file(path: Path, pipeline: Pipeline, out_dir: Path) -> dict:
    """One file -> its predictions.csv row. A frontal chest also gets <stem>_lung.png and
    <stem>_opacity.png (0/255, the input's size); anything else only its decision, as `serve` skips it.
    Raises OSError/ValueError for a file that cannot be read."""
    decision = chest_filter.Decision(None, "", "image")
    if is_dicom(path):
        ds = pydicom.dcmread(path, force=True)
        decision = chest_filter.by_tags(ds)
        if decision.frontal_chest is False:
            return {"filename": path.name, "frontal_chest": 0, "decided_by": decision.decided_by, "reason": decision.reason}
        gray = dataset_gray(ds)
    else:
        gray = read_gray(path)
    seg = pipeline.segment(gray)
    decision = chest_filter.with_image(decision, seg)
    row = {"filename": path.name, "frontal_chest": int(decision.frontal_chest), "decided_by": decision.decided_by,
           "reason": decision.reason, "inverted": int(seg.inverted)}
    if not decision.frontal_chest:
        return row
    cv2.imwrite(str(out_dir / f"{path.stem}_lung.png"), ((seg.lungs > 0) * 255).astype(np.uint8))
    cv2.imwrite(str(out_dir / f"{path.stem}_opacity.png"), (seg.opacity * 255).astype(np.uint8))
    row.update({"lung_area_px": seg.lung_area_px, "opacity_area_px": seg.opacity_area_px,
                "opacity_pct": round(seg.opacity_pct, 3), "right_opacity_pct": round(seg.right_opacity_pct, 3),
                "left_opacity_pct": round(seg.left_opacity_pct, 3)})
    row.update({column: round(seg.zone_opacity_pct[z], 3) for column, z in zip(ZONE_COLUMNS, ZONES)})
    if seg.brixia:
        row.update({f"brixia_{z}": seg.brixia[z] for z in ZONES}, brixia_global=seg.brixia_global)
    return row


def predict_files(paths: list[Path], pipeline: Pipeline, out_dir: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every readable file -> a row of out_dir/predictions.csv (zone columns: Brixia zones A-F, their
    opacity % and their Brixia score 0-3, and the global Brixia score 0-18;
    `inverted`: the pixels were read inverted because their lungs showed more clearly that way).
    Returns the rows and the (file, error) pairs of files that could not be read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    for path in tqdm(paths, desc="predict"):
        try:
            rows.append(predict_file(Path(path), pipeline, out_dir))
        except (OSError, ValueError) as error:  # UnusableImage is a ValueError
            failures.append((Path(path), str(error)))
    with open(out_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows, failures
