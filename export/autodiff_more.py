"""More vector-Jacobian products (the same registry as autodiff_rules.py), and guided
backpropagation's rectifier rules.

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

from .autodiff_rules import _refuse, attr, clip, relu, rule


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

