"""Training: `cxr-node train --data DIR --out DIR` runs every stage, the cross-validation and the
ablation, trains the shipped models on everything and exports them with the recipe in their manifest.

Modules: recipe (the choices, as data), samples, losses, loop (resumable fit), stages (lungs, opacity
A on QU-Ex, opacity B on the Cohen collection), crossval (folds by patient, scoring, ablation), report.
Every stage checkpoints each epoch; rerunning the same command resumes where it stopped.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from model.training.recipe import Recipe

__all__ = ["Recipe", "run", "cross_validated_report"]


@dataclass
class Inputs:
    """What every stage reads: the lung model and the opacity samples of both collections."""
    lungs: object
    records: list
    quex_records: list
    quex: object
    cohen: object


def prepare(data_dir: Path, quex_dir: Path, out_dir: Path, recipe: Recipe) -> Inputs:
    from model.data import load_quex_records, load_records
    from model.training.samples import cached, cohen_samples, quex_samples
    from model.training.stages import keras_pipeline, lung_model

    from model.patients import held_out, image_id, merged_patients

    lungs = lung_model(data_dir, out_dir, recipe)
    lung_pipeline = keras_pipeline(lungs)
    size = recipe.opacity_size
    records, quex_records = load_records(data_dir), load_quex_records(quex_dir)
    # The locked test set's merged patients (model/locked_test.csv) train nothing and enter no fold.
    held = held_out(merged_patients(records, quex_records))
    records = [r for r in records if image_id("cxr", r.filename) not in held]
    quex_records = [q for q in quex_records if image_id("qu-ex", q.filename) not in held]
    # The crops follow the lung model's lungs, so retrained lungs get caches of their own.
    tag = f"{size}-retrained-lungs" if recipe.retrain_lungs else str(size)
    quex = cached(out_dir / "cache" / f"quex-{tag}.npz", lambda: quex_samples(quex_records, lung_pipeline, size))
    labelled = [r for r in records if r.extent is not None or r.brixia_zones or r.labelme_path]
    cohen = cached(out_dir / "cache" / f"cohen-{tag}.npz", lambda: cohen_samples(labelled, lung_pipeline, size))
    return Inputs(lungs, records, quex_records, quex, cohen)


def report_cross_validation(inputs: Inputs, stage_a, out_dir: Path, recipe: Recipe):
    """Cross-validate every variant (training the fold models a run does not have yet), write
    ablation.json, the shipped variant's report in out_dir/cv and its contact sheet, print the table;
    return (and write to out_dir/cv/brixia.json) the Brixia mapping fitted on the shipped variant's
    cross-validated rows."""
    from model.brixia import BrixiaMapping, mean_rater_zone_scores
    from model.evaluate import contact_sheet, summarize, write_report
    from model.patients import image_id, merged_patients
    from model.training.crossval import brixia_from_zone_opacity, cross_validate
    from model.training.recipe import VARIANTS
    from model.training.report import ablation_table

    shipped = recipe.shipped
    results = cross_validate(inputs.records, inputs.quex_records, inputs.lungs, stage_a, inputs.cohen, inputs.quex,
                             out_dir, recipe, sheet_variant=shipped)
    patients = merged_patients(inputs.records, inputs.quex_records)
    for variant_rows in results.values():  # bootstrap intervals resample merged patients
        for row in variant_rows:
            row["patient"] = patients[image_id("cxr", row["filename"])]
    ablation, rows = {}, {}
    for variant in VARIANTS:
        rows[variant] = brixia_from_zone_opacity(results[variant])
        ablation[variant] = summarize(rows[variant])
    (out_dir / "ablation.json").write_text(json.dumps(ablation, indent=1))
    (out_dir / "cv").mkdir(exist_ok=True)
    write_report(rows[shipped], out_dir / "cv", {
        "cross_validated": f"{recipe.folds}-fold by patient", "variant": shipped, "model_version": recipe.version})
    contact_sheet(out_dir / "contact-sheet", out_dir / "cv" / "contact-sheet.png")
    (out_dir / "evidence").mkdir(exist_ok=True)  # committed to model/evidence/ with the weights it scored
    (out_dir / "evidence" / "cv.json").write_text(json.dumps({
        "about": {"cross_validated": f"{recipe.folds}-fold by merged patient", "variant": shipped,
                  "model_version": recipe.version}, "cohen": rows[shipped]}, default=float) + "\n")
    print(ablation_table(ablation))
    brixia = BrixiaMapping.fit(*mean_rater_zone_scores(results[shipped]))
    brixia.save(out_dir / "cv" / "brixia.json")
    return brixia


def with_cohen_twins(inputs: Inputs) -> set[str]:
    """QU-Ex filenames whose merged patient holds a Cohen image: stage A never sees them, so it is a
    fair start for every cross-validation fold."""
    from model.patients import image_id, merged_patients

    patients = merged_patients(inputs.records, inputs.quex_records)
    cohen = {patients[image_id("cxr", r.filename)] for r in inputs.records}
    return {q.filename for q in inputs.quex_records if patients[image_id("qu-ex", q.filename)] in cohen}


def provenance(inputs: Inputs) -> dict:
    """What the manifest records of a model's making: the data version (sha256 of the sorted training
    image lists and of the locked test list) and the code commit."""
    import hashlib
    import subprocess

    from model.patients import LOCKED_FILE

    listing = "\n".join(sorted([f"cxr/{r.filename}" for r in inputs.records] +
                               [f"qu-ex/{q.filename}" for q in inputs.quex_records]))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"data_version": hashlib.sha256(listing.encode() + LOCKED_FILE.read_bytes()).hexdigest(),
            "code_commit": commit or "unknown"}


def run(data_dir: Path, out_dir: Path, recipe: Recipe = Recipe(), quex_dir: Path | None = None) -> Path:
    from model.export import export_onnx, round_weights_to_float16, write_manifest
    from model.infer import WEIGHTS_DIR
    from model.training.report import plot_history
    from model.training.crossval import stage_b_tag
    from model.training.recipe import VARIANTS
    from model.training.stages import cohen_stage, quex_stage, without_polygons

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.json").write_text(json.dumps(recipe.as_dict(), indent=1))
    inputs = prepare(data_dir, Path(quex_dir) if quex_dir else data_dir.parent / "covid-qu-ex", out_dir, recipe)
    twins = with_cohen_twins(inputs)
    stage_a = quex_stage(inputs.lungs, inputs.quex.subset([n not in twins for n in inputs.quex.names]),
                         out_dir / "opacity-A", recipe)
    brixia = report_cross_validation(inputs, stage_a, out_dir, recipe)

    if recipe.shipped == VARIANTS[0]:  # stage A alone: the model the cross-validation scored
        final, final_dir = stage_a, None
    else:
        polygons = recipe.shipped == VARIANTS[2]
        final_dir = out_dir / f"final-{stage_b_tag(polygons)}"
        final = cohen_stage(inputs.lungs, out_dir / "opacity-A" / "final.h5",
                            inputs.cohen if polygons else without_polygons(inputs.cohen), inputs.quex, final_dir,
                            recipe, desc="opacity final")
    plot_history(out_dir / "opacity-A", final_dir, out_dir / "training-curves.png")

    weights = out_dir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    if recipe.retrain_lungs:
        round_weights_to_float16(inputs.lungs)
        export_onnx(inputs.lungs, weights / "lungs.onnx")
    else:
        shutil.copy(WEIGHTS_DIR / "lungs.onnx", weights / "lungs.onnx")
    round_weights_to_float16(final)
    export_onnx(final, weights / "opacity.onnx")
    brixia.save(weights / "brixia.json")
    write_manifest(weights, recipe.version, {"recipe": recipe.as_dict(), **provenance(inputs)})
    print(f"weights written to {weights}; copy them to model/weights/ to ship them")
    return weights


def cross_validated_report(data_dir: Path, run_dir: Path, quex_dir: Path | None = None):
    """Re-score a finished training run's cross-validation from its fold checkpoints (no training)."""
    from model.training.crossval import fold_checkpoints
    from model.training.stages import opacity_model_from

    data_dir, run_dir = Path(data_dir), Path(run_dir)
    recipe = Recipe(**json.loads((run_dir / "recipe.json").read_text()))
    missing = [str(p) for p in [run_dir / "opacity-A" / "final.h5", *fold_checkpoints(run_dir, recipe)] if not p.exists()]
    if missing:
        raise SystemExit(f"{run_dir} is not a finished training run; missing: {', '.join(missing)}")
    inputs = prepare(data_dir, Path(quex_dir) if quex_dir else data_dir.parent / "covid-qu-ex", run_dir, recipe)
    stage_a = opacity_model_from(inputs.lungs, recipe.opacity_size, run_dir / "opacity-A" / "final.h5")
    return report_cross_validation(inputs, stage_a, run_dir, recipe)
