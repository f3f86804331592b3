"""Training and export (need the [train] extra: TensorFlow)."""
import numpy as np
import pytest

from model.data import load_records, normalize_gray, read_gray

pytest.importorskip("tensorflow")
from model import network  # noqa: E402
from model.export import export_onnx, round_weights_to_float16  # noqa: E402
from model.infer import onnx_runner  # noqa: E402
from model.train import SWAP_RIGHT_LEFT, Trainer, batches, lung_batch, lung_loss, lung_samples, setup  # noqa: E402


def test_tiny_model_loss_drops_on_a_fixed_batch(cxr_dir):
    setup()
    records = [r for r in load_records(cxr_dir) if r.lung_mask_path][:4]
    batch = next(batches(lung_samples(records, 64), 4, lung_batch))
    trainer = Trainer(network.build_unet(64, 2), lung_loss, 1e-3)
    losses = [float(trainer.step(batch)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_augmented_batches_keep_labels_consistent(cxr_dir):
    from model.augment import build_augmentation

    records = [r for r in load_records(cxr_dir) if r.lung_mask_path][:8]
    samples = lung_samples(records, 64)
    rng = np.random.default_rng(0)
    batch = next(batches(samples, 8, lung_batch, rng, build_augmentation(64), SWAP_RIGHT_LEFT))
    target = batch["target"]
    assert batch["image"].shape == (8, 64, 64, 1) and target.shape == (8, 64, 64, 2)
    assert not (target[..., 0] * target[..., 1]).any()  # a pixel is never both lungs
    for right, left in zip(target[..., 0], target[..., 1]):  # flips swapped the labels too
        assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()


def test_onnx_equals_keras_on_real_images(cxr_dir, tmp_path):
    size = network.LUNG_SIZE
    model = network.build_unet(size, 2)
    round_weights_to_float16(model)
    runner = onnx_runner(export_onnx(model, tmp_path / "lungs.onnx"))
    import cv2

    records = load_records(cxr_dir)[:4]
    images = np.stack([cv2.resize(normalize_gray(read_gray(r.image_path)), (size, size)) for r in records])
    batch = images[..., None].astype(np.float32) / 255.0
    assert np.abs(runner(batch) - model.predict_on_batch(batch)).max() < 1e-4
