"""The training loop: batches, one-call steps, and a resumable, checkpointed `fit`."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model import network
from model.augment import build_augmentation, maybe_flip
from model.training.samples import IGNORE_LABEL, LUNG, TARGET, WEIGHT, ZONE, Samples

tf = network.tf
SWAP_RIGHT_LEFT = np.array([0, 2, 1] + list(range(3, 256)), np.uint8)


def lung_batch(masks, labels):
    label_map = np.stack([m[0] for m in masks])
    target = np.stack([label_map == 1, label_map == 2], axis=-1).astype(np.float32)
    weight = (label_map != IGNORE_LABEL)[..., None].astype(np.float32)
    return {"target": target, "weight": weight}


def opacity_batch(masks, labels):
    stacked = np.stack([np.stack(m) for m in masks])
    batch = {"target": stacked[:, TARGET, ..., None].astype(np.float32),
             "weight": stacked[:, WEIGHT, ..., None].astype(np.float32),
             "lung": stacked[:, LUNG].astype(np.float32), "zone": stacked[:, ZONE].astype(np.int32)}
    for key in ("extent", "zone_score", "zone_negative", "zone_positive"):
        batch[key] = np.stack([label[key] for label in labels]).astype(np.float32)
    return batch


def batches(samples: Samples, batch_size: int, make_targets, rng=None, augment=None, flip_lut=None,
            drop_last=False):
    """Yield model-ready batches; with `rng`, shuffled and augmented."""
    order = rng.permutation(len(samples)) if rng is not None else np.arange(len(samples))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        picked = order[start:start + batch_size]
        images, masks = [], []
        for i in picked:
            image, sample_masks = samples.images[i], samples.masks[i]
            if augment is not None:
                out = augment(image=image, masks=sample_masks)
                image, sample_masks = maybe_flip(out["image"], list(out["masks"]), rng, flip_lut)
            images.append(image); masks.append(sample_masks)
        batch = make_targets(masks, [samples.labels[i] for i in picked])
        batch["image"] = (np.stack(images).astype(np.float32) / 255.0)[..., None]
        yield batch


class Trainer:
    """A model, its optimizer and a loss returning (total, terms), with one-call training steps."""

    def __init__(self, model, loss, learning_rate):
        self.model, self.loss = model, loss
        self.optimizer = tf.keras.optimizers.Adam(learning_rate)

        @tf.function(reduce_retracing=True)
        def step(batch):
            with tf.GradientTape() as tape:
                total, terms = self.loss(self.model(batch["image"], training=True), batch)
            grads = tape.gradient(total, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            return dict(terms, loss=total)

        @tf.function(reduce_retracing=True)
        def evaluate(batch):
            return self.loss(self.model(batch["image"], training=False), batch)[0]

        self.step, self.evaluate = step, evaluate

    def validation_loss(self, samples, make_targets, batch_size=8):
        values = [float(self.evaluate(b)) * len(b["image"]) for b in batches(samples, batch_size, make_targets)]
        return sum(values) / max(1, len(samples))


def epoch_log(step_logs: list[dict]) -> dict:
    """Per-epoch means: `X_sum` / `X_n` pairs become X (a mean over zones), other terms batch means."""
    log = {}
    for key in step_logs[0]:
        if key.endswith("_sum"):
            name = key[:-4]
            n = sum(float(s[name + "_n"]) for s in step_logs)
            log[name] = sum(float(s[key]) for s in step_logs) / n if n else None
        elif not key.endswith("_n"):
            log[key] = float(np.mean([float(s[key]) for s in step_logs]))
    return log


def fit(trainer: Trainer, train: Samples, val: Samples | None, make_targets, epochs: int, out_dir: Path,
        seed: int, flip_lut=None, batch_size=8, desc="train", keep_best=False, films_from_elsewhere=False):
    """Train for `epochs`, checkpointing each epoch in out_dir and resuming from the last one.
    With `keep_best`, the weights of the lowest validation loss end in out_dir/final.h5; otherwise the
    last epoch's (a fixed schedule: nothing selected on held-out data)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    epoch = tf.Variable(0, dtype=tf.int64)
    best = tf.Variable(np.inf, dtype=tf.float64)
    checkpoint = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer, epoch=epoch, best=best)
    manager = tf.train.CheckpointManager(checkpoint, out_dir / "checkpoints", max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
        print(f"{desc}: resuming after epoch {int(epoch.numpy())}", flush=True)
    augment = build_augmentation(train.images[0].shape[0], films_from_elsewhere)
    history_path = out_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    while int(epoch.numpy()) < epochs:
        current = int(epoch.numpy()) + 1
        rng = np.random.default_rng(seed + current)  # per-epoch seed: a resumed run draws the same
        augment.set_random_seed(seed + current)
        step_logs = []
        with tqdm(batches(train, batch_size, make_targets, rng, augment, flip_lut, drop_last=True),
                  total=len(train) // batch_size, desc=f"{desc} {current}/{epochs}") as bar:
            for batch in bar:
                step_logs.append(trainer.step(batch))
                bar.set_postfix(loss=f"{np.mean([float(s['loss']) for s in step_logs]):.4f}")
        log = {"epoch": current, **epoch_log(step_logs)}
        log["val_loss"] = trainer.validation_loss(val, make_targets) if val is not None and len(val) else None
        history.append(log)
        print(f"{desc} " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in log.items()),
              flush=True)
        if not keep_best or log["val_loss"] < best.numpy():
            best.assign(log["val_loss"] if keep_best else 0.0)
            trainer.model.save_weights(str(out_dir / "final.h5"))
        epoch.assign(current)
        manager.save()
        history_path.write_text(json.dumps(history, indent=1))
    trainer.model.load_weights(str(out_dir / "final.h5"))
    return history


def setup(seed: int):
    tf.keras.utils.set_random_seed(seed)
    with contextlib.suppress(RuntimeError):  # settable only before TensorFlow's first operation
        tf.config.threading.set_inter_op_parallelism_threads(1)
