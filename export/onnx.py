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
  image -> logits, probabilities, features (the main graph's primary `features`): the
  main graph pruned to the classifier, for calls that need no gradient of the main graph
  (Score-CAM's masked inputs, the evaluation's perturbed inputs, the benchmark's plain
  forward pass, Finer-CAM, whose gradient comes from model.headgrad.onnx). Optional:
  without it the runtime runs the main graph, 5-9% slower for those calls. (Older exports'
  forward files output logits and probabilities alone: the runtime then takes the main
  graph for Finer-CAM. INT8 exports write no forward file.)
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

import numpy as np

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


def build_onnx(model, layer_name: str = "conv4", opset: int = OPSET, extra=()):
    """Return (main ModelProto, head ModelProto) for a Keras classifier.

    One gradient mechanism for every model: tf2onnx writes the forward graph alone (with
    the feature layer's output exposed), and explicam's ONNX differentiation
    (export/autodiff.py) adds `grads`, `target`, `features`, exactly as for a file from
    PyTorch. The seed's head is one more graph. `extra`: earlier Keras layers whose features
    and gradients the file also outputs (features_1, grads_1, ...: export --layer a,b,c)."""
    from explicam.export.autodiff import gradient_model
    from explicam.export.graph import prepare
    from explicam.export.sources import open_keras_as_onnx

    proto, tensors = open_keras_as_onnx(model, layer=[layer_name, *extra], opset=opset)
    g = prepare(proto, output="explicam_scores")
    main = gradient_model(g, tensors[0], tensors[1:])
    keep = [o for o in main.graph.output if o.name != "explicam_scores"]  # it is `logits`
    del main.graph.output[:]
    main.graph.output.extend(keep)
    return main, head_model(main)


def head_model(main):
    """features (N, h, w, C) NHWC -> logits, probabilities: the nodes of the main graph
    between the feature tensor and the score (Ablation-CAM and Recipro-CAM re-run them).
    None when the head also reads the image directly (nothing to re-run on its own)."""
    from onnx import helper

    from explicam.export.autodiff import META_KEY
    from explicam.export.autodiff_check import head_graph

    info = json.loads({p.key: p.value for p in main.metadata_props}[META_KEY])
    head, inputs = head_graph(main, info["features"], info["score"])
    if len(inputs) > 1:
        return None
    g = head.graph
    inner = info["features"]
    if info["features_layout"] == "NCHW":  # the runtime hands NHWC features; the graph wants its own layout
        g.node.insert(0, helper.make_node("Transpose", ["features"], [inner], name="explicam/head_nchw",
                                          perm=[0, 3, 1, 2]))
    else:
        g.node.insert(0, helper.make_node("Identity", ["features"], [inner], name="explicam/head_in"))
    g.node.append(helper.make_node("Identity", [info["score"]], ["logits"], name="explicam/head_logits"))
    g.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="explicam/head_softmax",
                                   axis=1))
    h, w, c = info["feature_shape"]
    del g.input[:], g.output[:]
    g.input.append(helper.make_tensor_value_info("features", 1, ["N", h, w, c]))
    g.output.extend([helper.make_tensor_value_info("logits", 1, ["N", info["classes"]]),
                     helper.make_tensor_value_info("probabilities", 1, ["N", info["classes"]])])
    return drop_unused_optional_outputs(head)


def drop_unused_optional_outputs(proto):
    """Remove trailing optional node outputs nothing reads (in place; returns proto). The
    gradient needs MaxPool's Indices in the main graph; a side file copied from it does not,
    and onnxruntime's MaxPool with Indices is a generic loop 3x slower than the one without
    (Recipro-CAM's and Ablation-CAM's head passes, measured at 196 maps of 14x14x256)."""
    from onnx import defs

    g = proto.graph
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    opset = {o.domain: o.version for o in proto.opset_import}
    for node in g.node:
        try:
            schema = defs.get_schema(node.op_type, opset.get(node.domain, 1), node.domain)
        except Exception:  # noqa: BLE001  (an op onnx does not know: leave it as it is)
            continue
        optional = {i for i, o in enumerate(schema.outputs) if o.option == defs.OpSchema.FormalParameterOption.Optional}
        while len(node.output) > 1 and len(node.output) - 1 in optional and node.output[-1] not in read:
            del node.output[-1]
    return proto


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


def classifier_only(main, features: bool = True):
    """The main graph pruned to image -> logits, probabilities, features (`features=False`:
    the first two alone). onnxruntime runs every node of a graph whatever outputs are asked
    for, so a call for probabilities alone on the main graph still pays for the gradient
    subgraph (5-9% here); Score-CAM's masked inputs and the evaluation's perturbed inputs
    only need probabilities, Finer-CAM the features and logits (its gradient comes from
    model.headgrad.onnx). The primary features are computed on the way to the logits
    anyway: as an output they cost nothing measurable."""
    from onnx.utils import Extractor

    outputs = ["logits", "probabilities"] + (["features"] if features else [])
    pruned = drop_unused_optional_outputs(Extractor(main).extract_model(["image"], outputs))
    export_id = {p.key: p.value for p in main.metadata_props}.get("export_id", "")
    set_metadata(pruned, {"role": "forward", "of": "the classifier of the main graph, no gradients",
                          "export_id": export_id})
    return pruned


def forward_parity(main, forward, x) -> dict:
    """model.forward.onnx against the main graph (onnxruntime sessions) on images x: the
    largest difference of the probabilities, and of the features relative to their largest
    magnitude (at least 1); the same nodes, so 0 is expected."""
    x = np.asarray(x, np.float32)
    want = main.run(["probabilities", "features"], {"image": x, "target": np.full(len(x), -1, np.int64)})
    names = [o.name for o in forward.get_outputs() if o.name in ("probabilities", "features")]
    got = dict(zip(names, forward.run(names, {"image": x})))
    report = {"forward_probabilities": float(np.abs(got["probabilities"] - want[0]).max())}
    if "features" in got:
        scale = max(1.0, float(np.abs(want[1]).max()))
        report["forward_features"] = float(np.abs(got["features"] - want[1]).max()) / scale
    return report


def write_atomic(data: bytes, path: str) -> None:
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
