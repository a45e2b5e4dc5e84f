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


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def headgrad_error(headgrad, features, grads, used) -> float:
    """Largest |grads - model.onnx's grads| / max |grads| with one-hot seeds of model.onnx's own
    target_used, on model.onnx's features: the side file must give the exported gradient.
    `headgrad`: the side file's ModelProto or an onnxruntime session of it."""
    session = _session(headgrad) if isinstance(headgrad, onnx.ModelProto) else headgrad
    (mine,) = session.run([OUTPUT], {"features": features, CLASSES: used.reshape(-1, 1).astype(np.int64),
                                     WEIGHTS: np.ones((len(features), 1), np.float32)})
    return float(np.abs(mine - grads).max() / max(float(np.abs(grads).max()), 1e-30))


def channel_grads_constant(headgrad, features, n_classes: int, classes: int = 8) -> bool:
    """True when mean_ij d logits[c] / d features[n, i, j, k] is the same for every input: the
    head is pooling (max or average, global or windowed), flatten and linear layers. A
    max-pool's gradient moves each window's gradient to one of its elements, so the per-channel
    sum does not depend on which; a linear layer's does not depend on its input at all. Then
    Grad-CAM's and Finer-CAM's channel weights are rows of one (classes, C) matrix, which the
    runtime reads once per class from model.headgrad.onnx and reuses (OnnxModel.channel_grad_rows).
    Measured, not inferred from op types: the channel means on `features` (the images' own) and
    on signed and non-negative random ones (which flip any ReLU or max inside the head) must
    agree to 1e-5 for several classes. `headgrad`: ModelProto or onnxruntime session."""
    session = _session(headgrad) if isinstance(headgrad, onnx.ModelProto) else headgrad
    rng = np.random.default_rng(11)
    feats = np.asarray(features, np.float32)
    noise = rng.normal(0, max(float(np.abs(feats).max()), 1e-3), size=feats.shape)
    feats = np.concatenate([feats, noise, np.abs(noise)]).astype(np.float32)
    for c in rng.permutation(n_classes)[:classes]:
        (g,) = session.run([OUTPUT], {"features": feats, CLASSES: np.full((len(feats), 1), c, np.int64),
                                      WEIGHTS: np.ones((len(feats), 1), np.float32)})
        means = g.astype(np.float64).mean(axis=(1, 2))
        if np.abs(means - means[0]).max() > 1e-5 * max(float(np.abs(means).max()), 1e-30):
            return False
    return True


def ablation_linear(head, headgrad, features, n_classes: int, classes: int = 4, channels: int = 8) -> bool:
    """True when zeroing channel k of the features lowers every class score by exactly
    sum_ij A_ij^k d y_c / d A_ij^k: the head adds up one positively homogeneous function of
    each channel (pooling, max or average, then linear layers; a bias after them cancels).
    Then Ablation-CAM's score drops (Desai & Ramaswamy 2020) come from model.onnx's own
    features and gradient, one pass, where each channel would be a head run of its own
    (runtime/methods.ablationcam). Measured like channel_grads_constant: head runs with
    channels zeroed against that sum, on `features` and on signed and non-negative random
    ones (a ReLU, a bias inside or a mixing of channels before a nonlinearity breaks it),
    for several classes, to 1e-4 of the largest drop. `head`, `headgrad`: ModelProto or
    onnxruntime session."""
    run, grad = (_session(m) if isinstance(m, onnx.ModelProto) else m for m in (head, headgrad))
    rng = np.random.default_rng(12)
    feats = np.asarray(features, np.float32)
    noise = rng.normal(0, max(float(np.abs(feats).max()), 1e-3), size=feats.shape)
    feats = np.concatenate([feats, noise, np.abs(noise)]).astype(np.float32)
    picked = rng.permutation(feats.shape[-1])[:channels]
    base = run.run(["logits"], {"features": feats})[0].astype(np.float64)
    drops = []
    for k in picked:
        zeroed = feats.copy()
        zeroed[..., k] = 0.0
        drops.append(base - run.run(["logits"], {"features": zeroed})[0])
    drops = np.stack(drops, axis=1)   # (N, channels, classes)
    for c in rng.permutation(n_classes)[:classes]:
        (g,) = grad.run([OUTPUT], {"features": feats, CLASSES: np.full((len(feats), 1), c, np.int64),
                                   WEIGHTS: np.ones((len(feats), 1), np.float32)})
        euler = (g.astype(np.float64) * feats)[..., picked].sum(axis=(1, 2))   # (N, channels)
        if np.abs(euler - drops[:, :, c]).max() > 1e-4 * max(float(np.abs(drops[:, :, c]).max()), 1e-30):
            return False
    return True


def head_side_files(main: onnx.ModelProto, head: onnx.ModelProto, images) -> tuple[list, dict, dict]:
    """The files made from the head, each checked: ([(metadata key, path_for, ModelProto)],
    {check name: error}, {metadata key: value}). model.headgrad.onnx always; model.recipro.onnx
    for heads that begin with a pooling or Flatten + dense layer (export/recipro.py). The
    metadata says whether the head's channel-mean gradients are constant (head_channel_grads)
    and whether Ablation-CAM's drops are its gradient times the features (head_ablation).
    model.onnx runs once on `images`; every check reads that."""
    from .recipro import recipro_error, recipro_model, recipro_path_for

    feats, grads, used, logits = _session(main).run(["features", "grads", "target_used", "logits"],
                                                    {"image": np.ascontiguousarray(images, np.float32)})
    grad = headgrad_model(head)
    session = _session(grad)
    files, checks = [("headgrad_file", headgrad_path_for, grad)], {"headgrad": headgrad_error(session, feats, grads, used)}
    constant = channel_grads_constant(session, feats[:4], logits.shape[1])
    meta = {"head_channel_grads": "constant" if constant else "varying",
            "head_ablation": "linear" if ablation_linear(head, session, feats[:4], logits.shape[1]) else "rerun"}
    recipro = recipro_model(head)
    if recipro is not None:
        files.append(("recipro_file", recipro_path_for, recipro))
        checks["recipro"] = recipro_error(head, recipro, feats[:2])
    return files, checks, meta
