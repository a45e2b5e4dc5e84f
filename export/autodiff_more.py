"""More vector-Jacobian products (the same registry as autodiff_rules.py): the rectifiers
(Relu, Clip) with their exact float masks, guided backpropagation's rules, and Gather.

Gather is what the export's prologue writes for a BGR model (export/prologue.py: the image's
channels picked in another order); with the prologue's MatMul (grey), Mul, Sub, Div,
Transpose and Identity, every op between explicam's `image` input and the original graph
has a rule, so d score / d image runs through the user's preprocessing.

Guided backpropagation (Springenberg, Dosovitskiy, Brox & Riedmiller, "Striving for
Simplicity: The All Convolutional Net", ICLR-W 2015, section 3.4): at every ReLU the
gradient passes only where the forward input is positive (the ordinary rule) AND the
gradient arriving from above is positive. `guided_rules()` returns the rules that replace
the registry's for one backward walk (autodiff.backward(..., rules=...)): Relu, and Clip
when its lower bound is the constant 0 (ReLU6, hardtanh(0, t): a rectifier too; torch's
Captum overrides nn.ReLU modules only, so a ReLU6 network differs from Captum there).
"""
from __future__ import annotations

import numpy as np
import onnx

from .autodiff_rules import _masked, _none, _only_first, _refuse, attr, rule


def _inside(b, y, bound: float, upper: bool):
    """1.0 where y lies strictly inside `bound` (below it when upper, above it else), 0.0 at
    it: HardSigmoid(K (y - bound)) = clip(K y - K bound, 0, 1) with K the power of two that
    takes the nearest float inside the bound to 2 or more, so every y inside gives 1 and y
    at the bound exactly 0 (K y is exact, the sum rounds once). A zero bound's nearest float
    inside is subnormal: K stops at 2^127, so a y in (0, 2^-127), a subnormal activation,
    passes a fraction of its gradient, where torch passes it all. Why not Greater and Cast:
    onnxruntime's blocked-layout (NCHWc) kernels run HardSigmoid and Mul in place and the
    gradient stays in their layout, where a comparison moves every tensor out of it and
    back (EfficientNet-Lite0's saliency at batch 1, interleaved: 10.9 ms with Greater, Less,
    And and Cast against 9.9 with masks kept in the layout as 1x1 Convs, which HardSigmoid
    beats in turn, 11.7 against 14.2 in a slower hour). None when the bound's scale would
    overflow or the tensor is not float32."""
    f = np.float32(bound)
    gap = abs(float(np.nextafter(f, np.float32(-np.inf if upper else np.inf))) - float(f))
    if not 0.0 < gap < np.inf:   # an infinite bound, or none inside it
        return None
    k = min(2.0 ** float(np.ceil(np.log2(2.0 / gap))), 2.0 ** 127)
    alpha = -k if upper else k
    beta = np.float32(-alpha * float(f))
    if not np.isfinite(beta) or b.dtype(y) != onnx.TensorProto.FLOAT:
        return None
    return b.op("HardSigmoid", y, alpha=float(alpha), beta=float(beta))


def _bounds_mask(b, y, lo, hi):
    """The float mask lo < y < hi (a bound None: open) from HardSigmoids, or None."""
    masks = [_inside(b, y, v, up) for v, up in ((lo, False), (hi, True)) if v is not None]
    if not masks or any(m is None for m in masks):
        return None
    return masks[0] if len(masks) == 1 else b.op("Mul", *masks)


@rule("Relu")
def relu(b, node, gy, need):
    y = node.output[0]
    mask = _bounds_mask(b, y, 0.0, None)
    if mask is None:
        return [_masked(b, b.op("Greater", y, b.const(0.0)), gy[0])]
    return [b.op("Mul", gy[0], mask)]


def _scalar(b, name):
    """An optional input's constant value as a float: None when absent, False when it is not
    a constant scalar."""
    if not name:
        return None
    v = b.value(name)
    return float(np.reshape(v, -1)[0]) if v is not None and np.size(v) == 1 else False


@rule("Clip")
def clip(b, node, gy, need):
    _only_first(node, need)
    # the masks read the output y: lo < y < hi exactly where lo < x < hi, and x then has the
    # Clip as its one reader, so onnxruntime fuses the Clip into the Conv before it (a ReLU6
    # net's forward pass runs as fast as without the gradient)
    y = node.output[0]
    names = [node.input[i] if len(node.input) > i and node.input[i] else None for i in (1, 2)]
    bounds = [attr(node, k, None) for k in ("min", "max")] if b.opset < 11 else [_scalar(b, n) for n in names]
    if bounds == [None, None]:
        return _none(node, gy[0])
    mask = None if any(v is False for v in bounds) else _bounds_mask(b, y, *bounds)   # (0.0 == False)
    if mask is not None:
        return _none(node, b.op("Mul", gy[0], mask))
    if b.opset < 11:
        names = [b.const(v) if v is not None else None for v in bounds]
    masks = [b.op("Greater", y, names[0])] if names[0] else []
    masks += [b.op("Less", y, names[1])] if names[1] else []
    mask = masks[0] if len(masks) == 1 else b.op("And", *masks)
    return _none(node, _masked(b, mask, gy[0]))


@rule("Gather")
def gather(b, node, gy, need):
    """x gathered along `axis` at constant indices: each gathered slice's gradient goes back
    to the slice it came from (repeats summed), as a MatMul with the one-hot (k, dim) matrix
    of the indices over that axis."""
    x, idx = node.input[:2]
    ind = b.value(idx)
    if ind is None:
        _refuse(node, "the indices must be constants")
    xs = b.shape(x)
    rank = len(xs)
    axis = attr(node, "axis", 0) % rank
    if axis == 0:
        _refuse(node, "gathering along the batch axis")
    dim, ind = xs[axis], np.asarray(ind, np.int64)
    flat = np.where(ind < 0, ind + dim, ind).reshape(-1)
    g = gy[0]
    if ind.ndim == 0:    # a scalar index drops the axis: put it back, of size 1
        g = b.op("Unsqueeze", g, b.const([axis]))
    elif ind.ndim > 1:   # several index axes: one axis of their product
        g = b.op("Reshape", g, b.const([-1, *xs[1:axis], flat.size, *xs[axis + 1:]]))
    onehot = np.zeros((flat.size, dim), np.float32)
    onehot[np.arange(flat.size), flat] = 1.0
    perm = [i for i in range(rank) if i != axis] + [axis]
    if axis != rank - 1:
        g = b.op("Transpose", g, perm=perm)
    g = b.op("MatMul", g, b.const(onehot))
    if axis != rank - 1:
        g = b.op("Transpose", g, perm=[int(i) for i in np.argsort(perm)])
    return [g, None]


def guided_rules() -> dict:
    """{"Relu": rule, "Clip": rule} of guided backpropagation: the ordinary rule applied to
    max(g, 0), the incoming gradient where it is positive. A walk of its own (its own side
    file, export/input_grads.py), not a run-time switch inside the ordinary walk: a switched
    op at every rectifier (Max, Clip, PRelu with a fed floor) has no blocked-layout kernel in
    onnxruntime, and moving the gradient out of that layout and back at each one cost the
    ordinary walk 15-20% (EfficientNet-Lite0, batch 1)."""

    def guided_relu(b, node, gy, need):
        return relu(b, node, [b.op("Relu", gy[0])], need)

    def guided_clip(b, node, gy, need):
        if not _rectifier(b, node):
            return clip(b, node, gy, need)
        return clip(b, node, [b.op("Relu", gy[0])], need)

    return {"Relu": guided_relu, "Clip": guided_clip}


def _rectifier(b, node) -> bool:
    """A Clip whose lower bound is the constant 0 (ReLU6 and the like)."""
    if b.opset < 11:
        return attr(node, "min", None) == 0.0
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    value = b.value(lo) if lo else None
    return value is not None and np.size(value) == 1 and float(np.asarray(value).reshape(-1)[0]) == 0.0

