"""The check an export runs before writing anything, with onnxruntime alone.

- the new model's copies of the original outputs equal the original file's (random images),
  and the default target is the top-1 class;
- a batch gives what its images give one by one (the batch-dynamic rewrite);
- `grads` agrees with finite differences of the head graph (feature tensor ->
  score, cut out of the new model) along random directions, for several classes.

Finite differences are taken at three step sizes, in float64 one-sided as well as central,
and the best one counts, so a ReLU kink crossed by a step does not fail a correct
gradient (_fd_error). Where a direction moves a zero
feature (after a ReLU, max-pool windows are often all zeros, a tie whose gradient is a
convention, not a limit), it is retried once with those features held still.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper

from .autodiff import measure_shapes
from .autodiff_double import as_double
from .graph import infer_shapes, load_model

# grads_fd: 1e-4 where the head runs in float64 (autodiff_double.py), 5e-2 where one of its
# ops has no double kernel and float32 rounding and kinks limit the finite differences
TOLERANCES = {"outputs": 1e-4, "probabilities": 1e-4, "target_default": 0.0, "batch": 1e-4, "grads_fd": 1e-4}
FD_TOLERANCE_FLOAT32 = 5e-2
FD_STEPS = {"float64": (1e-6, 1e-7, 1e-8), "float32": (1e-2, 1e-3, 1e-4)}   # relative to the rms value


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def head_graph(model: onnx.ModelProto, features: str, score: str) -> tuple[onnx.ModelProto, list[str]]:
    """The nodes that compute `score` from `features` (and from graph inputs, for what does
    not go through the features): (model, its input names). A head that reads the image only
    for its batch size (torch's `n = x.size(0)` ... `f.view(n, -1)`: Shape(image) -> Gather 0)
    reads it from the features instead, whose axis 0 is the same batch."""
    nodes, used_inits, inputs = _head_walk(model, features, score, {})
    if len(inputs) > 1:
        swapped = _batch_from_features(model, nodes, features)
        if swapped:
            nodes, used_inits, inputs = _head_walk(model, features, score, swapped)
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, None)
                                              for i in inputs],
                              [helper.make_tensor_value_info(score, onnx.TensorProto.FLOAT, None)],
                              [t for t in model.graph.initializer if t.name in used_inits])
    head = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return head, inputs


def _head_walk(model, features, score, swapped):
    """(the nodes score needs back to features, in graph order; their initializers; the
    inputs), with the nodes in `swapped` (id -> replacement) replaced."""
    graph_nodes = [swapped.get(id(n), n) for n in model.graph.node]
    producer = {o: n for n in graph_nodes for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    keep, used_inits, inputs, seen, stack = set(), set(), [features], set(), [score]
    while stack:
        name = stack.pop()
        if not name or name in seen or name == features:
            continue
        seen.add(name)
        if name in inits:
            used_inits.add(name)
        elif name in producer:
            keep.add(id(producer[name]))
            stack.extend(producer[name].input)
        elif name in graph_inputs:
            inputs.append(name)
    return [n for n in graph_nodes if id(n) in keep], used_inits, inputs


def _batch_from_features(model, nodes, features) -> dict:
    """{id(Shape node): a copy reading `features`} for the head's Shape nodes of tensors not
    computed from the features whose every reader takes axis 0 alone (Gather of index 0,
    Slice [0:1] on axis 0)."""
    from .graph import constant_values

    values = constant_values(model)
    derived = {features}
    for n in nodes:
        if any(i in derived for i in n.input):
            derived.update(n.output)
    readers = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def const(name):
        v = values.get(name) if name else None
        return None if v is None else [int(t) for t in np.asarray(v).reshape(-1)]

    def batch_only(r, name):
        if r.op_type == "Gather" and list(r.input[:1]) == [name] and _attr(r, "axis", 0) == 0:
            return const(r.input[1]) == [0]
        if r.op_type == "Slice" and list(r.input[:1]) == [name]:
            starts, ends = const(r.input[1]), const(r.input[2])
            axes = const(r.input[3]) if len(r.input) > 3 and r.input[3] else [0]
            steps = const(r.input[4]) if len(r.input) > 4 and r.input[4] else [1]
            return starts == [0] and ends == [1] and axes == [0] and steps == [1]
        return False
    swapped = {}
    for n in nodes:
        if n.op_type != "Shape" or n.input[0] in derived or _attr(n, "start", 0) != 0 or _attr(n, "end", 1) < 1:
            continue
        if readers.get(n.output[0]) and all(batch_only(r, n.output[0]) for r in readers[n.output[0]]):
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.input[0] = features
            swapped[id(n)] = copy
    return swapped


def _attr(node, name, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max())) if a.size else 0.0


def self_check(original, new, images=None, classes=None, samples: int = 4, directions: int = 3, seed: int = 0):
    """(report: largest error per check, failures: one line per check over its tolerance)."""
    original = load_model(original) if not isinstance(original, onnx.ModelProto) else original
    new = new if isinstance(new, onnx.ModelProto) else onnx.load_from_string(bytes(new))
    info = json.loads({p.key: p.value for p in new.metadata_props}["explicam_autodiff"])
    orig_s, new_s = _session(original), _session(new)
    shape = [d.dim_value for d in next(i for i in new.graph.input if i.name == info["input"]).type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    x = np.asarray(images, np.float32) if images is not None else rng.random((samples, *shape[1:]), dtype=np.float32)
    n, report = len(x), {}

    fixed = orig_s.get_inputs()[0].shape[0] == 1
    names = [o.name for o in orig_s.get_outputs()]
    orig_in = next(i.name for i in orig_s.get_inputs() if i.name == info["input"] or len(i.shape) == 4)
    runs = [orig_s.run(None, {orig_in: x[i:i + 1]}) for i in range(n)] if fixed else [orig_s.run(None, {orig_in: x})]
    want = {k: np.concatenate([r[j] for r in runs]) for j, k in enumerate(names)}
    got = dict(zip([o.name for o in new_s.get_outputs()], new_s.run(None, {info["input"]: x})))
    report["outputs"] = max(_rel(got[info["renamed"].get(k, k)], v) for k, v in want.items())
    logits = got["logits"].astype(np.float64)
    if info["activation"] is None:
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
    else:   # the original output is the probabilities (log-probabilities after a LogSoftmax)
        probs = want[info["original_output"]]
        probs = np.exp(probs) if info["activation"] == "LogSoftmax" else probs
    report["probabilities"] = _rel(got["probabilities"], probs)
    report["target_default"] = float(np.mean(got["target_used"] != logits.argmax(1)))
    ones = [new_s.run(["logits", "grads"], {info["input"]: x[i:i + 1]}) for i in range(n)]
    report["batch"] = max(_rel(np.concatenate([o[0] for o in ones]), got["logits"]),
                          _rel(np.concatenate([o[1] for o in ones]), got["grads"]))

    layers = info.get("layers") or [{"layer": info["features"], "grads": "grads", "layout": info["features_layout"]}]
    c_all = info["classes"]
    classes = sorted({0, c_all // 2, c_all - 1}) if classes is None else list(classes)
    tols = dict(TOLERANCES)
    for k, layer in enumerate(layers):   # the primary feature layer, then any earlier ones (export --layer a,b)
        key = "grads_fd" if k == 0 else f"grads_fd_{k}"
        report[key], tols[key] = _layer_fd(new, new_s, info, x, layer, got if k == 0 else None, classes,
                                           directions, rng)
    failures = [f"{k} differs by {v:.2e} (tolerance {tols[k]:.0e})" for k, v in report.items() if not v <= tols[k]]
    return report, failures


def _layer_fd(new, new_s, info, x, layer, got, classes, directions, rng):
    """(largest finite-difference error of one layer's gradient output, its tolerance): the
    head graph from that layer's tensor to the score, in float64 where onnxruntime can."""
    n = len(x)
    head, head_inputs = head_graph(new, layer["layer"], info["score"])
    nchw = layer["layout"] == "NCHW"
    to_graph = (lambda t: t.transpose(0, 3, 1, 2)) if nchw else (lambda t: t)
    name = layer.get("features", "features")
    feats_nhwc = got["features"] if got is not None else new_s.run([name], {info["input"]: x})[0]
    feats = to_graph(feats_nhwc).astype(np.float32)
    feeds = {layer["layer"]: feats, **{k: x for k in head_inputs[1:]}}   # the image, where the head reads it
    types = infer_shapes(head)[1]
    inner = [o for nd in head.graph.node for o in nd.output if types.get(o) == onnx.TensorProto.FLOAT]
    try:
        shapes = {**{k: v.shape for k, v in feeds.items()}, **measure_shapes(head, inner, feeds, types)}
        head_s, dtype = _session(as_double(head, shapes)), np.float64
    except Exception:  # an op onnxruntime has only in float32: float32 steps, looser tolerance
        head_s, dtype = _session(head), np.float32
    feeds = {k: x.astype(dtype) for k in head_inputs[1:]}

    def head_score(f, c):
        return head_s.run(None, {layer["layer"]: f.astype(dtype), **feeds})[0].reshape(n, -1)[:, c]

    axes = tuple(range(1, feats.ndim))
    worst, tol = 0.0, TOLERANCES["grads_fd"] if dtype == np.float64 else FD_TOLERANCE_FLOAT32
    for c in classes:
        grads = to_graph(new_s.run([layer["grads"]], {info["input"]: x, "target": np.full(n, c, np.int64)})[0])
        grads = grads.astype(np.float64)
        for _ in range(directions):
            v = rng.standard_normal(feats.shape)
            steps = FD_STEPS[np.dtype(dtype).name]
            err = _fd_error(head_score, feats, grads, v, c, axes, steps)
            if err.max() > tol:   # retry without moving the zero features (ties)
                err = np.minimum(err, _fd_error(head_score, feats, grads, v * (feats != 0), c, axes, steps))
            worst = max(worst, float(err.max()))
    return worst, tol


def _fd_error(head_score, feats, grads, v, c, axes, steps):
    """Per image: |finite difference - <grads, v>| relative to the scale of <grads, v>, the
    best over the steps. In float64 (steps below 1e-5) the one-sided differences count too:
    a ReLU kink or a max-pool near-tie within a step of the point bends one side of a central
    difference (a 2-epoch seed net at 224 px missed by 3e-3 at steps 1e-6 and 1e-7, with its
    gradient equal to tf.GradientTape's to 3e-7), and with only one side bent the other
    side's difference is still the point's own slope; at such steps their truncation error
    on smooth activations is ~1e-8."""
    exact = (grads * v).sum(axes)
    scale = np.sqrt((grads ** 2).sum(axes) * (v ** 2).sum(axes) / np.prod(feats.shape[1:]))
    rms_f = float(np.sqrt((feats.astype(np.float64) ** 2).mean())) or 1.0
    rms_v = float(np.sqrt((v ** 2).mean())) or 1.0
    best = np.full(len(feats), np.inf)
    centre = head_score(feats, c).astype(np.float64) if max(steps) < 1e-5 else None
    for rel in steps:
        h = rel * rms_f / rms_v
        up, down = head_score(feats + h * v, c).astype(np.float64), head_score(feats - h * v, c).astype(np.float64)
        fds = [(up - down) / (2 * h)] + ([(up - centre) / h, (centre - down) / h] if centre is not None else [])
        for fd in fds:
            best = np.minimum(best, np.abs(fd - exact) / np.maximum(np.maximum(np.abs(exact), scale), 1e-20))
    return best
