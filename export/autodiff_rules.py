"""One vector-Jacobian product per ONNX op type, written with forward ONNX ops.

A rule is `rule(b, node, gy, need) -> [gradient or None per input]`: `gy` holds the
gradient name of each output (None where nothing downstream needs it), `need[i]` says
whether input i wants one, and `b` (autodiff.Builder) makes nodes and constants and knows
each tensor's static shape at batch 1 (axis 0 is the batch, graph.prepare checks it).
Adding an op is one function and its decorator line.

Ties (MaxPool, GlobalMaxPool) go to the first maximum in row-major order, the element
torch's and TensorFlow's max-pool gradients pick; at a kink (Relu at 0, Clip at its
bounds) the gradient is 0, as in torch's relu and relu6/hardtanh and TF's relu6. The
rectifiers (Relu, Clip) and their exact float masks are in autodiff_more.py.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from .graph import GraphError

VJP = {}


def rule(*op_types):
    def register(fn):
        for op in op_types:
            VJP[op] = fn
        return fn
    return register


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _refuse(node, why):
    raise GraphError(f"node '{node.name}' ({node.op_type}): {why}")


def _only_first(node, need):
    if any(need[1:]):
        _refuse(node, "only the gradient with respect to its first input is supported")


def _none(node, first):
    return [first] + [None] * (len(node.input) - 1)


# ---- shape-only ops -------------------------------------------------------------------

@rule("Identity", "Dropout")
def identity(b, node, gy, need):
    return _none(node, gy[0])


@rule("Cast")
def cast(b, node, gy, need):
    return [b.op("Cast", gy[0], to=b.dtype(node.input[0]))]


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape(b, node, gy, need):
    return _none(node, b.like(gy[0], node.input[0]))


@rule("Transpose")
def transpose(b, node, gy, need):
    perm = attr(node, "perm") or list(range(len(b.shape(node.input[0])) - 1, -1, -1))
    return [b.transpose(gy[0], np.argsort(perm))]


@rule("Concat")
def concat(b, node, gy, need):
    rank = len(b.shape(node.output[0]))
    axis = attr(node, "axis") % rank
    if axis == 0:
        _refuse(node, "concatenation along the batch axis")
    sizes = [b.shape(i)[axis] for i in node.input]
    parts = b.op("Split", gy[0], b.const(np.array(sizes, np.int64)), axis=axis, n_out=len(sizes))
    return [p if n else None for p, n in zip(parts, need)]


@rule("Split")
def split(b, node, gy, need):
    axis = attr(node, "axis", 0) % len(b.shape(node.input[0]))
    parts = [g if g is not None else b.zeros_like(o) for g, o in zip(gy, node.output)]
    return _none(node, b.op("Concat", *parts, axis=axis))


def _slice_params(b, node):
    rank = len(b.shape(node.input[0]))
    vals = [b.value(i) if i else None for i in list(node.input[1:5]) + [""] * (5 - len(node.input))]
    starts, ends, axes, steps = vals
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) or \
            (len(node.input) > 4 and node.input[4] and steps is None):
        _refuse(node, "starts, ends, axes and steps must be constants")
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    return zip(axes, [int(s) for s in starts], [int(e) for e in ends], steps)


@rule("Slice")
def slice_(b, node, gy, need):
    x, g = node.input[0], gy[0]
    shape, cur = b.shape(x), list(b.shape(node.output[0]))   # cur: g's shape as it grows back
    begin, end = [0] * len(shape), [0] * len(shape)
    for axis, start, stop, step in _slice_params(b, node):
        dim = shape[axis]
        # the normalisation of the ONNX spec: negatives count from the end, then clamp
        start, stop = start + dim if start < 0 else start, stop + dim if stop < 0 else stop
        start, stop = (min(max(start, 0), dim), min(max(stop, 0), dim)) if step > 0 else \
            (min(max(start, 0), dim - 1), min(max(stop, -1), dim - 1))
        count = max(0, -(-(stop - start) // step))
        if count == 0:
            return _none(node, b.zeros_like(x))
        if axis == 0 and (start, count, step) != (0, dim, 1):
            _refuse(node, "slicing along the batch axis")
        if step < 0:  # reverse the gradient, then it is a positive-step slice from the last index
            g = b.op("Slice", g, b.const([-1]), b.const([-(2 ** 62)]), b.const([axis]), b.const([-1]))
            start, step = start + (count - 1) * step, -step
        if step > 1:  # put step-1 zeros after each element: (.., count, ..) -> (.., count*step, ..)
            g = b.op("Unsqueeze", g, b.const([axis + 1]))
            pads = [0] * (2 * len(cur) + 2)
            pads[len(cur) + 1 + axis + 1] = step - 1
            g = b.op("Pad", g, b.const(pads))
            cur[axis] = count * step
            g = b.op("Reshape", g, b.const([-1] + cur[1:]))
            count *= step
        begin[axis], end[axis] = start, dim - start - count   # negative end: crop the zeros past the data
    return _none(node, b.op("Pad", g, b.const(begin + end)))


@rule("Pad")
def pad(b, node, gy, need):
    if attr(node, "mode", "constant") != "constant":
        _refuse(node, f"mode {attr(node, 'mode')} (only constant padding)")
    rank = len(b.shape(node.input[0]))
    pads = b.value(node.input[1]) if len(node.input) > 1 else np.array(attr(node, "pads"))
    if pads is None:
        _refuse(node, "the pads must be constants")
    pads = [int(p) for p in pads]
    if len(node.input) > 3 and node.input[3]:  # opset 18: pads for the listed axes only
        axes = [int(a) % rank for a in b.value(node.input[3])]
        full = [0] * (2 * rank)
        for k, a in enumerate(axes):
            full[a], full[rank + a] = pads[k], pads[len(axes) + k]
        pads = full
    if pads[0] or pads[rank]:
        _refuse(node, "padding along the batch axis")
    folded = _crop_into_conv(b, node, gy[0], pads, rank)
    if folded is not None:
        return _none(node, folded)
    return _none(node, b.op("Pad", gy[0], b.const([-p for p in pads])))   # negative pads crop


def _crop_into_conv(b, node, g, pads, rank):
    """g cropped by a zero Pad's spatial pads inside the convolution gradient that wrote it,
    or None. torch ports of TensorFlow's "same" padding write an explicit Pad before each
    convolution (EfficientNet-Lite0: 17); onnxruntime fuses it into the forward Conv, but the
    crop of its gradient was a pass of its own (9% of the input-gradient call). A
    ConvTranspose crops through its pads; a stride-1 Conv (autodiff_nn._flipped_conv) pads
    less, where its pads stay >= 0."""
    conv = b.producer(g)
    if conv is None or not conv.name.startswith(b.prefix) or conv.op_type not in ("Conv", "ConvTranspose") \
            or pads[1] or pads[rank + 1] or min(pads) < 0 or node.output[0] in b.wrts \
            or attr(conv, "auto_pad", "NOTSET") != "NOTSET" \
            or (conv.op_type == "Conv" and any(s != 1 for s in attr(conv, "strides", [1]))):
        return None   # a strided Conv (a ConvTranspose's gradient) would shift its grid by stride * crop
    n = rank - 2
    crop = list(pads[2:rank]) + list(pads[rank + 2:])
    old = list(attr(conv, "pads", [0] * 2 * n))
    new = [p + c for p, c in zip(old, crop)] if conv.op_type == "ConvTranspose" else [p - c for p, c in zip(old, crop)]
    if min(new) < 0:
        return None
    kept = [a for a in conv.attribute if a.name != "pads"]
    del conv.attribute[:]
    conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
    return g


# ---- elementwise ----------------------------------------------------------------------

@rule("Add", "Sum")
def add(b, node, gy, need):
    return [b.reduce_to(gy[0], x, node.output[0]) if n else None for x, n in zip(node.input, need)]


@rule("Sub")
def sub(b, node, gy, need):
    ga = b.reduce_to(gy[0], node.input[0], node.output[0]) if need[0] else None
    gb = b.reduce_to(b.op("Neg", gy[0]), node.input[1], node.output[0]) if need[1] else None
    return [ga, gb]


@rule("Mul")
def mul(b, node, gy, need):
    (x, y), out = node.input, node.output[0]
    return [b.reduce_to(b.op("Mul", gy[0], y), x, out) if need[0] else None,
            b.reduce_to(b.op("Mul", gy[0], x), y, out) if need[1] else None]


@rule("Div")
def div(b, node, gy, need):
    (x, y), out = node.input, node.output[0]
    ga = b.reduce_to(b.op("Div", gy[0], y), x, out) if need[0] else None
    gb = b.reduce_to(b.op("Neg", b.op("Div", b.op("Mul", gy[0], out), y)), y, out) if need[1] else None
    return [ga, gb]


@rule("Pow")
def pow_(b, node, gy, need):
    _only_first(node, need)
    x, e = node.input
    if b.dtype(e) != b.dtype(x):   # an integer exponent
        e = b.op("Cast", e, to=b.dtype(x))
    grad = b.op("Mul", e, b.op("Pow", x, b.op("Sub", e, b.const(1.0, b.dtype(x)))))
    return [b.reduce_to(b.op("Mul", gy[0], grad), x, node.output[0]), None]


@rule("Where")
def where(b, node, gy, need):
    cond, x, y = node.input
    zero = b.const(0.0)
    return [None, b.reduce_to(b.op("Where", cond, gy[0], zero), x, node.output[0]) if need[1] else None,
            b.reduce_to(b.op("Where", cond, zero, gy[0]), y, node.output[0]) if need[2] else None]


def _masked(b, mask, g):
    """g where mask holds, else 0: as g * float(mask), which onnxruntime runs ~10x faster than
    Where with a broadcast 0 (0.25 against 3.3 ms on 0.8M floats, one thread)."""
    return b.op("Mul", g, b.op("Cast", mask, to=1))


@rule("LeakyRelu")
def leaky_relu(b, node, gy, need):
    alpha = attr(node, "alpha", 0.01)
    low = b.op("Mul", gy[0], b.const(alpha))
    # y > 0 exactly where x > 0 for alpha >= 0: read y, as Clip does
    return [b.op("Where", b.op("Greater", node.output[0] if alpha >= 0 else node.input[0], b.const(0.0)), gy[0], low)]


@rule("PRelu")
def prelu(b, node, gy, need):
    _only_first(node, need)
    x, slope = node.input
    return [b.op("Where", b.op("Greater", x, b.const(0.0)), gy[0], b.op("Mul", gy[0], slope)), None]


@rule("Sigmoid")
def sigmoid(b, node, gy, need):
    y = node.output[0]
    return [b.op("Mul", gy[0], b.op("Mul", y, b.op("Sub", b.const(1.0), y)))]


@rule("HardSigmoid")
def hard_sigmoid(b, node, gy, need):
    y = node.output[0]
    mask = b.op("And", b.op("Greater", y, b.const(0.0)), b.op("Less", y, b.const(1.0)))
    return [_masked(b, mask, b.op("Mul", gy[0], b.const(attr(node, "alpha", 0.2))))]


@rule("HardSwish")
def hard_swish(b, node, gy, need):
    # y = x * clip(x/6 + 1/2, 0, 1): slope 0 below -3, x/3 + 1/2 up to 3 (included, as torch), 1 above
    x = node.input[0]
    inner = b.op("Add", b.op("Mul", x, b.const(1.0 / 3.0)), b.const(0.5))
    slope = b.op("Where", b.op("LessOrEqual", x, b.const(3.0)), inner, b.const(1.0))
    return [_masked(b, b.op("GreaterOrEqual", x, b.const(-3.0)), b.op("Mul", gy[0], slope))]


@rule("Tanh")
def tanh(b, node, gy, need):
    y = node.output[0]
    return [b.op("Mul", gy[0], b.op("Sub", b.const(1.0), b.op("Mul", y, y)))]


@rule("Elu", "Selu")
def elu(b, node, gy, need):
    # x <= 0: y = gamma * alpha * (exp(x) - 1), so dy/dx = y + gamma * alpha
    y = node.output[0]
    alpha = attr(node, "alpha", 1.0 if node.op_type == "Elu" else 1.67326319217681884765625)
    gamma = 1.0 if node.op_type == "Elu" else attr(node, "gamma", 1.05070102214813232421875)
    low = b.op("Mul", gy[0], b.op("Add", y, b.const(gamma * alpha)))
    high = gy[0] if gamma == 1.0 else b.op("Mul", gy[0], b.const(gamma))
    return [b.op("Where", b.op("Greater", node.input[0], b.const(0.0)), high, low)]


@rule("Softplus")
def softplus(b, node, gy, need):
    return [b.op("Mul", gy[0], b.op("Sigmoid", node.input[0]))]


@rule("Exp")
def exp(b, node, gy, need):
    return [b.op("Mul", gy[0], node.output[0])]


@rule("Log")
def log(b, node, gy, need):
    return [b.op("Div", gy[0], node.input[0])]


@rule("Sqrt")
def sqrt(b, node, gy, need):
    return [b.op("Div", gy[0], b.op("Mul", node.output[0], b.const(2.0)))]


@rule("Neg")
def neg(b, node, gy, need):
    return [b.op("Neg", gy[0])]


@rule("Reciprocal")
def reciprocal(b, node, gy, need):
    y = node.output[0]
    return [b.op("Neg", b.op("Mul", gy[0], b.op("Mul", y, y)))]


@rule("Erf")
def erf(b, node, gy, need):
    x = node.input[0]
    bell = b.op("Exp", b.op("Neg", b.op("Mul", x, x)))
    return [b.op("Mul", gy[0], b.op("Mul", bell, b.const(2.0 / np.sqrt(np.pi))))]


@rule("Softmax")
def softmax(b, node, gy, need):
    y, axis = node.output[0], attr(node, "axis", -1)
    dot = b.op("ReduceSum", b.op("Mul", gy[0], y), b.const([axis]), keepdims=1)
    return [b.op("Mul", y, b.op("Sub", gy[0], dot))]


@rule("LogSoftmax")
def log_softmax(b, node, gy, need):
    y, axis = node.output[0], attr(node, "axis", -1)
    total = b.op("ReduceSum", gy[0], b.const([axis]), keepdims=1)
    return [b.op("Sub", gy[0], b.op("Mul", b.op("Exp", y), total))]


@rule("BatchNormalization")
def batch_norm(b, node, gy, need):
    _only_first(node, need)
    if attr(node, "training_mode", 0) or len([o for o in node.output if o]) > 1:
        _refuse(node, "training mode (export the model in eval mode)")
    x, scale, _, _, var = node.input[:5]
    eps, rank = attr(node, "epsilon", 1e-5), len(b.shape(x))
    s, v = b.value(scale), b.value(var)
    if s is not None and v is not None:
        k = b.const((s.astype(np.float64) / np.sqrt(v.astype(np.float64) + eps)).reshape(-1, *[1] * (rank - 2)))
    else:
        k = b.op("Div", scale, b.op("Sqrt", b.op("Add", var, b.const(eps))))
        k = b.op("Reshape", k, b.const([-1] + [1] * (rank - 2)))
    return _none(node, b.op("Mul", gy[0], k))
