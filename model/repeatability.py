"""How much the opacity % and the Brixia global score move when nothing about the lungs changed: the noise
a change since the prior film must beat.

- technical: the same film re-encoded as JPEG quality 70, shifted by 2 % of its size, and cropped by 3 %
  on every side, each against the film as it is (seeded random Cohen films outside the locked test);
- same day: two different films of one patient, same day (the Cohen `offset` column) and projection,
  content twins (the same film twice, `model/evidence/duplicates.csv`) counted once.

`cxr-node evaluate --data DIR --repeatability FILE` writes the per-film rows (evidence, no images) and
the change limits into the measured weights' manifest, where the node reads them; `limits` turns the
rows into 95 % limits of agreement (Bland-Altman: mean difference +- 1.96 SD)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from model.data import load_quex_records, load_records
from model.image import read_gray
from model.patients import image_id, merged_patients, read_locked

TECHNICAL_FILMS = 80
MIN_PAIRS_FOR_LIMIT = 10  # fewer pairs give limits too unstable to act on (they are still reported)
SEED = 20261130
DUPLICATES = Path(__file__).parent / "evidence" / "duplicates.csv"


def perturbations(gray: np.ndarray) -> dict[str, np.ndarray]:
    """The film as another copy of it could arrive: re-encoded, shifted, cropped."""
    height, width = gray.shape
    jpeg = cv2.imdecode(cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 70])[1], cv2.IMREAD_GRAYSCALE)
    dx, dy = round(0.02 * width), round(0.02 * height)
    shifted = cv2.warpAffine(gray, np.float32([[1, 0, dx], [0, 1, dy]]), (width, height), borderValue=0)
    cx, cy = round(0.03 * width), round(0.03 * height)
    return {"jpeg quality 70": jpeg, "shifted 2 %": shifted, "cropped 3 %": gray[cy:height - cy, cx:width - cx]}


def _figures(seg) -> dict:
    return {"opacity_pct": seg.opacity_pct, "brixia_global": seg.brixia_global}


def measure(cxr_dir: Path, quex_dir: Path, pipeline, out_path: Path) -> dict:
    records = load_records(cxr_dir)
    patients = merged_patients(records, load_quex_records(quex_dir))
    locked = read_locked()
    open_records = sorted((r for r in records if image_id("cxr", r.filename) not in locked), key=lambda r: r.filename)
    doc = {"about": {"model_version": pipeline.version, "set": "Cohen films outside the locked test"},
           "technical": [], "same_day": []}
    picked = np.random.default_rng(SEED).permutation(len(open_records))[:TECHNICAL_FILMS]
    for record in tqdm([open_records[i] for i in sorted(picked)], desc="technical repeatability"):
        gray = read_gray(record.image_path)
        base = _figures(pipeline.segment(gray))
        for name, copy in perturbations(gray).items():
            doc["technical"].append({"filename": record.filename, "patient": patients[image_id("cxr", record.filename)],
                                     "variant": name, "first": base, "second": _figures(pipeline.segment(copy))})
    twins = {frozenset((row["image_a"], row["image_b"])) for row in csv.DictReader(DUPLICATES.open())}
    metadata = {row["filename"]: row for row in csv.DictReader((cxr_dir / "metadata.csv").open())}
    days: dict[tuple, list] = {}  # (patient, day, projection) -> films, one copy of each
    for record in open_records:
        row = metadata.get(record.filename, {})
        if row.get("offset", "") == "":
            continue
        films = days.setdefault((patients[image_id("cxr", record.filename)], row["offset"], row.get("view", "")), [])
        if not any(frozenset((image_id("cxr", f.filename), image_id("cxr", record.filename))) in twins for f in films):
            films.append(record)  # a twin is the same film again: no film-to-film noise in it
    for (patient, offset, view), films in tqdm(sorted(days.items()), desc="same-day pairs"):
        for i, first in enumerate(films):
            for second in films[i + 1:]:
                doc["same_day"].append({"first_file": first.filename, "second_file": second.filename,
                                        "patient": patient, "offset_days": offset, "view": view,
                                        "first": _figures(pipeline.segment(read_gray(first.image_path))),
                                        "second": _figures(pipeline.segment(read_gray(second.image_path)))})
    Path(out_path).write_text(json.dumps(doc, default=float, indent=0) + "\n")
    return doc


def write_change_limits(doc: dict, weights_dir: Path) -> dict:
    """The change limits of `doc` into the manifest of the weights it measured."""
    manifest_path = Path(weights_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest["version"] != doc["about"]["model_version"]:
        raise ValueError(f"{manifest_path} is version {manifest['version']}, the repeatability was measured "
                         f"with {doc['about']['model_version']}")
    manifest["repeatability"] = {k: round(v, 2) for k, v in limits(doc)["change_limit"].items()}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest["repeatability"]


def limits(doc: dict) -> dict:
    """Per set (technical, each technical variant, same day) and figure: n pairs, mean difference, 95 %
    limits of agreement, median absolute difference; and `change_limit`, the larger half-width (|mean| + 1.96 SD) of the sets with at least
    MIN_PAIRS_FOR_LIMIT pairs: a change must exceed it to be reported as beyond repeatability."""
    sets = {"technical": doc["technical"], "same_day": doc["same_day"],
            **{f"technical, {variant}": [r for r in doc["technical"] if r["variant"] == variant]
               for variant in sorted({r["variant"] for r in doc["technical"]})}}
    result = {}
    for name, rows in sets.items():
        for figure in ("opacity_pct", "brixia_global"):
            pairs = [(r["first"][figure], r["second"][figure]) for r in rows
                     if r["first"][figure] is not None and r["second"][figure] is not None]
            if len(pairs) < 2:
                continue
            difference = np.array([b - a for a, b in pairs], float)
            mean, sd = float(difference.mean()), float(difference.std(ddof=1))
            result.setdefault(name, {})[figure] = {
                "n": len(pairs), "mean_difference": mean, "limits_of_agreement": [mean - 1.96 * sd, mean + 1.96 * sd],
                "half_width": 1.96 * sd + abs(mean), "median_absolute_difference": float(np.median(np.abs(difference)))}
    result["change_limit"] = {figure: max(result[name][figure]["half_width"] for name in ("technical", "same_day")
                                          if figure in result.get(name, {})
                                          and result[name][figure]["n"] >= MIN_PAIRS_FOR_LIMIT)
                              for figure in ("opacity_pct", "brixia_global")}
    return result
