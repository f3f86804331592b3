"""Training and export (need the [train] extra: TensorFlow)."""
import numpy as np
import pytest

from model.data import load_quex_records, load_records
from model.image import normalize_gray, read_gray

pytest.importorskip("tensorflow")
from model import network  # noqa: E402
from model.export import export_onnx, round_weights_to_float16  # noqa: E402
from model.infer import WEIGHTS_DIR, load_pipeline, onnx_runner  # noqa: E402
from model.training.losses import lung_loss, opacity_loss, weak_losses  # noqa: E402
from model.training.loop import SWAP_RIGHT_LEFT, Trainer, batches, lung_batch, opacity_batch, setup  # noqa: E402
from model.training.recipe import VARIANTS, Recipe  # noqa: E402
from model.training.samples import (LUNG, TARGET, WEIGHT, ZONE, cohen_samples, lung_samples,  # noqa: E402
                                    quex_samples)

tf = network.tf


def test_tiny_model_loss_drops_on_a_fixed_batch(cxr_dir):
    setup(0)
    records = [r for r in load_records(cxr_dir) if r.lung_mask_path][:4]
    batch = next(batches(lung_samples(records, 64), 4, lung_batch))
    trainer = Trainer(network.build_unet(64, 2), lung_loss, 1e-3)
    losses = [float(trainer.step(batch)["loss"]) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("films_from_elsewhere", [False, True])
def test_augmented_batches_keep_labels_consistent(cxr_dir, films_from_elsewhere):
    from model.augment import build_augmentation

    records = [r for r in load_records(cxr_dir) if r.lung_mask_path][:8]
    samples = lung_samples(records, 64)
    rng = np.random.default_rng(0)
    augment = build_augmentation(64, films_from_elsewhere)
    batch = next(batches(samples, 8, lung_batch, rng, augment, SWAP_RIGHT_LEFT))
    target = batch["target"]
    assert batch["image"].shape == (8, 64, 64, 1) and target.shape == (8, 64, 64, 2)
    assert not (target[..., 0] * target[..., 1]).any()  # a pixel is never both lungs
    for right, left in zip(target[..., 0], target[..., 1]):  # flips swapped the labels too
        assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()


def zone_batch(fractions, scores, extent=(-1.0, -1.0)):
    """One 24x24 'image' whose rows 4z..4z+3 are zone z+1, with opacity probability fractions[z] there."""
    zones = np.repeat(np.repeat(np.arange(1, 7, dtype=np.int32), 4)[:, None], 24, axis=1)[None]
    scores = np.array([scores], np.float32)
    prob = np.repeat(np.repeat(np.array(fractions, np.float32), 4)[:, None], 24, axis=1)[None, ..., None]
    batch = {"zone": zones, "zone_score": scores, "zone_negative": (scores == 0).astype(np.float32),
             "zone_positive": (scores >= 1).astype(np.float32), "lung": np.ones((1, 24, 24), np.float32),
             "extent": np.array([extent], np.float32)}
    return tf.constant(prob), {k: tf.constant(v) for k, v in batch.items()}


@pytest.mark.parametrize("pooling", ["mean", "lse"])
def test_weak_losses_punish_predicting_nothing_as_much_as_predicting_everything(pooling):
    recipe = Recipe(zone_pooling=pooling)
    scores = [0, 0, 0, 3, 3, 3]
    nothing = weak_losses(*zone_batch([0] * 6, scores), recipe)
    everything = weak_losses(*zone_batch([1] * 6, scores), recipe)
    right = weak_losses(*zone_batch([0, 0, 0, 0.9, 0.9, 0.9], scores), recipe)
    assert float(nothing["zone_positive"]) > 0.45 and float(nothing["zone_negative"]) == pytest.approx(0, abs=1e-6)
    assert float(everything["zone_negative"]) > 0.9 and float(everything["zone_positive"]) == 0
    assert float(right["zone_positive"]) == float(right["zone_negative"]) == float(right["zone_ranking"]) == 0
    assert float(nothing["zone_ranking"]) > 0  # equal fractions for unequal scores
    assert float(right["positive_zone_fraction_sum"]) / float(right["positive_zone_fraction_n"]) == pytest.approx(0.9)


def test_soft_maximum_pooling_takes_a_patch_of_opacity_for_a_positive_zone_where_the_mean_wants_it_painted():
    """Zone D (score 3) holds opacity in one of its four rows: enough for "lse", not for "mean"; the
    same patch in a zone both raters called clear costs "lse" far more than "mean"."""
    prob, batch = zone_batch([0] * 6, [0, 0, 0, 3, 3, 3])
    patch = np.zeros((1, 24, 24, 1), np.float32)
    patch[0, 12] = 1.0  # first row of zone D
    patch[0, 0] = 1.0   # first row of zone A, scored 0
    mean, lse = (weak_losses(tf.constant(patch), batch, Recipe(zone_pooling=pooling)) for pooling in ("mean", "lse"))
    zone_d_positive = weak_losses(tf.constant(patch), dict(batch, zone_positive=tf.constant([[0, 0, 0, 1, 0, 0.]])),
                                  Recipe(zone_pooling="lse"))
    assert float(zone_d_positive["zone_positive"]) == 0
    assert float(mean["zone_positive"]) > 0.3
    assert float(lse["zone_negative"]) > 3 * float(mean["zone_negative"])


def test_extent_loss_is_zero_inside_the_interval_only():
    recipe = Recipe()
    unscored = [-1] * 6
    assert float(weak_losses(*zone_batch([0.3] * 6, unscored, (0.25, 0.5)), recipe)["extent"]) == 0
    assert float(weak_losses(*zone_batch([0.1] * 6, unscored, (0.25, 0.5)), recipe)["extent"]) == pytest.approx(0.15, abs=1e-5)
    assert float(weak_losses(*zone_batch([0.9] * 6, unscored, (0.25, 0.5)), recipe)["extent"]) == pytest.approx(0.4, abs=1e-5)
    assert float(weak_losses(*zone_batch([0.9] * 6, unscored), recipe)["extent"]) == 0  # no score, no loss


def test_extent_score_bounds_the_opacity_fraction(cxr_dir):
    intervals = {r.extent: r.extent_interval for r in load_records(cxr_dir) if r.extent is not None}
    assert intervals[0.0] == (0.0, 0.0)
    for extent, (low, high) in intervals.items():
        assert 0 <= low <= high <= 1 and high - low <= 0.25 and high == extent / 8


def test_opacity_samples_carry_their_labels_through_a_training_step(cxr_dir, quex_dir):
    pipeline = load_pipeline()
    quex = quex_samples([q for q in load_quex_records(quex_dir) if q.infection_mask_path][:2]
                        + [q for q in load_quex_records(quex_dir) if not q.infection_mask_path][:2], pipeline, 64)
    records = load_records(cxr_dir)
    picked = [r for r in records if r.labelme_path][:2] + [r for r in records if r.brixia_zones and r.extent is not None][:2]
    cohen = cohen_samples(picked, pipeline, 64)
    for masks in quex.masks:
        assert masks[WEIGHT].any() and not masks[TARGET][masks[LUNG] == 0].all()
    assert not quex.masks[2][TARGET].any() and quex.masks[0][TARGET].any()  # normals are negatives
    for masks, labels in zip(cohen.masks, cohen.labels):
        assert set(np.unique(masks[ZONE])) == set(range(7))  # six zones and the outside
        assert masks[WEIGHT].any() == bool(labels["polygons"])  # weak-label images weigh no pixel
    assert all(label["zone_score"][0] >= 0 and label["extent"][0] >= 0 for label in cohen.labels[2:])
    setup(0)
    trainer = Trainer(network.build_unet(64, 1), opacity_loss(Recipe()), 1e-3)
    logs = trainer.step(next(batches(quex + cohen, 8, opacity_batch)))
    assert np.isfinite(float(logs["loss"])) and float(logs["pixels"]) > 0
    assert float(logs["zone_positive"]) + float(logs["zone_negative"]) > 0  # the zone labels reach the loss


@pytest.mark.parametrize("name,channels", [("lungs.onnx", 2), ("opacity.onnx", 1)])
def test_shipped_onnx_equals_keras_rebuilt_from_it(name, channels, cxr_dir):
    """The shipped ONNX file computes what Keras computes with the same weights (export and the
    ONNX -> Keras loader that seeds training are each other's inverse)."""
    import cv2

    runner = onnx_runner(WEIGHTS_DIR / name)
    size = runner.input_size
    model = network.build_unet(size, channels)
    assert network.load_onnx_weights(model, WEIGHTS_DIR / name) == sum(1 for layer in model.layers if layer.weights)
    records = load_records(cxr_dir)[:4]
    images = np.stack([cv2.resize(normalize_gray(read_gray(r.image_path)), (size, size)) for r in records])
    batch = images[..., None].astype(np.float32) / 255.0
    assert np.abs(runner(batch) - model.predict_on_batch(batch)).max() < 1e-4


def test_onnx_export_equals_keras_on_real_images(cxr_dir, tmp_path):
    size = 64
    model = network.build_unet(size, 2)
    round_weights_to_float16(model)
    runner = onnx_runner(export_onnx(model, tmp_path / "lungs.onnx"))
    import cv2

    records = load_records(cxr_dir)[:4]
    images = np.stack([cv2.resize(normalize_gray(read_gray(r.image_path)), (size, size)) for r in records])
    batch = images[..., None].astype(np.float32) / 255.0
    assert np.abs(runner(batch) - model.predict_on_batch(batch)).max() < 1e-4


def test_folds_keep_patients_and_their_qu_ex_duplicates_together(cxr_dir, quex_dir):
    from model.training.crossval import patient_folds

    records = load_records(cxr_dir)
    folds = patient_folds(records, 5, 20201)
    assert folds == patient_folds(records, 5, 20201) and set(folds.values()) == set(range(5))
    by_name = {r.filename: r for r in records}
    duplicates = [q for q in load_quex_records(quex_dir) if q.cohen_filename]
    assert len(duplicates) == 169 and all(q.cohen_filename in by_name for q in duplicates)


def test_brixia_mapping_for_a_fold_never_uses_that_folds_scores():
    """Zone scores follow expected opacity % (0-24 % -> 0, ... 75-100 % -> 3); reversing fold 0's own scores
    must change nothing for fold 0, and the other folds learn the rule."""
    from model.training.crossval import brixia_from_zone_opacity

    pct = np.random.default_rng(0).uniform(0, 100, (60, 6))
    rule = np.minimum(3, pct // 25)

    def rows(fold0_reversed):
        return [{"fold": i % 3, "zone_opacity_score": dict(zip("ABCDEF", pct[i])),
                 "brixia_zones": {"senior": dict(zip("ABCDEF", (3 - rule[i] if fold0_reversed and i % 3 == 0
                                                                else rule[i]).tolist()))}}
                for i in range(60)]

    honest, reversed_ = brixia_from_zone_opacity(rows(False)), brixia_from_zone_opacity(rows(True))
    fold0 = lambda rs: [r["brixia_predicted"] for r in rs if r["fold"] == 0]  # noqa: E731
    assert fold0(honest) == fold0(reversed_)
    assert np.mean([r["brixia_predicted"][z] == r["brixia_zones"]["senior"][z] for r in honest for z in "ABCDEF"]) > 0.9


def test_the_recipe_ships_only_a_variant_the_cross_validation_scores():
    assert Recipe().shipped in VARIANTS
    with pytest.raises(ValueError, match="recipe.shipped must be one of"):
        Recipe(shipped="stage B")
