"""model.headgrad.onnx: the gradient of any combination of class scores, through the head alone.

  inputs   features (N, h, w, C) NHWC, as model.head.onnx takes them; classes (N, K) int64 and
           weights (N, K) float: the seed, sparse (Finer-CAM's has K = k + 1 classes of 1000)
  outputs  grads (N, h, w, C) = d sum_j weights[n, j] logits[n, classes[n, j]] / d features[n]

Where the head ends in a linear layer with constant weights, the walk starts at its input
with the K weight rows gathered (a dense seed would read EfficientNet-Lite0's whole
1000x1280 weight per call: 0.1 ms, as much as the rest of the file).

Why: Finer-CAM (runtime/methods.py) weights the channels by the gradient of the target's
score minus those of its k look-alikes. Gradients are linear in the seed, so one pass with
that seed gives the whole combination; through model.onnx it would take k + 1 passes of the
body (a forward each), here it is one pass of the head (a pooling and a linear layer on most
networks: microseconds), on the features model.onnx already returned.
Only onnx, numpy and onnxruntime here.
"""
from __future__ import annotations

import copy
import os

import onnx
from onnx import helper

import numpy as np

from .autodiff import backward, linear_rows
from .graph import ancestors
from .input_grads import builder_at

CLASSES, WEIGHTS, OUTPUT = "classes", "weights", "grads"


def headgrad_path_for(onnx_path: str) -> str:
    root, _ = os.path.splitext(onnx_path)
    return root + ".headgrad.onnx"


def headgrad_model(head: onnx.ModelProto) -> onnx.ModelProto:
    """The side file from the export's head ModelProto (features -> logits, probabilities)."""
    model = copy.deepcopy(head)
    del model.metadata_props[:]
    g = model.graph
    dims = [d.dim_value or 1 for d in next(i for i in g.input if i.name == "features").type.tensor_type.shape.dim]
    nodes = list(g.node)
    b = builder_at(model, "features", (1, *dims[1:]))
    classes = int(b.shape("logits")[1])
    g.input.extend([helper.make_tensor_value_info(CLASSES, onnx.TensorProto.INT64, ["N", "K"]),
                    helper.make_tensor_value_info(WEIGHTS, onnx.TensorProto.FLOAT, ["N", "K"])])
    start, rows = linear_rows(b, "logits", classes)
    if rows is not None:   # (N, K, in): the K rows of the last layer
        picked = b.op("Gather", b.const(rows), CLASSES, axis=0)
    else:                  # (N, K, classes): one-hot rows, summed into a dense seed of the logits
        picked = b.op("Cast", b.op("Equal", b.op("Unsqueeze", CLASSES, b.const([2])),
                                   b.const(np.arange(classes).reshape(1, 1, -1))), to=onnx.TensorProto.FLOAT)
    seed = b.op("ReduceSum", b.op("Mul", picked, b.op("Unsqueeze", WEIGHTS, b.const([2]))), b.const([1]), keepdims=0)
    grad = backward(b, nodes, "features", start, seed)
    b.node("Identity", [grad], [OUTPUT])
    keep = ancestors(model, OUTPUT)   # the softmax and anything else only the logits need: gone
    kept = [n for n in g.node if any(o in keep for o in n.output)]
    del g.node[:], g.output[:]
    g.node.extend(kept)
    g.output.append(helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, ["N", *dims[1:]]))
    used = {i for n in kept for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def headgrad_error(main: onnx.ModelProto, headgrad: onnx.ModelProto, images) -> float:
    """Largest |grads - model.onnx's grads| / max |grads| over `images` (N, H, W, 3) with one-hot
    seeds of model.onnx's own target_used: the side file must give the exported gradient."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    run = lambda m, names, feeds: ort.InferenceSession(  # noqa: E731
        m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(names, feeds)
    x = np.ascontiguousarray(images, np.float32)
    feats, grads, used, logits = run(main, ["features", "grads", "target_used", "logits"], {"image": x})
    (mine,) = run(headgrad, [OUTPUT], {"features": feats, CLASSES: used.reshape(-1, 1).astype(np.int64),
                                       WEIGHTS: np.ones((len(x), 1), np.float32)})
    return float(np.abs(mine - grads).max() / max(float(np.abs(grads).max()), 1e-30))


def channel_grads_constant(main: onnx.ModelProto, headgrad: onnx.ModelProto, images, classes: int = 8) -> bool:
    """True when mean_ij d logits[c] / d features[n, i, j, k] is the same for every input: the
    head is pooling (max or average, global or windowed), flatten and linear layers. A
    max-pool's gradient moves each window's gradient to one of its elements, so the per-channel
    sum does not depend on which; a linear layer's does not depend on its input at all. Then
    Grad-CAM's and Finer-CAM's channel weights are rows of one (classes, C) matrix, which the
    runtime reads once per class from model.headgrad.onnx and reuses (OnnxModel.channel_grad_rows).
    Measured, not inferred from op types: the channel means on the images' own features and on
    signed and non-negative random ones (which flip any ReLU or max inside the head) must agree
    to 1e-5 for several classes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    x = np.ascontiguousarray(images[:4], np.float32)
    feats, logits = ort.InferenceSession(main.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        ["features", "logits"], {"image": x})
    rng = np.random.default_rng(11)
    scale = max(float(np.abs(feats).max()), 1e-3)
    noise = rng.normal(0, scale, size=(len(x), *feats.shape[1:]))
    feats = np.concatenate([feats, noise, np.abs(noise)]).astype(np.float32)
    session = ort.InferenceSession(headgrad.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for c in rng.permutation(logits.shape[1])[:classes]:
        (g,) = session.run([OUTPUT], {"features": feats, CLASSES: np.full((len(feats), 1), c, np.int64),
                                      WEIGHTS: np.ones((len(feats), 1), np.float32)})
        means = g.astype(np.float64).mean(axis=(1, 2))
        if np.abs(means - means[0]).max() > 1e-5 * max(float(np.abs(means).max()), 1e-30):
            return False
    return True


def head_side_files(main: onnx.ModelProto, head: onnx.ModelProto, images) -> tuple[list, dict, dict]:
    """The files made from the head, each checked: ([(metadata key, path_for, ModelProto)],
    {check name: error}, {metadata key: value}). model.headgrad.onnx always; model.recipro.onnx
    for heads that begin with a pooling or Flatten + dense layer (export/recipro.py). The
    metadata says whether the head's channel-mean gradients are constant (head_channel_grads)."""
    import onnxruntime as ort

    from .recipro import recipro_error, recipro_model, recipro_path_for

    grad = headgrad_model(head)
    files, checks = [("headgrad_file", headgrad_path_for, grad)], {"headgrad": headgrad_error(main, grad, images)}
    meta = {"head_channel_grads": "constant" if channel_grads_constant(main, grad, images) else "varying"}
    recipro = recipro_model(head)
    if recipro is not None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(main.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        (feats,) = session.run(["features"], {"image": np.ascontiguousarray(images[:2], np.float32)})
        files.append(("recipro_file", recipro_path_for, recipro))
        checks["recipro"] = recipro_error(head, recipro, feats)
    return files, checks, meta
