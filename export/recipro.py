"""model.recipro.onnx: Recipro-CAM's h*w masked feature maps through the head, without the maps.

  inputs   features (N, h, w, C) NHWC, as model.head.onnx takes them
  outputs  recipro (N, h*w, classes): the head's softmax scores of the map masked to each
           position alone (Recipro-CAM's one-hot spatial mask, Byun & Lee 2022)

Why: the map masked to position p is zero everywhere but p. Most heads begin with layout
ops, perhaps a non-overlapping max pooling, and then one linear op: a global average pool,
or Flatten and a dense layer. Through that prefix the masked map becomes a small linear
function of f_p, the C features at p: a gather of f_p / (h w) (pooling), or f_p times the
dense weights' rows that read p (Flatten + dense). The file computes that first linear
output for all h*w positions at once, from the features model.onnx already returned, and
runs the rest of the head on it: no h*w copies of the feature map are written or read.
A max pooling in the prefix turns f_p into max(f_p, 0), its window's other cells being 0.
A head of another shape gets no file, and Recipro-CAM feeds it the masked maps.
Only onnx and numpy here.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .autodiff import measure_shapes
from .autodiff_rules import attr
from .graph import constant_values, infer_shapes

OUTPUT = "recipro"
LAYOUT = {"Identity", "Dropout", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
POOLS = {"GlobalAveragePool", "ReduceMean"}


def recipro_path_for(onnx_path: str) -> str:
    root, _ = os.path.splitext(onnx_path)
    return root + ".recipro.onnx"


def _max_pool(src, node, out_shape):
    """Sources (1, C, H, W, m) through a MaxPool whose windows tile the input (kernel = stride,
    no padding, no dilation), each of 2 cells or more: (1, C, H', W', m * kh * kw)."""
    k = list(attr(node, "kernel_shape"))
    s = list(attr(node, "strides", None) or k)
    if len(k) != 2 or k != s or any(attr(node, "pads", [0]) or [0]) or attr(node, "ceil_mode", 0) or \
            any(d != 1 for d in (attr(node, "dilations", [1, 1]) or [1, 1])) or k[0] * k[1] < 2 or \
            attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return None
    _, c, oh, ow = out_shape
    win = src[:, :, :oh * k[0], :ow * k[1]].reshape(1, c, oh, k[0], ow, k[1], -1)
    return win.transpose(0, 1, 2, 4, 3, 5, 6).reshape(1, c, oh, ow, -1)


def _prefix(model, shapes, hwc):
    """Walk the head from `features` through layout ops (and tiling max pools) to its first
    linear op: (that node, its input's sources, relu flag, prefix tensor names) or None.
    Sources: for each element of the tensor, the flat features indices (p * C + c) it
    holds (several after a max pool; -1: none)."""
    h, w, c = hwc
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    src, relu, name, seen = np.arange(h * w * c).reshape(1, h, w, c, 1), False, "features", {"features"}
    while True:
        nodes = [n for n in consumers.get(name, []) if n.op_type != "Shape"]   # shape arithmetic reads no values
        if len(nodes) != 1:
            return None
        node = nodes[0]
        if node.op_type in POOLS | {"Gemm", "MatMul"}:
            return node, src, relu, seen
        out = tuple(shapes.get(node.output[0], ()))
        if node.op_type in LAYOUT and out:
            if node.op_type == "Transpose":
                perm = list(attr(node, "perm"))
                src = src.transpose(*perm, len(perm))
            src = src.reshape(*out, src.shape[-1])
        elif node.op_type == "MaxPool" and len(out) == 4:
            src, relu = _max_pool(src, node, out), True
            if src is None:
                return None
        else:
            return None
        name = node.output[0]
        seen.add(name)


def _pool_gather(node, src, shapes, values, hw, c):
    """A global average pool of the sources: for each output element o, the channel it reads
    at each position p and the scale, as (hw, D) flat indices into (N, hw * C) and weights."""
    x = src[..., 0] if src.shape[-1] == 1 else None
    rank = src.ndim - 1
    if node.op_type == "GlobalAveragePool":
        axes = list(range(2, rank))
    else:
        axes = attr(node, "axes") or (list(values.get(node.input[1], [])) if len(node.input) > 1 else [])
        axes = sorted(int(a) % rank for a in axes)
    if x is None or not axes or 0 in axes:
        return None
    keep = [a for a in range(rank) if a not in axes]
    groups = x.transpose(*keep, *axes).reshape(int(np.prod([x.shape[a] for a in keep])), -1)  # (D, members)
    pos, ch = groups // c, groups % c
    if groups.shape[1] != hw or not np.array_equal(np.sort(pos, axis=1), np.broadcast_to(np.arange(hw), pos.shape)):
        return None   # each output must read every position once
    index = np.empty((hw, groups.shape[0]), np.int64)
    for o in range(groups.shape[0]):
        index[pos[o], o] = pos[o] * c + ch[o]
    return index, np.float32(1.0 / hw)


def _dense_rows(node, src, values, hw, c):
    """Flatten + dense: (hw, C, D) = the weight rows each position's features meet, and the bias."""
    a, wname = node.input[:2]
    w = values.get(wname)
    if w is None or w.ndim != 2 or src.ndim != 3 or src.shape[0] != 1:
        return None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return None
        w = attr(node, "alpha", 1.0) * (w.T if attr(node, "transB", 0) else w)
        bias = values.get(node.input[2]) * attr(node, "beta", 1.0) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            return None
    else:
        bias = None
    k, m = src.shape[1], src.shape[2]
    if w.shape[0] != k:
        return None
    rows = np.zeros((hw * c, w.shape[1]), np.float64)
    flat = src[0].reshape(-1)
    ok = flat >= 0
    np.add.at(rows, flat[ok], np.repeat(w.astype(np.float64), m, axis=0)[ok])
    return rows.reshape(hw, c, -1).astype(np.float32), bias


def recipro_model(head: onnx.ModelProto):
    """The side file from the export's head ModelProto, or None for a head of another shape."""
    model = copy.deepcopy(head)
    del model.metadata_props[:]
    g = model.graph
    n_, h, w, c = [d.dim_value or 1 for d in next(i for i in g.input if i.name == "features").type.tensor_type.shape.dim]
    hw = h * w
    _, dtypes = infer_shapes(model)
    floats = [o for n in g.node for o in n.output if dtypes.get(o, 1) == onnx.TensorProto.FLOAT]
    shapes = measure_shapes(model, floats, {"features": np.random.default_rng(0).random((1, h, w, c), np.float32)})
    found = _prefix(model, shapes, (h, w, c))
    if found is None:
        return None
    linear, src, relu, prefix = found
    values = constant_values(model)
    t_name, t_shape = linear.output[0], shapes[linear.output[0]]
    new, consts = [], []

    def const(name, value):
        consts.append(numpy_helper.from_array(np.asarray(value), f"explicam_recipro_{name}"))
        return consts[-1].name

    def op(kind, inputs, out, **attrs):
        new.append(helper.make_node(kind, inputs, [out], name=f"explicam_recipro_{out}", **attrs))
        return out

    x = op("Reshape", ["features", const("flat", [-1, hw * c])], "flat")
    if relu:
        x = op("Relu", [x], "relu")
    if linear.op_type in POOLS:
        pooled = _pool_gather(linear, src, shapes, values, hw, c)
        if pooled is None:
            return None
        index, scale = pooled
        x = op("Mul", [op("Gather", [x, const("index", index)], "gather", axis=1), const("scale", scale)], "pooled")
    else:
        dense = _dense_rows(linear, src, values, hw, c)
        if dense is None:
            return None
        rows, bias = dense
        x = op("Transpose", [op("Reshape", [x, const("cells", [-1, hw, c])], "cells")], "by_cell", perm=[1, 0, 2])
        x = op("Transpose", [op("MatMul", [x, const("rows", rows)], "matmul")], "dense", perm=[1, 0, 2])
        if bias is not None:
            x = op("Add", [x, const("bias", bias.astype(np.float32))], "biased")
    op("Reshape", [x, const("t_shape", [-1, *t_shape[1:]])], t_name)
    # the rest of the head, as it was, on N * h * w rows
    made, rest = {t_name}, []
    inits = {t.name for t in g.initializer} | set(values)
    for node in g.node:
        if any(i in made for i in node.input):
            if not all(not i or i in made or i in inits for i in node.input):
                return None   # the rest reads something from before the linear op
            rest.append(node)
            made.update(node.output)
    if "probabilities" not in made:
        return None
    classes = int(shapes["probabilities"][1])
    rest.append(helper.make_node("Reshape", ["probabilities", const("out_shape", [-1, hw, classes])], [OUTPUT],
                                 name="explicam_recipro_out"))
    used = {i for n in new + rest for i in n.input}
    keep_inits = [t for t in g.initializer if t.name in used]
    keep_consts = [n for n in g.node if n.op_type == "Constant" and n.output[0] in used and n not in rest]
    del g.node[:], g.output[:], g.initializer[:]
    g.node.extend(keep_consts + new + rest)
    g.initializer.extend(keep_inits + consts)
    g.output.append(helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, ["N", hw, classes]))
    return model


def recipro_error(head: onnx.ModelProto, recipro: onnx.ModelProto, features: np.ndarray) -> float:
    """Largest |side file - head on each masked map| over `features` (N, h, w, C): the masked
    maps written out, as Recipro-CAM without the file feeds them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    run = lambda m, names, feeds: ort.InferenceSession(  # noqa: E731
        m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(names, feeds)
    n, h, w, c = features.shape
    masked = np.zeros((n, h * w, h, w, c), np.float32)
    for p in range(h * w):
        masked[:, p, p // w, p % w] = features[:, p // w, p % w]
    (want,) = run(head, ["probabilities"], {"features": masked.reshape(-1, h, w, c)})
    (got,) = run(recipro, [OUTPUT], {"features": np.ascontiguousarray(features, np.float32)})
    return float(np.abs(got - want.reshape(n, h * w, -1)).max())
