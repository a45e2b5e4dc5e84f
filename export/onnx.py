"""Keras -> ONNX: one file from which the CPU runtime computes every explanation.

model.onnx
  inputs   image (N, S, S, 3) float32 RGB in [0, 1]; target (N,) int64: the class
           to explain per image, negative = top-1
  outputs  logits (N, classes), probabilities (N, classes), features (N, h, w, C) =
           conv4 after ReLU, grads (N, h, w, C) = d logits[target] / d features,
           target_used (N,) the class each gradient belongs to
model.head.onnx
  features (N, h, w, C) -> logits, probabilities: the layers after conv4 alone, for
  methods that re-run only the head (Ablation-CAM)
model.forward.onnx
  image -> logits, probabilities: the main graph pruned to the classifier, for calls
  that need probabilities alone (Score-CAM's masked inputs, the evaluation's perturbed
  inputs, the benchmark's plain forward pass). Optional: without it the runtime runs the
  main graph, 5-9% slower for those calls.
model.blocks.onnx
  the body's five conv blocks, one per call (export/blocks.py), for Score-CAM's masked
  inputs: each runs only where its mask reaches. Optional, and written only for the
  seed's body: without it Score-CAM runs whole masked images.
metadata_props: class names, input size, layout, value range, kernel, head, feature
layer, the names of the side files, an export_id the files share (a side file
from another export is not used), version and the training summary: the runtime guesses
nothing.

All files are written under a temporary name and renamed only after the parity check
against Keras passed, so a failed export leaves no model.onnx behind.
"""
from __future__ import annotations

import json
import os


from explicam import __version__

OPSET = 17  # tf2onnx 1.17 goes up to 18; 17 runs on older onnxruntime builds found on boards


class ExportError(ValueError):
    pass


def load_keras_model(path: str):
    import keras

    if not os.path.exists(path):
        raise ExportError(f"no model file at {path}")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a corrupt zip / h5
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot load Keras model {path}: {first}") from None


def split_at_layer(model, layer_name: str = "conv4"):
    """(body: image -> features, head_layers: the chain after the feature layer)."""
    import keras

    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        convs = [layer.name for layer in model.layers if type(layer).__name__ == "Conv2D"]
        raise ExportError(f"model has no layer named '{layer_name}'; its convolution layers are: "
                          f"{', '.join(convs) or 'none'}; pass --layer NAME")
    feature_layer = model.get_layer(layer_name)
    head = model.layers[names.index(layer_name) + 1:]
    # The head must be a plain chain: each layer fed by the previous one.
    prev = feature_layer
    for layer in head:
        if layer.input is not prev.output:
            raise ExportError(f"layer '{layer.name}' is not fed by '{prev.name}': only a single chain of "
                              "layers after the feature layer can be exported")
        prev = layer
    body = keras.Model(model.inputs, feature_layer.output, name="body")
    return body, head


def _convert(fn, signature, opset: int):
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(fn, input_signature=signature, opset=opset)
    return proto


def build_onnx(model, layer_name: str = "conv4", opset: int = OPSET):
    """Return (main ModelProto, head ModelProto) for a Keras classifier."""
    import tensorflow as tf

    from explicam.export.gradients import check_head, head_forward_and_grad

    body, head = split_at_layer(model, layer_name)
    check_head(head)
    size = model.input_shape[1:3]
    feat_shape = tuple(body.output_shape[1:])
    image_spec = tf.TensorSpec((None, *size, 3), tf.float32, name="image")
    target_spec = tf.TensorSpec((None,), tf.int64, name="target")

    @tf.function(input_signature=(image_spec, target_spec))
    def full(image, target):
        features = body(image, training=False)
        logits, chosen, grads = head_forward_and_grad(head, features, target)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits), "features": features,
                "grads": grads, "target_used": chosen}

    feat_spec = tf.TensorSpec((None, *feat_shape), tf.float32, name="features")

    @tf.function(input_signature=(feat_spec,))
    def head_only(features):
        x = features
        for layer in head:
            x = layer(x, training=False)
        return {"logits": x, "probabilities": tf.nn.softmax(x)}

    main = _convert(full, (image_spec, target_spec), opset)
    give_target_default(main)
    head_proto = _convert(head_only, (feat_spec,), opset)
    return main, head_proto


def give_target_default(proto) -> None:
    """Make the `target` input optional: an initializer of the same name holding [-1]
    (top-1) is what onnxruntime uses when the caller feeds none, so the file is also a
    plain classifier: session.run(None, {"image": x}). Broadcast against the batch by the
    graph's own Where, it explains each image's top-1 class."""
    import numpy as np
    from onnx import numpy_helper

    names = {i.name for i in proto.graph.initializer}
    if "target" in names or "target" not in {i.name for i in proto.graph.input}:
        return
    proto.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "target"))


def set_metadata(proto, meta: dict) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def make_metadata(model, layer_name: str, summary: dict, head_file: str, forward_file: str = "",
                  blocks_file: str = "", blocks: dict | None = None) -> dict:
    body_shape = model.get_layer(layer_name).output.shape
    head_kind = "gap" if any(type(layer).__name__ == "GlobalAveragePooling2D" for layer in model.layers) else "flatten"
    num_classes = int(model.output_shape[-1])
    names = summary.get("class_names") or [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ExportError(f"summary.json lists {len(names)} class names but the model has {num_classes} outputs")
    kernel = summary.get("kernel") or int(model.get_layer(layer_name).kernel_size[0])
    return {
        "explicam_version": __version__,
        "class_names": list(names),
        "input_name": "image",
        "input_size": int(model.input_shape[1]),
        "input_layout": "NHWC",
        "channel_order": "RGB",
        "value_range": [0.0, 1.0],
        "resize": "bilinear",
        "kernel": int(kernel),
        "head": summary.get("head", head_kind),
        "feature_layer": layer_name,
        "feature_shape": [int(d) for d in body_shape[1:]],
        "gradient": "grads = d logits[target] / d features (exact, for the target input; negative = top-1)",
        "head_file": head_file,
        "forward_file": forward_file,
        "blocks_file": blocks_file if blocks else "",
        "blocks": blocks or {},
        "training_summary": {k: summary[k] for k in ("epochs_run", "max_epochs", "best_epoch", "wall_time_s",
                                                     "final_val_accuracy", "best_val_accuracy", "params")
                             if k in summary},
    }


def head_path_for(onnx_path: str) -> str:
    root, _ = os.path.splitext(onnx_path)
    return root + ".head.onnx"


def forward_path_for(onnx_path: str) -> str:
    root, _ = os.path.splitext(onnx_path)
    return root + ".forward.onnx"


def blocks_path_for(onnx_path: str) -> str:
    root, _ = os.path.splitext(onnx_path)
    return root + ".blocks.onnx"


def classifier_only(main):
    """The main graph pruned to image -> logits, probabilities. onnxruntime runs every node
    of a graph whatever outputs are asked for, so a call for probabilities alone on the
    main graph still pays for the gradient subgraph (5-9% here); Score-CAM's masked inputs
    and the evaluation's perturbed inputs only need probabilities."""
    from onnx.utils import Extractor

    pruned = Extractor(main).extract_model(["image"], ["logits", "probabilities"])
    export_id = {p.key: p.value for p in main.metadata_props}.get("export_id", "")
    set_metadata(pruned, {"role": "forward", "of": "the classifier of the main graph, no gradients",
                          "export_id": export_id})
    return pruned


def write_atomic(data: bytes, path: str) -> None:
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
