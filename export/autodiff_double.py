"""A head graph in float64, for the self-check's finite differences.

In float32 a central difference is good to about 1e-2 on a deep head: small steps drown
in rounding, large ones cross ReLU kinks and max-pool near-ties. In float64 steps of 1e-6
to 1e-8 (one-sided too where a kink lies within a step) resolve both, so the check can ask
for 1e-4. onnxruntime lacks some ops in double; those
are written with ops it has: Conv as one MatMul per kernel offset (grouped), HardSigmoid,
HardSwish, Softplus and Elu elementwise, GlobalAveragePool / GlobalMaxPool as reductions,
InstanceNormalization from its formula, Resize as one MatMul per resized axis with the
matrices the gradient rule measures (autodiff_extra._resize_matrices).
A head with any other op that has no double kernel makes the session fail, and the check
falls back to float32 and its looser tolerance.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .autodiff_nn import _begin_pads
from .graph import constant_values

F32, F64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE


def _attr(node, name, default=None):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


class _Writer:
    def __init__(self, model, stem):
        self.model, self.stem, self.nodes, self.count = model, stem, [], 0

    def const(self, value, dtype=np.float64):
        self.count += 1
        name = f"{self.stem}__c{self.count}"
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type, *inputs, out=None, **attrs):
        self.count += 1
        out = out or f"{self.stem}__t{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def _conv(w, node, weights, shapes):
    """Conv as sum over kernel offsets (i, j) of W[:, :, i, j] @ strided slice of the padded input."""
    x, y = node.input[0], node.output[0]
    (_, c, h, wd), (_, m, oh, ow) = shapes[x], shapes[y]
    kh, kw = weights.shape[2:]
    g = _attr(node, "group", 1)
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    pb = _begin_pads(node, (h, wd), (oh, ow), (kh, kw), (sh, sw), (dh, dw))
    pe = [max(0, (o - 1) * s + (k - 1) * d + 1 - i - p) for i, o, k, s, d, p in
          zip((h, wd), (oh, ow), (kh, kw), (sh, sw), (dh, dw), pb)]
    xp = w.op("Pad", x, w.const([0, 0, pb[0], pb[1], 0, 0, pe[0], pe[1]], np.int64))
    terms = []
    for i in range(kh):
        for j in range(kw):
            starts = [i * dh, j * dw]
            patch = w.op("Slice", xp, w.const(starts, np.int64),
                         w.const([starts[0] + (oh - 1) * sh + 1, starts[1] + (ow - 1) * sw + 1], np.int64),
                         w.const([2, 3], np.int64), w.const([sh, sw], np.int64))
            patch = w.op("Reshape", patch, w.const([0, g, c // g, oh * ow], np.int64))
            terms.append(w.op("MatMul", w.const(weights[:, :, i, j].reshape(g, m // g, c // g)), patch))
    total = terms[0] if len(terms) == 1 else w.op("Sum", *terms)
    total = w.op("Reshape", total, w.const([0, m, oh, ow], np.int64))
    if len(node.input) > 2 and node.input[2]:
        return w.op("Add", total, w.op("Reshape", node.input[2], w.const([1, -1, 1, 1], np.int64)), out=y)
    return w.op("Identity", total, out=y)


def _average_pool(w, node, shapes, opset):
    """AveragePool as a depthwise sum (the Conv above with a kernel of ones) times the
    per-window 1/divisor that the gradient rule measures from onnxruntime."""
    from types import SimpleNamespace

    from .autodiff_nn import _pool_weights

    x, y = node.input[0], node.output[0]
    (_, c, h, wd), (_, _, oh, ow) = shapes[x], shapes[y]
    kernel, strides = _attr(node, "kernel_shape"), _attr(node, "strides", [1, 1])
    dil = _attr(node, "dilations", [1, 1])
    summed = f"{y}__sum"
    conv = helper.make_node("Conv", [x, ""], [summed], group=c, strides=strides, dilations=dil,
                            **{a.name: helper.get_attribute_value(a) for a in node.attribute
                               if a.name in ("pads", "auto_pad")})
    _conv(w, conv, np.ones((c, 1, *kernel)), {**shapes, summed: shapes[y]})
    begin = _begin_pads(node, (h, wd), (oh, ow), kernel, strides, dil)
    weights = _pool_weights(SimpleNamespace(opset=opset), node, shapes[x], shapes[y], kernel, strides, dil, begin)
    w.op("Mul", summed, w.const(weights[None, None].astype(np.float64)), out=y)


def _instance_norm(w, node, shapes):
    x, y = node.input[0], node.output[0]
    rank = len(shapes[x])
    axes, count = w.const(list(range(2, rank)), np.int64), float(np.prod(shapes[x][2:]))

    def mean(t):
        return w.op("Mul", w.op("ReduceSum", t, axes, keepdims=1), w.const(1.0 / count))
    d = w.op("Sub", x, mean(x))
    std = w.op("Sqrt", w.op("Add", mean(w.op("Mul", d, d)), w.const(_attr(node, "epsilon", 1e-5))))
    per_c = w.const([-1] + [1] * (rank - 2), np.int64)
    scaled = w.op("Mul", w.op("Div", d, std), w.op("Reshape", node.input[1], per_c))
    w.op("Add", scaled, w.op("Reshape", node.input[2], per_c), out=y)


def _resize(w, node, shapes, values, opset):
    """y = M_a x along each resized axis a (the matrices onnxruntime's own Resize applies)."""
    from types import SimpleNamespace

    from .autodiff_extra import _resize_matrices

    b = SimpleNamespace(shape=lambda n: tuple(shapes[n]), value=values.get, opset=opset)
    t, rank = node.input[0], len(shapes[node.input[0]])
    for a, mat in sorted(_resize_matrices(b, node).items()):
        mat = mat.astype(np.float64)
        if a == rank - 1:
            t = w.op("MatMul", t, w.const(mat.T))
        elif a == rank - 2:
            t = w.op("MatMul", w.const(mat), t)
        else:
            perm = [k for k in range(rank) if k != a] + [a]
            t = w.op("Transpose", w.op("MatMul", w.op("Transpose", t, perm=perm), w.const(mat.T)),
                     perm=[int(k) for k in np.argsort(perm)])
    w.op("Identity", t, out=node.output[0])


def _initializer(name, inits, producer):
    """An initializer's value, through the Identity nodes torch puts on shared weights."""
    while name not in inits and name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return inits.get(name)


def as_double(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """`model` in float64; `shapes` gives each tensor's shape (needed to write Conv out)."""
    m = copy.deepcopy(model)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    producer = {o: n for n in m.graph.node for o in n.output}
    values = constant_values(m)
    nodes = []
    for node in m.graph.node:
        w, y = _Writer(m, node.output[0]), node.output[0]
        op, x = node.op_type, (node.input[0] if node.input else "")
        weight = _initializer(node.input[1], inits, producer) if op == "Conv" else None
        if op == "Conv" and len(shapes.get(x, ())) == 4 and weight is not None:
            _conv(w, node, weight.astype(np.float64), shapes)
        elif op == "AveragePool" and len(shapes.get(x, ())) == 4:
            _average_pool(w, node, shapes, opset)
        elif op in ("HardSigmoid", "HardSwish"):
            alpha = _attr(node, "alpha", 0.2 if op == "HardSigmoid" else 1 / 6)
            gate = w.op("Clip", w.op("Add", w.op("Mul", x, w.const(alpha)), w.const(_attr(node, "beta", 0.5))),
                        w.const(0.0), w.const(1.0), out=y if op == "HardSigmoid" else None)
            if op == "HardSwish":
                w.op("Mul", x, gate, out=y)
        elif op == "Softplus":
            w.op("Log", w.op("Add", w.op("Exp", x), w.const(1.0)), out=y)
        elif op == "Elu":
            low = w.op("Mul", w.op("Sub", w.op("Exp", x), w.const(1.0)), w.const(_attr(node, "alpha", 1.0)))
            w.op("Where", w.op("Greater", x, w.const(0.0)), x, low, out=y)
        elif op == "InstanceNormalization" and shapes.get(x) is not None:
            _instance_norm(w, node, shapes)
        elif op == "Resize" and shapes.get(x) is not None and shapes.get(y) is not None:
            _resize(w, node, shapes, values, opset)
        elif op in ("GlobalAveragePool", "GlobalMaxPool"):
            reduce = "ReduceMean" if op == "GlobalAveragePool" else "ReduceMax"
            if opset >= 18:
                w.op(reduce, x, w.const([2, 3], np.int64), keepdims=1, out=y)
            else:
                w.op(reduce, x, axes=[2, 3], keepdims=1, out=y)
        else:
            w.nodes.append(node)
        nodes += w.nodes
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    for t in m.graph.initializer:
        if t.data_type == F32:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.type.tensor_type.elem_type == F32:
            vi.type.tensor_type.elem_type = F64
    for node in m.graph.node:
        for a in node.attribute:
            if a.name == "to" and a.i == F32:
                a.i = F64
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return m
