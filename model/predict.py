"""`cxr-node predict`: masks and opacity percentages for image files."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from tqdm import tqdm

from model.infer import Pipeline
from model.lungs import ZONE_NAMES, ZONES

ZONE_COLUMNS = [f"{ZONE_NAMES[z].replace(' ', '_')}_opacity_pct" for z in ZONES]
COLUMNS = ["filename", "lung_area_px", "opacity_area_px", "opacity_pct", "right_opacity_pct",
           "left_opacity_pct"] + ZONE_COLUMNS


def predict_images(images: Iterable[tuple[str, np.ndarray]], pipeline: Pipeline, out_dir: Path) -> list[dict]:
    """(filename, gray image) pairs -> <stem>_lung.png, <stem>_opacity.png (0/255, the input's size)
    and predictions.csv in out_dir (zone columns are the Brixia zones A-F)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for filename, gray in tqdm(images, desc="predict"):
        seg = pipeline.segment(gray)
        stem = Path(filename).stem
        cv2.imwrite(str(out_dir / f"{stem}_lung.png"), ((seg.lungs > 0) * 255).astype(np.uint8))
        cv2.imwrite(str(out_dir / f"{stem}_opacity.png"), (seg.opacity * 255).astype(np.uint8))
        row = {"filename": filename, "lung_area_px": seg.lung_area_px, "opacity_area_px": seg.opacity_area_px,
               "opacity_pct": round(seg.opacity_pct, 3), "right_opacity_pct": round(seg.right_opacity_pct, 3),
               "left_opacity_pct": round(seg.left_opacity_pct, 3)}
        row.update({column: round(seg.zone_opacity_pct[z], 3) for column, z in zip(ZONE_COLUMNS, ZONES)})
        rows.append(row)
    with open(out_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows
