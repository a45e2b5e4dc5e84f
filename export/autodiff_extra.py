"""More vector-Jacobian products (the same registry as autodiff_rules.py): broadcasting
and repetition (Expand, Tile), elementwise and reduced extrema (Max, Min, ReduceMax,
ReduceMin), Einsum, Resize, and the normalisations over a sample (InstanceNormalization,
LayerNormalization).

Ties of the extrema are split evenly among the tied elements, as torch's maximum/minimum
(1/2 each for two operands) and amax/amin do; ReduceMax is what torch.amax and x.max(dim)
export to (torch's max(dim) sends its gradient to the index it returns instead, which an
ONNX graph does not name).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .autodiff_rules import _none, _only_first, _refuse, attr, rule

F32 = onnx.TensorProto.FLOAT


def _float(b, mask):
    return b.op("Cast", mask, to=F32)


@rule("Expand")
def expand(b, node, gy, need):
    return _none(node, b.reduce_to(gy[0], node.input[0], node.output[0]))


@rule("Tile")
def tile(b, node, gy, need):
    """y = x repeated r_k times along each axis k: g reshaped to (r_1, d_1, r_2, d_2, ...) and
    summed over the r axes."""
    x = node.input[0]
    reps = b.value(node.input[1])
    if reps is None:
        _refuse(node, "the repeats must be constants")
    reps, xs = [int(r) for r in np.asarray(reps).reshape(-1)], b.shape(x)
    if reps[0] != 1:
        _refuse(node, "tiling along the batch axis")
    if all(r == 1 for r in reps):
        return _none(node, gy[0])
    split = [-1] + [v for r, d in zip(reps[1:], xs[1:]) for v in (r, d)]
    g = b.op("Reshape", gy[0], b.const(split))
    return _none(node, b.op("ReduceSum", g, b.const(list(range(1, 2 * len(xs) - 1, 2))), keepdims=0))


@rule("Max", "Min")
def extremum(b, node, gy, need):
    """Each operand where it equals the result gets g / (the number of operands that do)."""
    y = node.output[0]
    if len(node.input) == 1:
        return [gy[0]]
    masks = [_float(b, b.op("Equal", x, y)) for x in node.input]
    share = b.op("Div", gy[0], b.op("Sum", *masks))
    return [b.reduce_to(b.op("Mul", share, m), x, y) if n else None for x, m, n in zip(node.input, masks, need)]


def _reduce_axes(b, node):
    """The sorted axes of a Reduce* node (attribute before opset 18, input from 18), or None
    for 'no reduction' (noop_with_empty_axes)."""
    rank = len(b.shape(node.input[0]))
    axes = attr(node, "axes")
    if len(node.input) > 1 and node.input[1]:
        axes = b.value(node.input[1])
        if axes is None:
            _refuse(node, "the axes must be constants")
    if axes is None or len(axes) == 0:
        if attr(node, "noop_with_empty_axes", 0):
            return None
        axes = range(rank)
    axes = sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))
    if 0 in axes:
        _refuse(node, "reduction over the batch axis")
    return axes


@rule("ReduceMax", "ReduceMin")
def reduce_extremum(b, node, gy, need):
    x, y = node.input[0], node.output[0]
    axes = _reduce_axes(b, node)
    if axes is None:
        return _none(node, gy[0])
    keep = attr(node, "keepdims", 1)
    g, y = (gy[0], y) if keep else (b.op("Unsqueeze", gy[0], b.const(axes)), b.op("Unsqueeze", y, b.const(axes)))
    hit = _float(b, b.op("Equal", x, y))
    count = b.op("ReduceSum", hit, b.const(axes), keepdims=1)
    return _none(node, b.op("Mul", hit, b.op("Div", g, count)))


# ---- Einsum -----------------------------------------------------------------------------

def _terms(node, count):
    """(input terms, output term), each a list of letters with '.' for an ellipsis."""
    eq = attr(node, "equation").replace(" ", "")
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    terms = [list(t.replace("...", ".")) for t in lhs.split(",")]
    if len(terms) != count:
        _refuse(node, f"equation '{eq}' does not match its {count} inputs")
    if rhs is None:   # implicit output: the ellipsis, then the letters seen once, sorted
        letters = [c for t in terms for c in t if c != "."]
        rhs = ("." if any("." in t for t in terms) else "") + "".join(sorted(c for c in set(letters)
                                                                             if letters.count(c) == 1))
    out = list(rhs.replace("...", "."))
    for t in terms + [out]:
        if len(set(t)) != len(t):
            _refuse(node, f"equation '{eq}': a repeated subscript within one term (a diagonal)")
    return terms, out


@rule("Einsum")
def einsum(b, node, gy, need):
    """The gradient of operand i is the Einsum of g with the other operands onto i's
    subscripts; letters only operand i has (summed away) are broadcast back, ellipsis axes
    that broadcasting widened are summed back to the operand's shape."""
    terms, out = _terms(node, len(node.input))
    size = {}   # letter -> its dimension
    for name, t in zip(node.input, terms):
        shape = b.shape(name)
        if "." in t:   # the letters after the ellipsis count from the end
            k = t.index(".")
            size.update(zip(t[:k], shape[:k]))
            size.update(zip(t[k + 1:], shape[len(shape) - (len(t) - k - 1):]))
        else:
            size.update(zip(t, shape))
    ys = b.shape(node.output[0])
    ell_out = list(ys[out.index("."):out.index(".") + len(ys) - len(out) + 1]) if "." in out else []
    grads = []
    for i, (x, t, n) in enumerate(zip(node.input, terms, need)):
        if not n:
            grads.append(None)
            continue
        others = [u for k, u in enumerate(terms) if k != i]
        seen = set(out) | {c for u in others for c in u}
        if "." in t and "." not in out:
            _refuse(node, "an ellipsis summed away")
        kept = [c for c in t if c in seen]
        eq = ",".join("".join(u).replace(".", "...") for u in [out] + others) + "->" + \
            "".join(kept).replace(".", "...")
        g = b.op("Einsum", gy[0], *[v for k, v in enumerate(node.input) if k != i], equation=eq)
        full = [d for c in t for d in (ell_out if c == "." else [size[c]])]
        pos, at = [], 0
        for c in t:
            if c not in seen:
                pos.append(at)
            at += len(ell_out) if c == "." else 1
        if pos:
            if 0 in pos:
                _refuse(node, "a summed subscript on the batch axis")
            g = b.op("Expand", b.op("Unsqueeze", g, b.const(pos)), b.const([1, *full[1:]]))
        grads.append(b.reduce_to(g, x, tuple(full)) if tuple(full) != b.shape(x) else g)
    return grads


# ---- Resize -----------------------------------------------------------------------------

def _resize_matrices(b, node):
    """{axis: M (out, in)} of the interpolation Resize does along each resized axis, measured
    by onnxruntime on one-hot inputs (constant along the other axes, where the weights of
    every mode sum to 1): the matrices are the runtime's own, whatever the mode, nearest_mode,
    coordinate transformation or antialias."""
    import onnxruntime as ort

    xs, ys = b.shape(node.input[0]), b.shape(node.output[0])
    rank = len(xs)
    if b.opset < 11:
        _refuse(node, f"Resize of opset {b.opset} (convert the model to opset 13 or newer)")
    if attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        _refuse(node, "coordinate_transformation_mode tf_crop_and_resize (affine, not linear)")
    ins = list(node.input) + [""] * (4 - len(node.input))
    scales = b.value(ins[2]) if ins[2] else np.zeros(0)
    if scales is None:
        _refuse(node, "the scales must be constants")
    use_scales = np.asarray(scales).size > 0
    if not use_scales and attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        _refuse(node, "keep_aspect_ratio_policy other than stretch")
    axes = attr(node, "axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    scale = dict(zip(axes, [float(s) for s in np.asarray(scales).reshape(-1)])) if use_scales else {}
    if scale.get(0, 1.0) != 1.0 or xs[0] != ys[0]:
        _refuse(node, "resizing the batch axis")
    found = {}
    for a in range(1, rank):
        if xs[a] == ys[a] and scale.get(a, 1.0) == 1.0:
            continue
        # the probe: a batch of one one-hot per input position along a, the other axes shrunk
        pin, pout = [xs[a]] + [1] * (rank - 1), [xs[a]] + [1] * (rank - 1)
        pin[a], pout[a] = xs[a], ys[a]
        for k in range(1, rank):
            while k != a and int(np.floor(pin[k] * scale.get(k, 1.0))) < 1:
                pin[k] += 1
        feeds = {"roi": np.zeros(0, np.float32)}
        if use_scales:
            feeds["scales"] = np.array([scale.get(k, 1.0) for k in axes], np.float32)
        else:
            feeds["scales"], feeds["sizes"] = np.zeros(0, np.float32), np.array([pout[k] for k in axes], np.int64)
        probe = helper.make_node("Resize", ["x", *feeds], ["y"], **{t.name: helper.get_attribute_value(t)
                                                                   for t in node.attribute})
        g = helper.make_graph([probe], "probe", [helper.make_tensor_value_info("x", F32, pin)],
                              [helper.make_tensor_value_info("y", F32, None)],
                              [onnx.numpy_helper.from_array(v, k) for k, v in feeds.items()])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", b.opset)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        onehot = np.eye(xs[a], dtype=np.float32).reshape([xs[a]] + [xs[a] if k == a else 1 for k in range(1, rank)])
        out = session.run(None, {"x": np.ascontiguousarray(np.broadcast_to(onehot, pin))})[0]
        if out.shape[a] != ys[a]:
            _refuse(node, f"the probe gave {out.shape[a]} along axis {a}, not {ys[a]}")
        m = out[(slice(None),) + tuple(slice(None) if k == a else 0 for k in range(1, rank))].T   # (out, in)
        if m.shape != (xs[a], xs[a]) or not np.array_equal(m, np.eye(xs[a], dtype=np.float32)):
            found[a] = np.ascontiguousarray(m)
    return found


@rule("Resize")
def resize(b, node, gy, need):
    """Resize is linear in x and separable: along each resized axis y = M x, so the gradient
    is M^T g, one MatMul per axis with the constant matrix."""
    g, rank = gy[0], len(b.shape(node.input[0]))
    for a, m in sorted(_resize_matrices(b, node).items()):
        if a == rank - 1:
            g = b.op("MatMul", g, b.const(m))
        elif a == rank - 2:
            g = b.op("MatMul", b.const(np.ascontiguousarray(m.T)), g)
        else:
            perm = [k for k in range(rank) if k != a] + [a]
            g = b.op("MatMul", b.op("Transpose", g, perm=perm), b.const(m))
            g = b.op("Transpose", g, perm=[int(k) for k in np.argsort(perm)])
    return _none(node, g)


# ---- normalisation over a sample --------------------------------------------------------

def _normalised_grad(b, x, g, axes, eps):
    """d/dx of (x - mean) / sqrt(var + eps) over `axes`, applied to g:
    rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    count = float(np.prod([b.shape(x)[a] for a in axes]))
    ax = b.const(axes)

    def mean(t):
        return b.op("Mul", b.op("ReduceSum", t, ax, keepdims=1), b.const(1.0 / count))
    d = b.op("Sub", x, mean(x))
    rstd = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean(b.op("Mul", d, d)), b.const(float(eps)))))
    xhat = b.op("Mul", d, rstd)
    inner = b.op("Sub", b.op("Sub", g, mean(g)), b.op("Mul", xhat, mean(b.op("Mul", g, xhat))))
    return b.op("Mul", rstd, inner)


@rule("InstanceNormalization")
def instance_norm(b, node, gy, need):
    _only_first(node, need)
    x, scale = node.input[:2]
    rank = len(b.shape(x))
    s = b.op("Reshape", scale, b.const([-1] + [1] * (rank - 2)))
    return _none(node, _normalised_grad(b, x, b.op("Mul", gy[0], s), list(range(2, rank)),
                                        attr(node, "epsilon", 1e-5)))


@rule("LayerNormalization")
def layer_norm(b, node, gy, need):
    _only_first(node, need)
    if any(g is not None for g in gy[1:]):
        _refuse(node, "a gradient through its Mean or InvStdDev output")
    x, scale = node.input[:2]
    rank = len(b.shape(x))
    axis = attr(node, "axis", -1) % rank
    if axis == 0:
        _refuse(node, "normalisation over the batch axis")
    return _none(node, _normalised_grad(b, x, b.op("Mul", gy[0], scale), list(range(axis, rank)),
                                        attr(node, "epsilon", 1e-5)))
