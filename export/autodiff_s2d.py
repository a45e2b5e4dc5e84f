"""The gradient of a network's first block, image -> Conv -> Relu -> MaxPool (k x k windows
that tile the map), in the space-to-depth layout: each window's k*k elements as channels of
one cell of the pooled grid. Every op there but one DepthToSpace is a convolution, and
onnxruntime runs them in its blocked (NCHWc) layout on all threads.

Why: the first block is the widest map of the net and the narrowest convolution, and its
usual gradient (autodiff_nn: the pool's hits, MaxUnpool, then a ConvTranspose down to the
image's 3 channels) is a chain of single-threaded ops there. On the seed net's kernel-4
model at 224 px (onnxruntime 1.32, 2 threads, batch 1, interleaved) the whole side file
model.inputgrads.onnx runs 10.2 ms with that chain and 9.0 ms with this one; on one thread
they run alike (14.9 ms). On seed-shaped nets with random weights, kernels 2, 8, 16 and 32:
-9%, -14%, -13% and -9% on 2 threads, +2.5%, -4%, -7% and -5% on one.

Three steps, each used only where the one before applied:
- pool_grad (the MaxPool rule), for a pool read by a Relu of such a Conv:
    d  = y repeated k*k times - x in space-to-depth  (two 1x1/strided Convs of one-hot weights: exact)
    hit = HardSigmoid(-2^127 d + 1)                    (1 where x equals its window's max, else 0)
    first = Relu(Conv(hit, L))                         (L: 1 on the diagonal, -1 below it, per window:
                                                        the first hit in row-major order, as torch and
                                                        TF route ties)
    gs = first * g repeated                            (N, C k k, h, w); returned as DepthToSpace(gs)
- conv_grad (the Conv rule), when its incoming gradient is that DepthToSpace: the Conv's input
  gradient straight from gs, as one Conv on the pooled grid whose outputs are the k*k phases
  of each input channel (zero filters pad them to a multiple of 16); DepthToSpace gives the
  image's layout.
- to_nhwc (Builder.transpose), when the gradient then goes through the NHWC -> NCHW Transpose
  of a channels-last input: the phases interleaved straight into (N, H, W, C) by one Gather
  of runs of floats (onnxruntime's DepthToSpace is one-threaded: 0.17 ms here, and the
  Transpose after it 0.2).

The hit test: d = y - x is rounded once (each one-hot Conv output is one product by +-1 plus
exact zeros), and it is zero exactly where x == y; a d below 2^-126 (both values subnormal)
gives a fraction, as autodiff_more._inside says. Where onnxruntime has no NCHWc kernels
(non-x86 builds) these Convs run as plain ones; the rule was not measured there.
"""
from __future__ import annotations

import math

import numpy as np

from .autodiff_rules import attr

BLOCK = 16   # channels per group the one-hot Convs keep (onnxruntime's NCHWc block: 16 on AVX-512, 8 on AVX2)


def _begin_pads(node, in_sp, out_sp, kernel):
    from .autodiff_nn import _begin_pads as begin
    return begin(node, in_sp, out_sp, kernel, [1] * len(kernel), [1] * len(kernel))


def conv_plan(b, conv, k: int, pooled_hw):
    """(weights, pads, cin, cpad) of conv's input gradient as one Conv over the space-to-depth
    gradient on the pooled grid `pooled_hw`, or None where it does not apply: a dense,
    stride-1, undilated 2-D Conv with constant weights from fewer than 8 channels (the
    image's), whose input sides divide by k."""
    w = b.value(conv.input[1]) if len(conv.input) > 1 else None
    if conv.op_type != "Conv" or w is None or w.ndim != 4 or w.shape[1] >= 8 or attr(conv, "group", 1) != 1 \
            or list(attr(conv, "strides", [1, 1])) != [1, 1] or list(attr(conv, "dilations", [1, 1])) != [1, 1]:
        return None
    xs, ys = b.shape(conv.input[0]), b.shape(conv.output[0])
    if any(s % k for s in xs[2:]):
        return None
    m, cin, kh, kw = w.shape
    begin = _begin_pads(conv, xs[2:], ys[2:], [kh, kw])
    # the gradient at input row kY + a reads gs at pooled row Y + off, off = (a + pb - dy - a2) / k
    offs = []
    for K, pb in zip((kh, kw), begin):
        v = [(a + pb - dy - a2) // k for a in range(k) for a2 in range(k) for dy in range(K) if (a + pb - dy - a2) % k == 0]
        offs.append((min(v), max(v)))
    pads = [-lo for lo, _ in offs] + [x // k - h + hi for x, h, (_, hi) in zip(xs[2:], pooled_hw, offs)]
    if any(p < 0 for p in pads):
        return None
    T, cout = k * k, k * k * cin
    cpad = -(-cout // BLOCK) * BLOCK
    wt = np.zeros((cpad, m * T, offs[0][1] - offs[0][0] + 1, offs[1][1] - offs[1][0] + 1), np.float32)
    for a in range(k):
        for c in range(k):
            rows = slice((a * k + c) * cin, (a * k + c + 1) * cin)
            for a2 in range(k):
                for c2 in range(k):
                    cols = np.arange(m) * T + a2 * k + c2
                    for dy in range(kh):
                        for dx in range(kw):
                            ny, nx = a + begin[0] - dy - a2, c + begin[1] - dx - c2
                            if ny % k == 0 and nx % k == 0:   # one (dy, dx) per tap: no sums
                                wt[rows, cols, ny // k - offs[0][0], nx // k - offs[1][0]] = w[:, :, dy, dx].T
    return wt, pads, cin, cpad


def _first_block(b, node):
    """(relu, conv, conv_plan's plan) when `node` (a MaxPool) reads a Relu that alone reads a Conv that
    conv_plan takes, each read by the next alone; else None."""
    x = node.input[0]
    relu = b.producer(x)
    if relu is None or relu.op_type != "Relu" or b.rules is None or len(b.consumers(x)) != 1 or x in b.wrts:
        return None
    conv = b.producer(relu.input[0])
    if conv is None or len(b.consumers(relu.input[0])) != 1 or relu.input[0] in b.wrts:
        return None
    k = attr(node, "kernel_shape")[0]
    plan = conv_plan(b, conv, k, b.shape(node.output[0])[2:])
    return None if plan is None else (relu, conv, plan)


def _groups(channels: int, unit: int) -> int:
    """Groups of BLOCK-multiple channels that keep each unit (one channel's window) whole."""
    size = math.lcm(unit, BLOCK)
    return channels // size if channels % size == 0 else 1


def pool_grad(b, node, g):
    """The MaxPool's input gradient as DepthToSpace(gs) (the module docstring), recorded in
    b.s2d for the Conv's rule; None where the pool is not a tiled first block's."""
    from onnx import helper
    x, y = node.input[0], node.output[0]
    xs, ys = b.shape(x), b.shape(y)
    kernel = list(attr(node, "kernel_shape"))
    k = kernel[0]
    if len(kernel) != 2 or kernel != [k, k] or list(attr(node, "strides", [1, 1])) != kernel or \
            list(attr(node, "dilations", [1, 1])) != [1, 1] or any(attr(node, "pads", [0] * 4)) or \
            attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or attr(node, "ceil_mode", 0) or \
            (len(node.output) > 1 and node.output[1]) or b.opset < 11 or tuple(xs[2:]) != (k * ys[2], k * ys[3]) \
            or xs[1] % BLOCK:
        return None
    block = _first_block(b, node)
    if block is None:
        return None
    conv = block[1]
    g = b.rules["Relu"](b, helper.make_node("Relu", [x], [y]), [g], [True])[0]   # relu(max) = max(relu)
    b.passthrough.add(x)
    c, T = xs[1], k * k
    gr = _groups(c, 1)
    per = c // gr
    one = np.zeros((c * T, per, k, k), np.float32)   # -x in space-to-depth, channel c T + t
    rep = np.zeros((c * T, per, 1, 1), np.float32)   # y (and g) repeated T times
    for t in range(T):
        one[np.arange(c) * T + t, np.arange(c) % per, t // k, t % k] = -1.0
        rep[np.arange(c) * T + t, np.arange(c) % per] = 1.0
    d = b.op("Add", b.op("Conv", x, b.const(one), strides=[k, k], group=gr), b.op("Conv", y, b.const(rep), group=gr))
    hit = b.op("HardSigmoid", d, alpha=-2.0 ** 127, beta=1.0)
    gt = _groups(c * T, T)
    per_t = c * T // gt
    lower = np.zeros((c * T, per_t, 1, 1), np.float32)
    for t in range(T):
        for s in range(t + 1):
            lower[np.arange(c) * T + t, (np.arange(c) * T + s) % per_t] = 1.0 if s == t else -1.0
    first = b.op("Relu", b.op("Conv", hit, b.const(lower), group=gt))
    gs = b.op("Mul", first, b.op("Conv", g, b.const(rep), group=gr))
    full = b.op("DepthToSpace", gs, blocksize=k, mode="CRD")
    b.s2d[full] = (gs, k, conv.name)
    return full


def conv_grad(b, node, g):
    """The Conv's input gradient from pool_grad's gs (the module docstring), or None."""
    if g not in b.s2d or b.s2d[g][2] != node.name:
        return None
    gs, k, _ = b.s2d[g]
    plan = conv_plan(b, node, k, [s // k for s in b.shape(node.output[0])[2:]])
    if plan is None:
        return None
    wt, pads, cin, cpad = plan
    phases = b.op("Conv", gs, b.const(wt), pads=pads)
    out = phases if cpad == k * k * cin else b.op("Slice", phases, b.const([0]), b.const([k * k * cin]), b.const([1]))
    dx = b.op("DepthToSpace", out, blocksize=k, mode="DCR")
    b.s2d_images[dx] = (phases, k, cin, cpad, tuple(s // k for s in b.shape(node.input[0])[2:]))
    return dx


def to_nhwc(b, phases, k, cin, cpad, grid):
    """(N, k P, k Q, cin) from the phases Conv's output (N, cpad, P, Q), channel (a k + c) cin + i:
    out[n, k p + a, k q + c, i] = phases[n, (a k + c) cin + i, p, q]. The Transpose to channels
    last is onnxruntime's own reorder out of its blocked layout; then, for each (p, a, q), the
    k cin floats of row a are contiguous, and one Gather over runs of r = gcd(k cin, cpad)
    floats puts them in place."""
    P, Q = grid
    run = k * cin
    r = math.gcd(run, cpad)
    p, a, q, j = np.meshgrid(np.arange(P), np.arange(k), np.arange(Q), np.arange(run // r), indexing="ij")
    index = (((p * Q + q) * cpad + a * run) // r + j).reshape(-1).astype(np.int64)
    rows = b.op("Reshape", b.op("Transpose", phases, perm=[0, 2, 3, 1]), b.const([0, -1, r]))
    return b.op("Reshape", b.op("Gather", rows, b.const(index), axis=1), b.const([-1, k * P, k * Q, cin]))
