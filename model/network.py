"""U-Net with a ResNet18 encoder (segmentation-models on tf-keras), as in Tang et al. 2020."""
from __future__ import annotations

import os

# segmentation-models is a Keras-2-era library: it imports only with these set before TensorFlow.
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402
import segmentation_models as sm  # noqa: E402

from model.infer import LUNG_SIZE, OPACITY_SIZE  # noqa: E402,F401  (one source for both sides)
LUNG_CHANNELS = ("right_lung", "left_lung")
OPACITY_CHANNELS = ("opacity",)


def build_unet(size: int, channels: int) -> tf.keras.Model:
    """Gray image (size, size, 1) in [0, 1] -> `channels` sigmoid maps. No weights are downloaded."""
    return sm.Unet("resnet18", input_shape=(size, size, 1), classes=channels,
                   activation="sigmoid", encoder_weights=None)


def copy_matching_weights(source: tf.keras.Model, target: tf.keras.Model) -> int:
    """Copy every layer whose name and weight shapes match (e.g. lung model -> opacity model)."""
    copied = 0
    source_layers = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        match = source_layers.get(layer.name)
        if match is None or not layer.weights:
            continue
        weights = match.get_weights()
        if [w.shape for w in weights] == [w.shape for w in layer.get_weights()]:
            layer.set_weights(weights)
            copied += 1
    return copied
