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
    brixia_junior_zones: dict | None = None  # junior radiologist, same scale

    @property
    def extent_interval(self) -> tuple[float, float] | None:
        """Extent score (0-8, per lung 0 none, 1 <25 %, 2 25-50, 3 50-75, 4 >75 % involved) -> the
        interval the opacity fraction of both lungs lies in, lungs weighted alike: each lung scored s
        holds ((s-1)/4, s/4], so the sum e bounds the mean by ((e-2)/8, e/8]."""
        if self.extent is None:
            return None
        return max(0.0, (self.extent - 2) / 8), self.extent / 8


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def load_records(data_dir: Path) -> list[Record]:
    data_dir = Path(data_dir)
    brixia = {}  # (filename, "S" senior | "J" junior) -> zone letter -> score
    if (data_dir / "brixia-scores.csv").exists():
        with open(data_dir / "brixia-scores.csv") as handle:
            for row in csv.DictReader(handle):
                for rater in "SJ":
                    zones = {z: _number(row.get(f"{rater}-{z}")) for z in "ABCDEF"}
                    if all(v is not None for v in zones.values()):
                        brixia[row["filename"], rater] = zones
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
                # Images without a patient id are each their own patient. A raw id, not a patient key:
                # model.patients merges the ids of twin films.
                patient=row.get("patientid") or f"image:{row['filename']}",
                row=row,
                lung_mask_path=path("lung_mask_v7"),
                labelme_path=path("opacity_labelme", "opacity-labelme"),
                extent=_number(row.get("severity_geographic_extent")),
                brixia_zones=brixia.get((row["filename"], "S")),
                brixia_global=_number(row.get("brixia_senior_global")),
                brixia_junior_zones=brixia.get((row["filename"], "J")),
            ))
    return records


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
    """Patient -> 'train' | 'val' | 'test', by a seeded hash of the patient id (stable as data grows).

    This is the 2.x lung model's split (split.csv), by the raw `patientid`, kept as it was. Raw ids are
    not patients: two merged patients (137 with 202, 13 with an id-less image) straddle its test and
    train parts. Cross-validation folds and the locked test set use merged patients (model.patients)."""
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


@dataclass
class QuexRecord:
    """One row of covid-qu-ex/images.csv: a 256 px radiograph, its heart-excluded lung mask and, for
    COVID-19 images, its infection mask (Normal images have none: true negatives)."""
    filename: str
    image_path: Path
    lung_mask_path: Path
    infection_mask_path: Path | None
    cohen_filename: str | None  # the ../cxr image this row duplicates, if any


def load_quex_records(quex_dir: Path) -> list[QuexRecord]:
    quex_dir = Path(quex_dir)
    with open(quex_dir / "images.csv") as handle:
        return [QuexRecord(filename=row["filename"], image_path=quex_dir / "images" / row["filename"],
                           lung_mask_path=quex_dir / row["lung_mask"],
                           infection_mask_path=quex_dir / row["infection_mask"] if row["infection_mask"] else None,
                           cohen_filename=row["cohen_filename"] or None)
                for row in csv.DictReader(handle)]
