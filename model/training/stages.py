"""The stages: lungs (whole image), opacity stage A (QU-Ex pixels) and stage B (Cohen collection)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from model import network
from model.data import load_records, read_split
from model.infer import WEIGHTS_DIR, Pipeline
from model.training.losses import lung_loss, opacity_loss
from model.training.loop import SWAP_RIGHT_LEFT, Trainer, fit, lung_batch, opacity_batch, setup
from model.training.recipe import Recipe
from model.training.samples import WEIGHT, Samples, lung_samples

tf = network.tf


def keras_runner(model):
    return lambda batch: np.asarray(model(batch, training=False))


def keras_pipeline(lung_model, opacity_model=None) -> Pipeline:
    return Pipeline(keras_runner(lung_model), opacity_model and keras_runner(opacity_model),
                    lung_size=lung_model.input_shape[1],
                    opacity_size=opacity_model.input_shape[1] if opacity_model else 0)


def split_records(records, split):
    by_split = {"train": [], "val": [], "test": []}
    for record in records:
        by_split[split.get(record.filename, "test")].append(record)  # unknown images never train
    return by_split


def lung_model(data_dir: Path, out_dir: Path, recipe: Recipe):
    """Right and left lung on the whole image (V7 masks: retrocardiac lung included): trained on the
    train split, best validation loss kept; or the shipped lungs, which this stage trained."""
    if not recipe.retrain_lungs:
        model = network.build_unet(recipe.lung_size, 2)
        network.load_onnx_weights(model, WEIGHTS_DIR / "lungs.onnx")
        return model
    setup(recipe.seed)  # before the model is built: its initial weights are drawn from the seed
    model = network.build_unet(recipe.lung_size, 2)
    parts = split_records([r for r in load_records(data_dir) if r.lung_mask_path], read_split())
    train, val = (lung_samples(parts[name], recipe.lung_size) for name in ("train", "val"))
    steps = recipe.lung_epochs * (len(train) // recipe.batch_size)
    schedule = tf.keras.optimizers.schedules.CosineDecay(recipe.lung_learning_rate, steps, alpha=0.05)
    fit(Trainer(model, lung_loss, schedule), train, val, lung_batch, recipe.lung_epochs, out_dir / "lungs",
        recipe.seed, flip_lut=SWAP_RIGHT_LEFT, desc="lungs", keep_best=True)
    return model


def opacity_model_from(lungs, size: int, weights: Path | None = None):
    """Opacity U-Net initialised from the lung model (no ImageNet weights here), or from `weights`."""
    model = network.build_unet(size, 1)
    network.copy_matching_weights(lungs, model)
    if weights is not None:
        model.load_weights(str(weights))
    return model


def quex_stage(lungs, quex: Samples, out_dir: Path, recipe: Recipe):
    """Stage A: pixel supervision from QU-Ex infection masks and normals, from the lung model."""
    setup(recipe.seed)
    model = opacity_model_from(lungs, recipe.opacity_size)
    steps = recipe.quex_epochs * (len(quex) // recipe.batch_size)
    schedule = tf.keras.optimizers.schedules.CosineDecay(recipe.quex_learning_rate, steps, alpha=0.05)
    fit(Trainer(model, opacity_loss(recipe), schedule), quex, None, opacity_batch, recipe.quex_epochs, out_dir,
        recipe.seed, batch_size=recipe.batch_size, desc="opacity A (QU-Ex)",
        films_from_elsewhere=recipe.films_from_elsewhere)
    return model


def without_polygons(cohen: Samples) -> Samples:
    """The same images with their polygons unused (pixel weights 0); images left with no label dropped."""
    kept = Samples()
    for image, masks, labels, name in zip(cohen.images, cohen.masks, cohen.labels, cohen.names):
        if labels["extent"][0] < 0 and labels["zone_score"][0] < 0:
            continue
        masks = list(masks)
        masks[WEIGHT] = np.zeros_like(masks[WEIGHT])
        kept.add(image, masks, dict(labels, polygons=np.float32(0)), name)
    return kept


def cohen_stage(lungs, start: Path, cohen: Samples, quex: Samples, out_dir: Path, recipe: Recipe, desc: str):
    """Stage B: from stage A's weights, the Cohen images' labels (polygon images repeated), mixed with
    as many QU-Ex images; a fixed schedule, so nothing is selected on held-out data."""
    setup(recipe.seed)
    polygon_images = cohen.subset([labels["polygons"] > 0 for labels in cohen.labels])
    mixed = cohen + sum([polygon_images] * (recipe.polygon_repeats - 1), Samples())
    draw = np.random.default_rng(recipe.seed).permutation(len(quex))[:len(mixed)]
    mixed = mixed + quex.subset(np.isin(np.arange(len(quex)), draw))
    model = opacity_model_from(lungs, recipe.opacity_size, start)
    fit(Trainer(model, opacity_loss(recipe), recipe.cohen_learning_rate), mixed, None, opacity_batch,
        recipe.cohen_epochs, out_dir, recipe.seed, batch_size=recipe.batch_size, desc=desc,
        films_from_elsewhere=recipe.films_from_elsewhere)
    return model
