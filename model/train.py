"""Training: losses, samples, a resumable loop, and the two stages (lungs, then opacity).

`cxr-node train --data DIR --out DIR` runs every stage; each stage checkpoints every epoch and a
rerun of the same command resumes where it stopped. Seeded: the same data give the same split,
the same augmentation draws and the same initial weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from model import network
from model.augment import build_augmentation, maybe_flip
from model.data import (Record, load_records, normalize_gray, read_gray, read_lung_labels, read_split,
                        rasterize_labelme)
from model.lungs import crop_box, zone_map

tf = network.tf
SEED = 20201
IGNORE_LABEL = 255
SWAP_RIGHT_LEFT = np.array([0, 2, 1] + list(range(3, 256)), np.uint8)


# ---------------------------------------------------------------- losses
def dice_focal_loss(prob, target, weight, alpha=0.25, gamma=2.0):
    """Soft Dice (per channel, pooled over the batch) + binary focal loss, both restricted to pixels
    of weight > 0. Weight 0 marks "unknown" pixels (V7 ignore label, unscored lung zones)."""
    eps = 1e-6
    p = tf.clip_by_value(prob, eps, 1 - eps)
    positive = target > 0.5
    p_true = tf.where(positive, p, 1 - p)
    alpha_true = tf.where(positive, alpha, 1 - alpha)
    focal = -alpha_true * (1 - p_true) ** gamma * tf.math.log(p_true)
    weight = tf.broadcast_to(weight, tf.shape(prob))
    focal = tf.reduce_sum(focal * weight) / (tf.reduce_sum(weight) + eps)
    intersection = tf.reduce_sum(weight * p * target, axis=(0, 1, 2))
    total = tf.reduce_sum(weight * (p + target), axis=(0, 1, 2))
    dice = 1 - (2 * intersection + 1) / (total + 1)
    return tf.reduce_mean(dice) + focal


def fraction_loss(prob, lung, fraction):
    """|predicted opacity fraction of the lungs - fraction implied by the extent score|, averaged
    over images whose score is known (fraction >= 0)."""
    predicted = tf.reduce_sum(prob[..., 0] * lung, axis=(1, 2)) / (tf.reduce_sum(lung, axis=(1, 2)) + 1)
    known = tf.cast(fraction >= 0, tf.float32)
    return tf.reduce_sum(known * tf.abs(predicted - fraction)) / (tf.reduce_sum(known) + 1e-6)


# ---------------------------------------------------------------- samples
@dataclass
class Samples:
    """Images at training size, the masks that travel with them through augmentation, and one
    image-level opacity fraction (-1 = unknown)."""
    images: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    fractions: list = field(default_factory=list)
    names: list = field(default_factory=list)

    def __len__(self):
        return len(self.images)

    def subset(self, keep):
        picked = Samples()
        for i, flag in enumerate(keep):
            if flag:
                picked.images.append(self.images[i]); picked.masks.append(self.masks[i])
                picked.fractions.append(self.fractions[i]); picked.names.append(self.names[i])
        return picked

    def __add__(self, other):
        return Samples(self.images + other.images, self.masks + other.masks,
                       self.fractions + other.fractions, self.names + other.names)


def _resize(array, size, nearest):
    return cv2.resize(array, (size, size), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def lung_samples(records: list[Record], size: int) -> Samples:
    """Whole image -> label map (0 background, 1 right, 2 left, 255 ignore)."""
    samples = Samples()
    for record in tqdm(records, desc="lung samples", leave=False):
        image = normalize_gray(read_gray(record.image_path))
        labels, ignore = read_lung_labels(record.lung_mask_path)
        labels[ignore] = IGNORE_LABEL
        samples.images.append(_resize(image, size, False))
        samples.masks.append([_resize(labels, size, True)])
        samples.fractions.append(-1.0)
        samples.names.append(record.filename)
    return samples


def opacity_samples(records: list[Record], size: int, use_polygons=True, use_zones=True,
                    use_extent=True) -> Samples:
    """Lung crop -> [opacity target, pixel weight, lung] and the extent fraction.

    Supervision per source:
      polygons: target = opacity polygons, every pixel weighted.
      zones:    a Brixia zone scored 0 holds no opacity: its pixels are weighted negatives.
      extent:   the image's opacity fraction of the lungs (see `fraction_loss`).
    Outside the lungs is always a weighted negative (opacity is defined inside the lung fields).
    """
    samples = Samples()
    for record in tqdm(records, desc="opacity samples", leave=False):
        polygons = use_polygons and record.labelme_path is not None
        zones = use_zones and record.brixia_zones is not None
        extent = use_extent and record.extent is not None and not polygons
        if not (polygons or zones or extent):
            continue
        image = normalize_gray(read_gray(record.image_path))
        labels, ignore = read_lung_labels(record.lung_mask_path)
        lung = labels > 0
        target = np.zeros(image.shape, np.uint8)
        weight = (~lung & ~ignore).astype(np.uint8)
        if polygons:
            target = rasterize_labelme(record.labelme_path, image.shape)["opacity"].astype(np.uint8)
            weight = (~ignore).astype(np.uint8)
        elif zones:
            zone_of_pixel = zone_map(labels)
            for index, letter in enumerate("ABCDEF", start=1):
                if record.brixia_zones[letter] == 0:
                    weight[zone_of_pixel == index] = 1
        y0, y1, x0, x1 = crop_box(lung)
        crop = lambda a: a[y0:y1, x0:x1]  # noqa: E731
        samples.images.append(_resize(crop(image), size, False))
        samples.masks.append([_resize(crop(m), size, True) for m in (target, weight, lung.astype(np.uint8))])
        samples.fractions.append(record.opacity_fraction_from_extent if extent else -1.0)
        samples.names.append(record.filename)
    return samples


def lung_batch(images, masks):
    labels = np.stack([m[0] for m in masks])
    target = np.stack([labels == 1, labels == 2], axis=-1).astype(np.float32)
    weight = (labels != IGNORE_LABEL)[..., None].astype(np.float32)
    return {"target": target, "weight": weight}


def opacity_batch(images, masks):
    stacked = np.stack([np.stack(m, axis=-1) for m in masks]).astype(np.float32)
    return {"target": stacked[..., 0:1], "weight": stacked[..., 1:2], "lung": stacked[..., 2]}


def lung_loss(prob, batch):
    return dice_focal_loss(prob, batch["target"], batch["weight"])


def opacity_loss(prob, batch):
    return (dice_focal_loss(prob, batch["target"], batch["weight"])
            + fraction_loss(prob, batch["lung"], batch["fraction"]))


def batches(samples: Samples, batch_size: int, make_targets, rng=None, augment=None, flip_lut=None,
            drop_last=False):
    """Yield model-ready batches; with `rng`, shuffled and augmented."""
    order = rng.permutation(len(samples)) if rng is not None else np.arange(len(samples))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        images, masks = [], []
        for i in order[start:start + batch_size]:
            image, sample_masks = samples.images[i], samples.masks[i]
            if augment is not None:
                out = augment(image=image, masks=sample_masks)
                image, sample_masks = maybe_flip(out["image"], list(out["masks"]), rng, flip_lut)
            images.append(image); masks.append(sample_masks)
        batch = make_targets(images, masks)
        batch["image"] = (np.stack(images).astype(np.float32) / 255.0)[..., None]
        batch["fraction"] = np.array([samples.fractions[i] for i in order[start:start + batch_size]], np.float32)
        yield batch


# ---------------------------------------------------------------- loop
class Trainer:
    """A model, its optimizer and loss, with one-call training steps (also used by the tests)."""

    def __init__(self, model, loss, learning_rate):
        self.model, self.loss = model, loss
        self.optimizer = tf.keras.optimizers.Adam(learning_rate)

        @tf.function(reduce_retracing=True)
        def step(batch):
            with tf.GradientTape() as tape:
                value = self.loss(self.model(batch["image"], training=True), batch)
            grads = tape.gradient(value, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            return value

        @tf.function(reduce_retracing=True)
        def evaluate(batch):
            return self.loss(self.model(batch["image"], training=False), batch)

        self.step, self.evaluate = step, evaluate

    def validation_loss(self, samples, make_targets, batch_size=8):
        values = [float(self.evaluate(b)) * len(b["image"]) for b in batches(samples, batch_size, make_targets)]
        return sum(values) / max(1, len(samples))


def fit(trainer: Trainer, train: Samples, val: Samples | None, make_targets, epochs: int, out_dir: Path,
        flip_lut=None, batch_size=8, desc="train"):
    """Train for `epochs`, checkpointing each epoch in out_dir and resuming from the last one.
    Keeps the weights with the lowest validation loss in out_dir/best.h5; without a validation set,
    the last epoch's (a fixed schedule, nothing selected)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    epoch = tf.Variable(0, dtype=tf.int64)
    best = tf.Variable(np.inf, dtype=tf.float64)
    checkpoint = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer, epoch=epoch, best=best)
    manager = tf.train.CheckpointManager(checkpoint, out_dir / "checkpoints", max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
        print(f"{desc}: resuming after epoch {int(epoch.numpy())}")
    augment = build_augmentation(train.images[0].shape[0])
    history_path = out_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    while int(epoch.numpy()) < epochs:
        current = int(epoch.numpy()) + 1
        rng = np.random.default_rng(SEED + current)  # per-epoch seed: a resumed run draws the same
        augment.set_random_seed(SEED + current)
        losses = []
        steps = len(train) // batch_size
        with tqdm(batches(train, batch_size, make_targets, rng, augment, flip_lut, drop_last=True),
                  total=steps, desc=f"{desc} {current}/{epochs}") as bar:
            for batch in bar:
                losses.append(float(trainer.step(batch)))
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        val_loss = trainer.validation_loss(val, make_targets) if val is not None and len(val) else np.mean(losses)
        history.append({"epoch": current, "train_loss": float(np.mean(losses)), "val_loss": float(val_loss)})
        print(f"{desc} epoch {current}: train loss {np.mean(losses):.4f}, val loss {val_loss:.4f}", flush=True)
        if val is None or val_loss < best.numpy():
            best.assign(val_loss)
            trainer.model.save_weights(str(out_dir / "best.h5"))
        epoch.assign(current)
        manager.save()
        history_path.write_text(json.dumps(history, indent=1))
    trainer.model.load_weights(str(out_dir / "best.h5"))
    return history


def setup(seed=SEED):
    tf.keras.utils.set_random_seed(seed)
    tf.config.threading.set_inter_op_parallelism_threads(1)


# ---------------------------------------------------------------- stages
def split_records(records, split):
    by_split = {"train": [], "val": [], "test": []}
    for record in records:
        by_split[split.get(record.filename, "test")].append(record)  # unknown images never train
    return by_split


def train_lungs(data_dir: Path, out_dir: Path, epochs: int, size: int = network.LUNG_SIZE):
    """Stage 1: right and left lung on the whole image (V7 masks: retrocardiac lung included)."""
    setup()
    parts = split_records([r for r in load_records(data_dir) if r.lung_mask_path], read_split())
    train, val = (lung_samples(parts[name], size) for name in ("train", "val"))
    model = network.build_unet(size, len(network.LUNG_CHANNELS))
    schedule = tf.keras.optimizers.schedules.CosineDecay(1e-3, epochs * (len(train) // 8), alpha=0.05)
    trainer = Trainer(model, lung_loss, schedule)
    fit(trainer, train, val, lung_batch, epochs, out_dir / "lungs", flip_lut=SWAP_RIGHT_LEFT, desc="lungs")
    return model


def keras_runner(model):
    return lambda batch: np.asarray(model(batch, training=False))


def keras_pipeline(lung_model, opacity_model):
    from model.infer import Pipeline

    return Pipeline(keras_runner(lung_model), keras_runner(opacity_model),
                    lung_size=lung_model.input_shape[1], opacity_size=opacity_model.input_shape[1])


def polygon_folds(records, folds=3) -> list[list[Record]]:
    """Images with opacity polygons, grouped by patient into `folds` seeded folds."""
    patients = sorted({r.patient for r in records if r.labelme_path})
    order = np.random.default_rng(SEED).permutation(len(patients))
    fold_of = {patients[i]: k % folds for k, i in enumerate(order)}
    return [[r for r in records if r.labelme_path and fold_of[r.patient] == k] for k in range(folds)]


def fine_tune(model, polygons: Samples, weak: Samples, epochs: int, out_dir: Path, desc: str):
    """Fine-tune on polygon images (each shown 4x per epoch) mixed with as many weak-label images,
    for a fixed number of epochs: nothing here is selected on held-out data."""
    rng = np.random.default_rng(SEED)
    repeated = polygons + polygons + polygons + polygons
    mixed = repeated + weak.subset(rng.permutation(len(weak)) < len(repeated)) if len(weak) else repeated
    trainer = Trainer(model, opacity_loss, 3e-4)
    fit(trainer, mixed, None, opacity_batch, epochs, out_dir, desc=desc)
    return model


def train_opacity(data_dir: Path, out_dir: Path, lung_model, epochs: int, fine_tune_epochs: int,
                  size: int = network.OPACITY_SIZE):
    """Stage 2: opacity in the 320x320 lung crop.

    1. weak: extent fractions and Brixia zero-zones on train patients, starting from the lung model's
       weights; patients with opacity polygons are kept out, so every polygon image stays unseen.
    2. cross-validation by patient over the polygon images: fine-tune the weak model on the other
       folds' polygons (and, for the ablation, the lung-initialised model on polygons only).
    3. final: the recipe the cross-validation supports. In the 2026-11 run the weak labels made the
       model predict no opacity (negatives outweigh the extent fractions; see the model card), so
       the shipped model is the lung-initialised model fine-tuned on all polygon images.
    """
    setup()
    records = [r for r in load_records(data_dir) if r.lung_mask_path]
    polygon_patients = {r.patient for r in records if r.labelme_path}
    parts = split_records([r for r in records if r.patient not in polygon_patients], read_split())
    weak_train = opacity_samples(parts["train"], size, use_polygons=False)
    weak_val = opacity_samples(parts["val"], size, use_polygons=False)

    weak_model = opacity_model_from(lung_model, size)
    schedule = tf.keras.optimizers.schedules.CosineDecay(1e-3, epochs * (len(weak_train) // 8), alpha=0.05)
    fit(Trainer(weak_model, opacity_loss, schedule), weak_train, weak_val, opacity_batch, epochs,
        out_dir / "opacity-weak", desc="opacity weak")
    weak_path = out_dir / "opacity-weak" / "best.h5"

    folds = polygon_folds(records)
    for k in range(len(folds)):
        polygons = opacity_samples([r for j, f in enumerate(folds) if j != k for r in f], size)
        for tag, start_from_weak in (("cv-weak+poly", True), ("cv-poly", False)):
            model = opacity_model_from(lung_model, size, weak_path if start_from_weak else None)
            fine_tune(model, polygons, weak_train if start_from_weak else Samples(), fine_tune_epochs,
                      out_dir / f"{tag}-fold{k}", desc=f"{tag} fold {k}")

    final = opacity_model_from(lung_model, size)
    all_polygons = opacity_samples([r for f in folds for r in f], size)
    fine_tune(final, all_polygons, Samples(), fine_tune_epochs, out_dir / "opacity-final-polygons",
              desc="opacity final")
    return final


def opacity_model_from(lung_model, size: int, weights: Path | None = None):
    """Opacity U-Net initialised from the lung model (no ImageNet weights here), or from `weights`."""
    model = network.build_unet(size, len(network.OPACITY_CHANNELS))
    network.copy_matching_weights(lung_model, model)
    if weights is not None:
        model.load_weights(str(weights))
    return model


HELD_OUT_VARIANTS = {  # ablation row -> checkpoint folder (per fold where polygons were used)
    "weak labels only": "opacity-weak",
    "polygons only (CV)": "cv-poly-fold{k}",
    "weak labels + polygons (CV)": "cv-weak+poly-fold{k}",
}


def score_held_out(data_dir: Path, out_dir: Path, lung_model, size: int = network.OPACITY_SIZE) -> dict:
    """Ablation: every polygon image predicted by each variant's model that never saw its polygons
    (rebuilt from the checkpoints, so it can be rerun without training)."""
    from model.evaluate import score_image, summarize

    records = [r for r in load_records(data_dir) if r.lung_mask_path]
    ablation = {}
    for variant, folder in HELD_OUT_VARIANTS.items():
        rows = []
        for k, fold in enumerate(polygon_folds(records)):
            model = opacity_model_from(lung_model, size, out_dir / folder.format(k=k) / "best.h5")
            pipeline = keras_pipeline(lung_model, model)
            rows += [score_image(r, pipeline.segment(read_gray(r.image_path))) for r in fold]
        ablation[variant] = summarize(rows)
    return ablation

MODEL_VERSION = "1.0.0"


def run(data_dir: Path, out_dir: Path, lung_epochs: int = 16, opacity_epochs: int = 15,
        fine_tune_epochs: int = 4, lung_size: int = network.LUNG_SIZE,
        opacity_size: int = network.OPACITY_SIZE) -> Path:
    """Every stage, the ablation on held-out polygon images, and ONNX export to out_dir/weights."""
    from model.export import export_onnx, round_weights_to_float16, write_manifest

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    lung_model = train_lungs(data_dir, out_dir, lung_epochs, lung_size)
    opacity_model = train_opacity(data_dir, out_dir, lung_model, opacity_epochs, fine_tune_epochs, opacity_size)
    ablation = score_held_out(data_dir, out_dir, lung_model, opacity_size)
    (out_dir / "ablation.json").write_text(json.dumps(ablation, indent=1))
    print(ablation_table(ablation))

    weights = out_dir / "weights"
    for model, name in ((lung_model, "lungs.onnx"), (opacity_model, "opacity.onnx")):
        round_weights_to_float16(model)
        export_onnx(model, weights / name)
    write_manifest(weights, MODEL_VERSION, {"lung_input": lung_size, "opacity_input": opacity_size,
                                            "seed": SEED, "lung_epochs": lung_epochs, "opacity_epochs": opacity_epochs,
                                            "fine_tune_epochs": fine_tune_epochs})
    print(f"weights written to {weights}; copy them to model/weights/ to ship them")
    return weights


def ablation_table(ablation: dict) -> str:
    """Markdown table: what each source of opacity supervision gives on unseen polygon images."""
    lines = ["| supervision | images | IoU mean | IoU mean (with opacity) | IoU pooled | Dice pooled | opacity % MAE |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for variant, m in ablation.items():
        o = m.get("opacity_vs_polygons", {})
        lines.append(f"| {variant} | {o.get('n', 0)} | {fmt(o.get('iou_mean'))} | {fmt(o.get('iou_mean_nonempty'))} | "
                     f"{fmt(o.get('iou_pooled'))} | {fmt(o.get('dice_pooled'))} | {fmt(o.get('opacity_pct_mae'))} |")
    return "\n".join(lines)
