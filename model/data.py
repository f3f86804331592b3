"""The annotated data set (laid out like ../shared/data/cxr) -> arrays, and the patient split.

Any subset of the annotation columns may be present; an absent or empty cell means "not known".
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from model.lungs import split_right_left

SPLIT_FILE = Path(__file__).parent / "split.csv"
SUPERSAMPLE = 4  # polygon rasterisation grid per pixel
IGNORE = 127  # V7 mask value for pacemakers, markup: excluded from losses and metrics
# Extent score per lung 0-4 (none, <25, 25-50, 50-75, >75 % involved) -> fraction at the bin middle.
EXTENT_FRACTIONS = np.array([0.0, 0.125, 0.375, 0.625, 0.875])


@dataclass
class Record:
    """One row of images.csv with paths resolved and scores parsed."""
    filename: str
    image_path: Path
    patient: str
    row: dict
    lung_mask_path: Path | None
    labelme_path: Path | None
    extent: float | None           # geographic extent 0-8, both lungs
    brixia_zones: dict | None      # senior radiologist, zone letter -> 0..3
    brixia_global: float | None

    @property
    def opacity_fraction_from_extent(self) -> float | None:
        """Extent score -> expected opacity fraction of the lungs (both lungs assumed alike)."""
        if self.extent is None:
            return None
        return float(np.interp(self.extent / 2, np.arange(5), EXTENT_FRACTIONS))


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def load_records(data_dir: Path) -> list[Record]:
    data_dir = Path(data_dir)
    brixia = {}
    if (data_dir / "brixia-scores.csv").exists():
        with open(data_dir / "brixia-scores.csv") as handle:
            for row in csv.DictReader(handle):
                zones = {z: _number(row.get(f"S-{z}")) for z in "ABCDEF"}
                if all(v is not None for v in zones.values()):
                    brixia[row["filename"]] = zones
    records = []
    with open(data_dir / "images.csv") as handle:
        for row in csv.DictReader(handle):
            def path(column, folder=None):
                value = row.get(column) or ""
                if not value:
                    return None
                candidate = data_dir / value
                return candidate if candidate.exists() else data_dir / folder / value if folder else None
            records.append(Record(
                filename=row["filename"],
                image_path=data_dir / "images" / row["filename"],
                # Images without a patient id are each their own patient.
                patient=row.get("patientid") or f"image:{row['filename']}",
                row=row,
                lung_mask_path=path("lung_mask_v7"),
                labelme_path=path("opacity_labelme", "opacity-labelme"),
                extent=_number(row.get("severity_geographic_extent")),
                brixia_zones=brixia.get(row["filename"]),
                brixia_global=_number(row.get("brixia_senior_global")),
            ))
    return records


def read_gray(path: Path) -> np.ndarray:
    """Any PNG/JPEG mode (gray, RGB, RGBA, palette, 16-bit) -> one uint8 gray channel."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"cannot read image {path}")
    return image


def normalize_gray(gray: np.ndarray) -> np.ndarray:
    """Any bit depth -> uint8 with the 0.5-99.5 percentile range stretched to 0-255, so 8-bit photos
    and 15-bit DICOM reach the models alike. Training and inference both use it."""
    gray = gray.astype(np.float32)
    low, high = np.percentile(gray, (0.5, 99.5))
    if high <= low:
        return np.zeros(gray.shape, np.uint8)
    return np.round(np.clip((gray - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def read_lung_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """V7 mask -> (label map 0/1/2 for background/right/left, ignore mask)."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return split_right_left(mask == 255), mask == IGNORE


def rasterize_labelme(path: Path, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """labelme JSON file -> {'right_lung', 'left_lung', 'opacity'} boolean masks at `shape`."""
    return rasterize_labelme_doc(json.loads(Path(path).read_text()), shape)


def rasterize_labelme_doc(doc: dict, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Parsed labelme document -> masks; points are scaled when the image was resized after
    annotation (imageHeight/Width differ from `shape`)."""
    sy, sx = shape[0] / doc["imageHeight"], shape[1] / doc["imageWidth"]
    height, width = shape
    fine = {name: np.zeros((height * SUPERSAMPLE, width * SUPERSAMPLE), np.uint8)
            for name in ("right_lung", "left_lung", "opacity")}
    for shape_doc in doc["shapes"]:
        if shape_doc["label"] not in fine or shape_doc.get("shape_type", "polygon") != "polygon":
            continue
        # labelme points are continuous (pixel i spans [i, i+1)); fillPoly puts integers at pixel
        # centres, hence the half-pixel shift. Filling at 4x then averaging removes the bias of
        # fillPoly counting every pixel an edge touches.
        points = (np.array(shape_doc["points"], np.float64) * (sx, sy) * SUPERSAMPLE - 0.5) * 16
        cv2.fillPoly(fine[shape_doc["label"]], [np.round(points).astype(np.int32)], 255, shift=4)
    masks = {name: cv2.resize(mask, (width, height), interpolation=cv2.INTER_AREA) >= 128
             for name, mask in fine.items()}
    return masks


def make_split(records: list[Record], seed: int = 20201, fractions=(0.7, 0.15, 0.15)) -> dict[str, str]:
    """Patient -> 'train' | 'val' | 'test', by a seeded hash of the patient id (stable as data grows)."""
    split = {}
    for patient in sorted({r.patient for r in records}):
        draw = int(hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        split[patient] = "train" if draw < fractions[0] else "val" if draw < fractions[0] + fractions[1] else "test"
    return split


def write_split(records: list[Record], path: Path = SPLIT_FILE) -> None:
    split = make_split(records)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "patient", "split"])
        for r in sorted(records, key=lambda r: r.filename):
            writer.writerow([r.filename, r.patient, split[r.patient]])


def read_split(path: Path = SPLIT_FILE) -> dict[str, str]:
    """filename -> split, from the committed split file."""
    with open(path) as handle:
        return {row["filename"]: row["split"] for row in csv.DictReader(handle)}
