"""explicam's reverse-mode differentiation of ONNX graphs.

onnxruntime has no autograd, so the gradient of the explained score with respect to the
feature map is written into the model with forward ONNX ops: walk the nodes between the
feature tensor and the score backwards, and let each op's vector-Jacobian rule
(autodiff_rules.py, autodiff_nn.py: one function per op type) turn the gradient of its
outputs into the gradient of its inputs. Nodes that do not depend on the features are
constants for this, and shape subgraphs (Shape, Gather, Concat of int64...) carry no
gradient, so they stay as they are. A tensor read by several nodes sums their gradients.

    model, info = export_gradients("resnet.onnx")           # layer="auto", output=None, input_size=None
    report, failures = self_check("resnet.onnx", model.SerializeToString())

The new model keeps the original inputs and outputs and adds:
  input   target (N,) int64 with a default of [-1] (negative = top-1), so it need not be fed
  outputs logits (N, classes) the score; probabilities; features (N, h, w, C) NHWC whatever
          the model's layout; grads (N, h, w, C) = d logits[n, target_used[n]] / d features;
          target_used (N,) int64
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import autodiff_extra, autodiff_more, autodiff_nn, autodiff_s2d  # noqa: F401  (register the network ops' rules)
from .autodiff_rules import VJP, attr
from .graph import (FLOAT_TYPES, Graph, GraphError, ancestors, constant_values, float_dependents,
                    prepare)

RESERVED = ("target", "logits", "probabilities", "features", "grads", "target_used")
META_KEY = "explicam_autodiff"


def supported_ops() -> list[str]:
    return sorted(VJP)


class Builder:
    """Appends nodes and constants to a model and answers the rules' questions about it."""

    def __init__(self, model, shapes: dict, dtypes: dict, opset: int, prefix: str = "explicam/"):
        self.graph, self.shapes, self.dtypes, self.opset, self.prefix = model.graph, shapes, dtypes, opset, prefix
        self.values = constant_values(model)
        self.taken = {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer} | \
            {i.name for i in model.graph.input} | {n.name for n in model.graph.node}
        self.count, self.cache = 0, {}
        self.rules, self.passthrough, self.wrts, self._consumers = None, set(), set(), None
        self.broadcasts = {}   # {g: (u, k, u's shape)}: g = u * constant k, a broadcast (see transpose)
        self.s2d, self.s2d_images = {}, {}   # a first block's gradient in space-to-depth (autodiff_s2d)

    def consumers(self, name) -> list:
        """The nodes of the original graph (not the ones made here) that read tensor `name`."""
        if self._consumers is None:
            self._consumers = {}
            for n in self.graph.node:
                for i in n.input if not n.name.startswith(self.prefix) else ():
                    self._consumers.setdefault(i, []).append(n)
        return self._consumers.get(name, [])

    def producer(self, name):
        return next((n for n in self.graph.node if name in n.output), None)

    def fresh(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"{self.prefix}{hint}_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def node(self, op_type, inputs, outputs, **attrs):
        self.graph.node.append(helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh(op_type),
                                                **{k: v for k, v in attrs.items() if v is not None}))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def op(self, op_type, *inputs, n_out: int | None = None, **attrs):
        """One node; its output's name, or the list of `n_out` names when n_out is given."""
        outs = [self.fresh(op_type.lower()) for _ in range(n_out or 1)]
        self.node(op_type, inputs, outs, **attrs)
        return outs if n_out is not None else outs[0]

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(helper.tensor_dtype_to_np_dtype(dtype))
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        elif arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 64 else None
        if key is not None and key in self.cache:
            return self.cache[key]
        name = self.fresh("const")
        self.graph.initializer.append(numpy_helper.from_array(arr, name))
        self.values[name] = arr
        if key is not None:
            self.cache[key] = name
        return name

    def shape(self, name) -> tuple:
        shape = self.shapes.get(name)
        if shape is None:
            raise GraphError(f"the shape of tensor '{name}' is unknown after shape inference")
        return tuple(shape)

    def value(self, name):
        return self.values.get(name)

    def dtype(self, name) -> int:
        return self.dtypes.get(name, onnx.TensorProto.FLOAT)

    def like(self, g, x) -> str:
        """g reshaped to x's shape, the batch (axis 0) taken from g."""
        return self.op("Reshape", g, self.const([-1, *self.shape(x)[1:]]))

    def zeros_like(self, x) -> str:
        return self.op("ConstantOfShape", self.op("Shape", x),
                       value=helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [0.0]))

    def reduce_to(self, g, x, like) -> str:
        """Sum a broadcast gradient (shaped like tensor `like`, or that shape) back to x's shape."""
        xs = self.shape(x)
        gs = self.shape(like) if isinstance(like, str) else tuple(like)
        lead = len(gs) - len(xs)
        axes = list(range(lead)) + [lead + i for i, d in enumerate(xs) if d == 1 and gs[lead + i] != 1]
        if not axes:
            return g
        summed = self.op("ReduceSum", g, self.const(axes), keepdims=1)
        return self.op("Reshape", summed, self.const(list(xs))) if lead else summed

    def transpose(self, g, perm) -> str:
        """g transposed. A broadcast u * k (a global pool's gradient: (N, C, 1, 1) times a constant
        (1, 1, h, w)) whose u keeps its axes' order under perm becomes Reshape(u) * k transposed:
        no (N, C, h, w) tensor is written twice (onnxruntime, 7x7x1280: 8 us against 54)."""
        perm = [int(p) for p in perm]
        if g in self.s2d_images and perm == [0, 2, 3, 1]:
            return autodiff_s2d.to_nhwc(self, *self.s2d_images[g])
        if g in self.broadcasts and perm[0] == 0:
            u, k, us = self.broadcasts[g]
            moved = [perm.index(i) for i in range(len(us)) if us[i] != 1]
            if moved == sorted(moved) and k.ndim == len(perm):
                shape = [0] + [int(us[p]) for p in perm[1:]]
                return self.op("Mul", self.op("Reshape", u, self.const(shape)), self.const(k.transpose(perm)))
        return self.op("Transpose", g, perm=perm)

    def total(self, parts):
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else self.op("Sum", *parts)


def backward(b: Builder, nodes, wrt, score: str, seed: str, rules: dict | None = None):
    """Append to b's graph the nodes of d sum(seed * score) / d wrt over `nodes` (the forward
    graph, in topological order); return the gradient tensor's name. `wrt` may be a list of
    tensors (several feature layers, or a layer and the image): one walk, a list of names back.
    `rules` (op type -> rule) replace the registry's for this walk: guided backpropagation's
    Relu (autodiff_more.guided_rules)."""
    rules = {**VJP, **(rules or {})}
    # a rule may apply its producer's rule itself (MaxPool after a Relu applies the Relu's at the
    # pooled size, autodiff_nn._tiled_max_pool) and list that producer's output in passthrough
    wrts = [wrt] if isinstance(wrt, str) else list(wrt)
    b.rules, b.passthrough, b.wrts, start = rules, set(), set(wrts), len(b.graph.node)
    dep = float_dependents(nodes, wrts, b.dtypes)
    if score not in dep:
        raise GraphError(f"the score '{score}' does not depend on '{wrts[0]}'")
    needed, path = {score}, []
    for node in reversed(nodes):
        if any(o in needed for o in node.output) and any(i in dep for i in node.input):
            path.append(node)
            needed.update(i for i in node.input if i in dep)
    missing = [n for n in path if n.op_type not in rules]
    if missing:
        n = missing[-1]   # the first in graph order
        raise GraphError(f"node '{n.name}' ({n.op_type}) between '{wrts[0]}' and the score has no gradient rule; "
                         f"supported: {', '.join(supported_ops())}")
    grads, found = {score: [seed]}, {}
    for node in path:
        gy = [b.total(grads.pop(o, None)) for o in node.output]
        found.update((o, g) for o, g in zip(node.output, gy) if o in wrts and g is not None)  # complete: read later
        if all(g is None for g in gy):
            continue
        need = [bool(i) and i in dep and i in needed for i in node.input]
        done = node.output[0] in b.passthrough
        for i, g, n in zip(node.input, [gy[0]] if done else rules[node.op_type](b, node, gy, need), need):
            if n and g is not None:
                grads.setdefault(i, []).append(g)
    for w in wrts:
        if w not in found and w in grads:
            found[w] = b.total(grads[w])
        if w not in found:
            raise GraphError(f"the score does not depend on '{w}' through differentiable ops")
    _drop_unread(b, start, set(found.values()))
    return found[wrt] if isinstance(wrt, str) else [found[w] for w in wrts]


def _drop_unread(b: Builder, start: int, keep: set) -> None:
    """Remove the walk's nodes (from index `start`) whose outputs nothing reads: what a rule
    wrote and a later rule went around (autodiff_s2d's DepthToSpace, where the Conv's rule
    reads the layout before it). onnxruntime runs every node of a graph, read or not."""
    while True:
        read = {i for n in b.graph.node for i in n.input} | keep | {o.name for o in b.graph.output}
        dead = [i for i in range(start, len(b.graph.node)) if not any(o in read for o in b.graph.node[i].output if o)]
        if not dead:
            break
        for i in reversed(dead):
            del b.graph.node[i]
    unread = {t.name for t in b.graph.initializer if t.name.startswith(b.prefix) and t.name not in read}
    if unread:   # the constants only they read (onnxruntime warns of each), and the cache of them
        kept = [t for t in b.graph.initializer if t.name not in unread]
        del b.graph.initializer[:]
        b.graph.initializer.extend(kept)
        b.cache = {k: v for k, v in b.cache.items() if v not in unread}


def measure_shapes(model, names, feeds, dtypes=None) -> dict:
    """The shapes onnxruntime gives `names` on `feeds`. onnx shape inference and onnxruntime
    disagree on a few corner cases (a ceil_mode pool whose last window would start in the
    padding: onnxruntime drops it, as torch does), and the rules need the runtime's shapes."""
    import onnxruntime as ort

    dtypes = {**(dtypes or {}), **{v.name: v.type.tensor_type.elem_type for v in model.graph.output}}
    have = {o.name for o in model.graph.output}
    count = len(model.graph.output)
    model.graph.output.extend(helper.make_tensor_value_info(n, dtypes.get(n, onnx.TensorProto.FLOAT), None)
                              for n in names if n not in have)
    try:
        data = model.SerializeToString()
    finally:
        del model.graph.output[count:]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return {n: tuple(v.shape) for n, v in zip(names, session.run(list(names), feeds))}


def _free_reserved_names(model, extra=()) -> dict:
    """Rename tensors that use one of the names the new outputs take ('logits' -> 'logits_original')."""
    used = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input} | \
        {t.name for t in model.graph.initializer}
    renames = {name: f"{name}_original" for name in (*RESERVED, *extra) if name in used}
    if not renames:
        return {}
    for node in model.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.initializer):
        vi.name = renames.get(vi.name, vi.name)
    return renames


def layer_outputs(k: int) -> tuple[str, str]:
    """The output names of feature layer k: 0 is the primary (features, grads), then features_1, grads_1 ..."""
    return ("features", "grads") if k == 0 else (f"features_{k}", f"grads_{k}")


def add_target(b: Builder, model, score: str) -> str:
    """The `target` input (default [-1]: top-1) and the `target_used` tensor: its name."""
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "target"))
    model.graph.input.append(helper.make_tensor_value_info("target", onnx.TensorProto.INT64, [None]))
    top1 = b.op("ArgMax", score, axis=1, keepdims=0)
    return b.node("Where", [b.op("Less", "target", b.const([0])), top1, "target"], ["target_used"])


def target_seed(b: Builder, score: str, used: str, classes: int) -> tuple[str, str]:
    """(start, seed) of the backward walk for d score[n, used[n]]: in general (score, the
    one-hot of `used`). When the score is a final linear layer x W^T (+ bias) with constant W,
    as nearly every classifier ends, d score[t] / d x is W's row t: start the walk at x with
    a Gather of the targets' rows. The one-hot path multiplies the seed by the whole
    (classes, K) weight, EfficientNet-Lite0's 1000x1280: a tenth of its Grad-CAM overhead."""
    start, rows = linear_rows(b, score, classes)
    if rows is not None:
        return start, b.op("Gather", b.const(rows), used, axis=0)
    # Equal against 0..C-1 rather than OneHot: the same mask, cheaper in onnxruntime
    hit = b.op("Equal", b.op("Unsqueeze", used, b.const([1])), b.const(np.arange(classes).reshape(1, -1)))
    return score, b.op("Cast", hit, to=onnx.TensorProto.FLOAT)


def linear_rows(b: Builder, score: str, classes: int):
    """(x, rows) when `score` is x W^T (+ constant bias) with constant W: d score[c] / d x =
    rows[c], float32 (classes, K); else (score, None)."""
    start = score
    node = b.producer(start)
    while node is not None and node.op_type in ("Identity", "Add") and start not in b.wrts:
        if node.op_type == "Identity":
            start = node.input[0]
        else:   # a bias: passes the gradient unchanged to the operand shaped like the score
            rest = [i for i in node.input if b.value(i) is None]
            if len(rest) != 1 or b.shape(rest[0]) != b.shape(start):
                break
            start = rest[0]
        node = b.producer(start)
    rows = None
    if node is not None and node.op_type in ("Gemm", "MatMul") and start not in b.wrts:
        a, w = node.input[:2]
        wv = b.value(w)
        if node.op_type == "Gemm" and wv is not None and not attr(node, "transA", 0) and \
                (len(node.input) < 3 or not node.input[2] or b.value(node.input[2]) is not None):
            rows = attr(node, "alpha", 1.0) * (wv if attr(node, "transB", 0) else wv.T)
        elif node.op_type == "MatMul" and wv is not None and wv.ndim == 2 and len(b.shape(a)) == 2:
            rows = wv.T
    if rows is not None and rows.shape[0] == classes:
        return a, rows.astype(np.float32)
    return score, None


def gradient_model(g: Graph, features: str, extra=()) -> onnx.ModelProto:
    """The prepared model plus target, logits, probabilities, features, grads, target_used;
    with `extra` tensors (earlier feature layers, export --layer a,b,c) also features_1,
    grads_1, ... for each, from the same backward walk."""
    model = copy.deepcopy(g.model)
    renames = _free_reserved_names(model, [n for k in range(1, len(extra) + 1) for n in layer_outputs(k)])
    rn = lambda name: renames.get(name, name)  # noqa: E731
    shapes = {rn(k): v for k, v in g.shapes.items()}
    dtypes = {rn(k): v for k, v in g.dtypes.items()}
    feat, score, output = rn(features), rn(g.score), rn(g.output)
    layers = [feat] + [rn(e) for e in extra]
    if len(set(layers)) != len(layers):
        raise GraphError(f"a feature layer is named twice: {', '.join(layers)}")
    if any(dtypes.get(t) != onnx.TensorProto.FLOAT for t in layers) or dtypes.get(score) != onnx.TensorProto.FLOAT:
        raise GraphError("only float32 models are supported")
    forward = list(model.graph.node)
    on_path = (float_dependents(forward, layers, dtypes) & ancestors(model, score)) | set(layers)
    image = next(i for i in model.graph.input if i.name == rn(g.input))
    dims = [d.dim_value or 1 for d in image.type.tensor_type.shape.dim]
    feeds = {image.name: np.random.default_rng(0).random(dims, dtype=np.float32)}
    shapes.update(measure_shapes(model, [t for t in on_path if dtypes.get(t) == onnx.TensorProto.FLOAT], feeds))
    b = Builder(model, shapes, dtypes, g.opset)
    classes = int(np.prod(shapes[score][1:]))
    if len(shapes[score]) != 2:   # (N, classes, 1, 1) of a fully convolutional head
        flat = b.op("Flatten", score, axis=1)
        forward.append(model.graph.node[-1])
        shapes[flat], dtypes[flat], score = (1, classes), onnx.TensorProto.FLOAT, flat

    b.wrts = set(layers)
    start, seed = target_seed(b, score, add_target(b, model, score), classes)
    layer_grads = backward(b, forward, layers, start, seed)

    nchw = g.layouts.get(features) == "NCHW"
    b.node("Identity", [score], ["logits"])
    if g.activation == "LogSoftmax":
        b.node("Exp", [output], ["probabilities"])
    elif g.activation:
        b.node("Identity", [output], ["probabilities"])
    else:
        b.node("Softmax", [score], ["probabilities"], axis=1)
    described = []
    for k, (t, grad, original) in enumerate(zip(layers, layer_grads, [features, *extra])):
        t_nchw = g.layouts.get(original) == "NCHW"
        fs = shapes[t]
        t_nhwc = [fs[2], fs[3], fs[1]] if t_nchw else [fs[1], fs[2], fs[3]]
        for src, name in zip((t, grad), layer_outputs(k)):
            b.node("Identity", [b.transpose(src, [0, 2, 3, 1]) if t_nchw else src], [name])
        described.append({"layer": t, "features": layer_outputs(k)[0], "grads": layer_outputs(k)[1],
                          "layout": "NCHW" if t_nchw else "NHWC", "feature_shape": t_nhwc})
    nhwc = described[0]["feature_shape"]
    for name, dims, kind in (("logits", [classes], onnx.TensorProto.FLOAT),
                             ("probabilities", [classes], onnx.TensorProto.FLOAT),
                             *[(d[o], d["feature_shape"], onnx.TensorProto.FLOAT) for d in described[:1]
                               for o in ("features", "grads")],
                             ("target_used", [], onnx.TensorProto.INT64),
                             *[(d[o], d["feature_shape"], onnx.TensorProto.FLOAT) for d in described[1:]
                               for o in ("features", "grads")]):
        model.graph.output.append(helper.make_tensor_value_info(name, kind, ["N", *dims]))
    info = {"input": g.input, "input_layout": g.layout, "features": feat, "features_layout": "NCHW" if nchw else "NHWC",
            "feature_shape": nhwc, "score": score, "output": output, "original_output": g.output, "activation": g.activation,
            "classes": classes, "renamed": renames, "layers": described}
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(info)
    return model


def export_gradients(source, layer: str = "auto", output: str | None = None, input_size=None,
                     layout: str = "auto") -> tuple[onnx.ModelProto, dict]:
    """Load, analyse and differentiate an image classifier in one call: (new model, info)."""
    from .layers import pick_features

    g = prepare(source, input_size=input_size, layout=layout, output=output)
    features = pick_features(g, layer)
    model = gradient_model(g, features)
    info = json.loads(next(p.value for p in model.metadata_props if p.key == META_KEY))
    return model, {**info, "layer": features, "batch_fixed": g.batch_fixed}


def self_check(original, new, images=None, classes=None, samples: int = 4, directions: int = 3, seed: int = 0):
    """onnxruntime alone: (report of largest errors, failures). See autodiff_check.py."""
    from .autodiff_check import self_check as check

    return check(original, new, images=images, classes=classes, samples=samples, directions=directions, seed=seed)


__all__ = ["Builder", "GraphError", "backward", "export_gradients", "gradient_model", "self_check", "supported_ops",
           "FLOAT_TYPES"]
