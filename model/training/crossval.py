"""Cross-validation by patient over the Cohen collection, and the ablation of opacity supervision.

Every Cohen image is scored by a model that never saw its patient: stage A never sees a Cohen image
(the QU-Ex rows that duplicate one are left out of it), so it is a fair start for every fold; stage B
of fold k trains on the other folds' labels and on QU-Ex rows that do not duplicate a fold-k image.
Patients are merged patients (`model.patients`: ids joined by twin films across both collections);
the locked test set's patients are in no fold and train no fold model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from model.brixia import BrixiaMapping, mean_rater_zone_scores
from model.data import QuexRecord, Record, rasterize_labelme
from model.patients import held_out, image_id, merged_patients
from model.patients import patient_folds as merged_patient_folds
from model.image import read_gray
from model.evaluate import overlay, score_image
from model.training.recipe import VARIANTS, Recipe
from model.training.samples import Samples
from model.training.stages import cohen_stage, keras_pipeline, without_polygons

CONTACT_SHEET_IMAGES = 24


def patient_folds(records: list[Record], folds: int, seed: int, quex_records=(), locked=None) -> dict[str, int]:
    """Cohen filename -> fold, by merged patient (a seeded permutation of the sorted merged keys of
    the patients with no locked image); images of the locked test set's patients have no fold."""
    patients = merged_patients(records, quex_records)
    cohen = {image_id("cxr", r.filename): r.filename for r in records}
    fold_of = merged_patient_folds({i: patients[i] for i in cohen}, folds, seed, locked)
    return {name: fold_of[patients[i]] for i, name in cohen.items() if patients[i] in fold_of}


class CachedRunner:
    """A model runner that remembers its answers: every variant and fold sees the same lungs."""

    def __init__(self, runner):
        self.runner, self.memo = runner, {}

    def __call__(self, batch):
        key = hashlib.sha1(batch.tobytes()).digest()
        if key not in self.memo:
            self.memo[key] = self.runner(batch)
        return self.memo[key]


def score_records(records: list[Record], pipeline, grays: dict, fold: int, sheet: set, sheet_dir: Path | None) -> list[dict]:
    rows = []
    for record in records:
        if record.filename not in grays:  # each image is read once for all variants and folds
            grays[record.filename] = read_gray(record.image_path)
        gray = grays[record.filename]
        seg = pipeline.segment(gray)
        rows.append(dict(score_image(record, seg), fold=fold))
        if sheet_dir is not None and record.filename in sheet:
            truth = rasterize_labelme(record.labelme_path, gray.shape)["opacity"] if record.labelme_path else None
            cv2.imwrite(str(sheet_dir / f"{Path(record.filename).stem}.png"), overlay(gray, seg, truth))
    return rows


def stage_b_tag(uses_polygons: bool) -> str:
    """Folder tag of stage B models, by whether they learnt from the polygons' pixels."""
    return "B-polygons" if uses_polygons else "B-weak"


def fold_checkpoints(out_dir: Path, recipe: Recipe) -> list[Path]:
    """The stage B weights of every fold of every variant that trains one."""
    return [out_dir / f"cv-{stage_b_tag(polygons)}-fold{k}" / "final.h5" for polygons in (False, True)
            for k in range(recipe.folds)]


def cross_validate(records: list[Record], quex_records: list[QuexRecord], lungs, stage_a, cohen: Samples,
                   quex: Samples, out_dir: Path, recipe: Recipe, sheet_variant: str) -> dict[str, list[dict]]:
    """Per variant, one scored row per Cohen image (from the fold model that never saw its patient);
    overlays of 24 seeded random images of `sheet_variant` in out_dir/contact-sheet. Fold models are
    checkpointed in out_dir, so a rerun only scores."""
    fold_of_name = patient_folds(records, recipe.folds, recipe.seed, quex_records)  # locked images: none
    patients = merged_patients(records, quex_records)
    fold_of_patient = {patients[image_id("cxr", name)]: k for name, k in fold_of_name.items()}
    held = held_out(patients)
    # A QU-Ex row trains fold k unless its merged patient is in fold k or held out for the locked test.
    quex_fold = {q.filename: -2 if image_id("qu-ex", q.filename) in held
                 else fold_of_patient.get(patients[image_id("qu-ex", q.filename)], -1) for q in quex_records}
    stage_a_path = out_dir / "opacity-A" / "final.h5"
    lung_runner = CachedRunner(keras_pipeline(lungs).lung_runner)
    grays: dict = {}
    with_lungs = [r for r in records if r.lung_mask_path]
    sheet = {with_lungs[i].filename for i in np.random.default_rng(recipe.seed).permutation(len(with_lungs))[:CONTACT_SHEET_IMAGES]}
    results = {}
    for variant in VARIANTS:
        rows = []
        sheet_dir = out_dir / "contact-sheet" if variant == sheet_variant else None
        if sheet_dir:
            sheet_dir.mkdir(parents=True, exist_ok=True)
        for k in tqdm(range(recipe.folds), desc=f"CV {variant}"):
            if variant == "QU-Ex only":
                model = stage_a
            else:
                polygons = variant == VARIANTS[2]
                train = cohen.subset([fold_of_name.get(n, k) != k for n in cohen.names])
                train = train if polygons else without_polygons(train)
                quex_k = quex.subset([quex_fold.get(n, -1) not in (k, -2) for n in quex.names])
                model = cohen_stage(lungs, stage_a_path, train, quex_k, out_dir / f"cv-{stage_b_tag(polygons)}-fold{k}",
                                    recipe, desc=f"{variant} fold {k}")
            pipeline = keras_pipeline(lungs, model)
            pipeline.lung_runner = lung_runner
            rows += score_records([r for r in records if fold_of_name.get(r.filename) == k], pipeline, grays, k, sheet,
                                  sheet_dir)
        results[variant] = rows
        (out_dir / "cv_rows.json").write_text(json.dumps(results, default=float))
    return results


def brixia_from_zone_opacity(rows: list[dict]) -> list[dict]:
    """Every row with `brixia_predicted` {zone: score} and `brixia_global_predicted` added, the images of
    fold k scored by a mapping fitted on the other folds' cross-validated rows only (nested: no image's
    scores shape its own prediction)."""
    scored = [r for r in rows if r.get("brixia_zones")]
    out = []
    for k in sorted({r["fold"] for r in rows}):
        mapping = BrixiaMapping.fit(*mean_rater_zone_scores([r for r in scored if r["fold"] != k]))
        for r in rows:
            if r["fold"] == k:
                zones = mapping.zone_scores(r["zone_opacity_score"])
                out.append(dict(r, brixia_predicted=zones, brixia_global_predicted=sum(zones.values())))
    return out
