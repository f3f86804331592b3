"""Keras -> ONNX for serving without TensorFlow, with float16 weight storage and a manifest.

Weights are rounded to float16 in Keras first, so the shipped ONNX model and the Keras model compute
the same function; the file stores them as float16 and a Cast restores float32, which ONNX Runtime
folds once at load time (computation stays float32, the file is half the size).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model import network

tf = network.tf
OPSET = 17


def round_weights_to_float16(model) -> None:
    model.set_weights([w.astype(np.float16).astype(w.dtype) if w.dtype == np.float32 else w
                       for w in model.get_weights()])


def store_initializers_as_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Store each float32 initializer that float16 represents exactly as float16 + Cast."""
    graph = proto.graph
    kept, casts = [], []
    for initializer in graph.initializer:
        values = numpy_helper.to_array(initializer)
        if initializer.data_type != TensorProto.FLOAT or values.size < 16 or not np.array_equal(
                values, values.astype(np.float16).astype(np.float32)):
            kept.append(initializer)
            continue
        kept.append(numpy_helper.from_array(values.astype(np.float16), initializer.name + "_f16"))
        casts.append(helper.make_node("Cast", [initializer.name + "_f16"], [initializer.name],
                                      to=TensorProto.FLOAT, name=initializer.name + "_cast"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def export_onnx(model, path: Path) -> Path:
    """Keras model (weights already float16-rounded) -> ONNX file at `path`."""
    import tf2onnx
    from tf2onnx.optimizer import _get_optimizers

    # tf2onnx folds BatchNorm into the convolutions, which leaves weights float16 cannot hold
    # exactly; ONNX Runtime does the same fusion in float32 when it loads the model.
    optimizers = {k: v for k, v in _get_optimizers().items() if k != "remove_back_to_back"}
    size = model.input_shape[1]
    spec = (tf.TensorSpec((None, size, size, 1), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET,
                                              optimizers=optimizers)
    proto = store_initializers_as_float16(proto)
    onnx.checker.check_model(proto)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return Path(path)


def write_manifest(weights_dir: Path, version: str, extra: dict | None = None) -> dict:
    """manifest.json: name, version and the sha256 of every other file there (checked at load)."""
    weights_dir = Path(weights_dir)
    doc = {
        "name": "cxr-node lung+opacity U-Net (ResNet18)",
        "version": version,
        "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(weights_dir.iterdir())
                   if p.name != "manifest.json"},
        **(extra or {}),
    }
    (weights_dir / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc
