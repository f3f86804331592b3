"""U-Net with a ResNet18 encoder (segmentation-models on tf-keras), as in Tang et al. 2020."""
from __future__ import annotations

import os

import numpy as np

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


def load_onnx_weights(model: tf.keras.Model, path) -> int:
    """Set a Keras U-Net's weights from an ONNX file this project exported (`model.export`), so a
    shipped model can seed training without its Keras checkpoint. Convolution kernels are stored
    (out, in, h, w) in ONNX and (h, w, in, out) in Keras; BatchNormalization inputs come in the
    order scale, bias, mean, variance. Returns the number of layers set."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in graph.initializer}
    values.update({n.output[0]: values[n.input[0]] for n in graph.node if n.op_type == "Cast" and n.input[0] in values})
    nodes = {}
    for node in graph.node:
        if node.op_type in ("Conv", "BatchNormalization") and len(node.input) > 1 and node.input[1] in values:
            nodes[node.input[1].split("/")[1]] = [values[name] for name in node.input[1:]]
    set_layers = 0
    for layer in model.layers:
        if layer.name not in nodes:
            continue
        onnx_values = nodes[layer.name]
        if isinstance(layer, tf.keras.layers.Conv2D):
            weights = [onnx_values[0].transpose(2, 3, 1, 0)] + onnx_values[1:2]
        else:  # BatchNormalization: ONNX always has a scale; Keras only when scale=True
            scale, bias, mean, variance = onnx_values
            weights = ([scale] if layer.scale else []) + ([bias] if layer.center else []) + [mean, variance]
        layer.set_weights(weights)
        set_layers += 1
    return set_layers
