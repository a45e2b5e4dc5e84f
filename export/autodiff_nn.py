"""Vector-Jacobian products of the network ops: convolutions, pooling, normalisation across
channels, reductions and matrix products (the elementwise and shape ops are in
autodiff_rules.py, the same registry).

The adjoint of a convolution is the transposed convolution with the same weights, strides,
dilations and groups; its pads and output_padding are worked out from the static shapes so
that the gradient has exactly the input's shape whatever the padding mode, stride remainder
or ceil_mode left unused at the end.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from . import autodiff_s2d
from .autodiff_rules import _none, _only_first, _refuse, attr, rule


def _begin_pads(node, in_sp, out_sp, kernel, strides, dil):
    """The padding before each spatial axis, with auto_pad resolved as the ONNX spec says."""
    n, auto = len(in_sp), attr(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max(0, (o - 1) * s + (k - 1) * d + 1 - i) for i, o, k, s, d in zip(in_sp, out_sp, kernel, strides, dil)]
        return [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    if auto == "VALID":
        return [0] * n
    return list(attr(node, "pads", [0] * 2 * n))[:n]


def _transpose_pads(in_sp, out_sp, kernel, strides, dil, begin):
    """(pads, output_padding) of the ConvTranspose that maps the output back onto the input.

    The transposed op writes a full map of stride*(out-1) + dilated kernel and crops `begin`
    before and the rest after; where the forward windows stopped short of the input's end
    (stride remainder) the rest is negative, and output_padding adds those zero rows instead."""
    ends, extra = [], []
    for i, o, k, s, d, pb in zip(in_sp, out_sp, kernel, strides, dil, begin):
        crop_end = s * (o - 1) + (k - 1) * d + 1 - i - pb
        ends.append(max(crop_end, 0))
        extra.append(max(-crop_end, 0))
    return list(begin) + ends, extra


def _geometry(b, node, kernel):
    xs, ys = b.shape(node.input[0]), b.shape(node.output[0])
    n = len(xs) - 2
    strides = list(attr(node, "strides", [1] * n))
    dil = list(attr(node, "dilations", [1] * n))
    begin = _begin_pads(node, xs[2:], ys[2:], kernel, strides, dil)
    pads, extra = _transpose_pads(xs[2:], ys[2:], kernel, strides, dil, begin)
    return dict(strides=strides, dilations=dil, pads=pads, output_padding=extra)


def _flipped_conv(b, node, g):
    """A convolution's input gradient as a Conv of g with the weights flipped in space and
    transposed within each group: dX[i] = sum_t g[i + pb - t d] W[t]. onnxruntime's Conv
    runs this several times faster than its ConvTranspose (measured on EfficientNet-Lite0's
    depthwise and 1x1 convolutions: 44% of the input-gradient pass went to ConvTranspose).
    A strided depthwise convolution first spreads g onto the stride grid (zeros between, a
    1x1 ConvTranspose of ones), then takes the same stride-1 Conv: EfficientNet-Lite0's four
    stride-2 depthwise gradients took 1.2-4.5x longer as one ConvTranspose each (onnxruntime
    1.32, batch 1 and 4; the 5x5 kernels gain most). A dense strided Conv keeps ConvTranspose,
    whose one GEMM beats a Conv over a map that is three quarters zeros (2-3x, ResNet's).
    None when it does not apply (non-constant weights, padding beyond the kernel)."""
    w = b.value(node.input[1])
    xs, ys = b.shape(node.input[0]), b.shape(node.output[0])
    n = len(xs) - 2
    strides, dil = list(attr(node, "strides", [1] * n)), list(attr(node, "dilations", [1] * n))
    groups = attr(node, "group", 1)
    strided = any(s != 1 for s in strides)
    # a dense conv from a few channels (the image's 3): its gradient Conv would write 3 channels,
    # which onnxruntime's blocked Conv does slowly; ConvTranspose is 2x faster there (conv0 at 224 px).
    # Zero filters that pad the Conv to 4, 8 or 16 outputs, then a Slice, do not help: 4.1-4.3 ms
    # against 2.3 for the ConvTranspose (16 -> 3 channels, 4x4, 224 px, batch 1, onnxruntime 1.32)
    if w is None or (strided and not (groups > 1 and w.shape[1] == 1)) or (groups == 1 and w.shape[1] < 8):
        return None
    kernel = list(w.shape[2:])
    begin = _begin_pads(node, xs[2:], ys[2:], kernel, strides, dil)
    spread = [s * (o - 1) + 1 for o, s in zip(ys[2:], strides)]   # g's length on the stride grid
    pads = [(k - 1) * d - p for k, d, p in zip(kernel, dil, begin)] + [i + pb - L for i, pb, L in zip(xs[2:], begin, spread)]
    if any(p < 0 for p in pads):
        return None
    m, cg = w.shape[:2]
    if strided:
        g = b.op("ConvTranspose", g, b.const(np.ones((m, 1) + (1,) * n, w.dtype)), group=m, strides=strides)
    wt = w.reshape(groups, m // groups, cg, *kernel).swapaxes(1, 2).reshape(groups * cg, m // groups, *kernel)
    wt = np.ascontiguousarray(wt[(slice(None), slice(None)) + (slice(None, None, -1),) * n])
    return b.op("Conv", g, b.const(wt), group=groups, dilations=dil, pads=pads)


@rule("Conv")
def conv(b, node, gy, need):
    _only_first(node, need)
    w = node.input[1]
    flipped = autodiff_s2d.conv_grad(b, node, gy[0]) or _flipped_conv(b, node, gy[0])
    if flipped is not None:
        return _none(node, flipped)
    geo = _geometry(b, node, b.shape(w)[2:])
    return _none(node, b.op("ConvTranspose", gy[0], w, group=attr(node, "group", 1), **geo))


@rule("ConvTranspose")
def conv_transpose(b, node, gy, need):
    _only_first(node, need)
    if attr(node, "auto_pad", "NOTSET") != "NOTSET" or attr(node, "output_shape"):
        _refuse(node, "auto_pad and output_shape are not supported (explicit pads are)")
    xs = b.shape(node.input[0])
    n = len(xs) - 2
    pads = list(attr(node, "pads", [0] * 2 * n))
    extra = list(attr(node, "output_padding", [0] * n))
    # the forward op cropped pads[n + i] after, less the output_padding it added back
    ends = [max(0, pe - op) for pe, op in zip(pads[n:], extra)]
    return _none(node, b.op("Conv", gy[0], node.input[1], group=attr(node, "group", 1),
                            strides=list(attr(node, "strides", [1] * n)),
                            dilations=list(attr(node, "dilations", [1] * n)), pads=pads[:n] + ends))


@rule("MaxPool")
def max_pool(b, node, gy, need):
    """Each output's gradient goes to the element MaxPool's own Indices output names: the
    first maximum of its window, row-major, padding excluded (onnxruntime's pooling loop
    keeps the first of equal values, like torch's and TF's max-pool gradients)."""
    if attr(node, "storage_order", 0):
        _refuse(node, "storage_order=1")
    x = node.input[0]
    tiled = autodiff_s2d.pool_grad(b, node, gy[0]) or _tiled_max_pool(b, node, gy[0])
    if tiled is not None:
        return [tiled]
    if len(node.output) < 2 or not node.output[1]:
        del node.output[1:]
        node.output.append(b.fresh("maxpool_indices"))
    kernel = attr(node, "kernel_shape")
    n = len(kernel)
    strides, dil = attr(node, "strides", [1] * n), attr(node, "dilations", [1] * n)
    overlapping = any((k - 1) * d + 1 > s for k, s, d in zip(kernel, strides, dil))
    if overlapping and b.opset < 16:
        _refuse(node, "overlapping windows need opset 16 or newer (ScatterElements with reduction)")
    zeros = b.op("ConstantOfShape", b.op("Reshape", b.op("Size", x), b.const([1])),
                 value=helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [0.0]))
    flat = [b.op("Reshape", t, b.const([-1])) for t in (node.output[1], gy[0])]
    extra = {"reduction": "add"} if overlapping else {}   # a 3x3/2 window shares elements
    return [b.like(b.op("ScatterElements", zeros, *flat, axis=0, **extra), x)]


F32_EXACT = 2 ** 24   # integers below this are exact in float32 (a test lowers it for the int64 path)


def _tiled_max_pool(b, node, g):
    """The same gradient where square 2-D windows tile the input (strides = kernel, no padding
    or dilation: the usual 2x2/2), without the Indices output. The hits x == y (y repeated k
    times along the width by a nearest Resize, broadcast over the window's k rows) are weighted
    by a priority falling in row-major order, big - (dy W + dx) for the element (dy, dx) of a
    window, distinct within it; a MaxPool of that is the first hit's priority, which gives its
    flat index directly, and MaxUnpool writes g there and zeros elsewhere (floor mode's
    leftover rows and columns too). onnxruntime 1.32, 2 threads, after a Relu on 16x224x224:
    1.3 ms (51 at batch 32) against 4.2 (181) for the strided Slices, masks and DepthToSpace
    this replaced; MaxPool's own Indices are a generic loop ~20x slower than the pooling.
    None where the windows do not tile or the opset lacks Range (the Indices rule then)."""
    x, y = node.input[0], node.output[0]
    xs, ys = b.shape(x), b.shape(y)
    kernel = list(attr(node, "kernel_shape"))
    strides, dil = list(attr(node, "strides", [1] * len(kernel))), list(attr(node, "dilations", [1] * len(kernel)))
    if len(kernel) != 2 or kernel[0] != kernel[1] or strides != kernel or dil != [1, 1] or b.opset < 11 or \
            (len(node.output) > 1 and node.output[1]) or any(_begin_pads(node, xs[2:], ys[2:], kernel, strides, dil)) \
            or any(o * k > i for i, o, k in zip(xs[2:], ys[2:], kernel)):
        return None
    k, (c, hi, wi), (h, w) = kernel[0], xs[1:], ys[2:]
    relu = b.producer(x)
    if relu is not None and relu.op_type == "Relu" and b.rules is not None and len(b.consumers(x)) == 1 \
            and x not in b.wrts:
        # relu(max) = max(relu): the Relu's rule (plain or guided) at the pooled size, where its
        # mask at each window's maximum is y > 0; the Relu then passes the gradient through (not
        # where the walk wants d score / d x itself: the feature map after a ReLU)
        g = b.rules["Relu"](b, onnx.helper.make_node("Relu", [x], [y]), [g], [True])[0]
        b.passthrough.add(x)
    big = (k - 1) * wi + k   # the priorities run from big (the window's first element) down to 1
    if (hi, wi) != (h * k, w * k):
        x = b.op("Slice", x, b.const([0, 0]), b.const([h * k, w * k]), b.const([2, 3]))
    # asymmetric / floor: output j reads input j // k exactly, and runs ~2x faster than half_pixel
    roi = "" if b.opset >= 13 else b.const(np.zeros(0, np.float32))
    yw = b.op("Resize", y, roi, b.const([1.0, 1.0, 1.0, float(k)]), mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    hit = b.op("Equal", b.op("Reshape", x, b.const([0, c, h, k, w * k])),
               b.op("Reshape", yw, b.const([0, c, h, 1, w * k])))
    rank = np.arange(k)[:, None] * wi + np.arange(w * k)[None, :] % k   # dy W + dx
    p = _mul_mask(b, hit, b.const((big - rank).astype(np.float32).reshape(1, 1, 1, k, w * k)))
    # one channel: onnxruntime would wrap a C-channel MaxPool in NCHWc reorders
    p = b.op("MaxPool", b.op("Reshape", p, b.const([-1, 1, h * k, w * k])), kernel_shape=[k, k], strides=[k, k])
    # a window with no hit (all NaN) still needs an index inside it: its last element
    first = b.op("Max", b.op("Reshape", p, b.const([-1, c, h, w])), b.const(1.0))
    return b.op("MaxUnpool", g, _window_index(b, g, first, big, k, c, hi, wi, h, w), b.op("Shape", node.input[0]),
                kernel_shape=[k, k], strides=[k, k])


def _window_index(b, g, first, big, k, c, hi, wi, h, w):
    """(N, C, h, w) int64: the flat index in (N, C, hi, wi) of each window's element whose
    priority is `first`: (n C + c) hi wi (a Range over the planes) + k i wi + k j + big - first."""
    base = (np.arange(h)[:, None] * k * wi + np.arange(w)[None, :] * k + big)[None, None]
    if base.max() < F32_EXACT:
        idx = b.op("Cast", b.op("Sub", b.const(base.astype(np.float32)), first), to=onnx.TensorProto.INT64)
    else:
        idx = b.op("Sub", b.const(base.astype(np.int64)), b.op("Cast", first, to=onnx.TensorProto.INT64))
    n = b.op("Slice", b.op("Shape", g), b.const([0]), b.const([1]))
    total = b.op("Reshape", b.op("Mul", n, b.const([c * hi * wi])), b.const(np.zeros(0, np.int64)))   # a scalar
    planes = b.op("Range", b.const(np.array(0, np.int64)), total, b.const(np.array(hi * wi, np.int64)))
    return b.op("Add", idx, b.op("Reshape", planes, b.const([-1, c, 1, 1])))


def _mul_mask(b, mask, g):
    return b.op("Mul", g, b.op("Cast", mask, to=onnx.TensorProto.FLOAT))


def _pool_weights(b, node, xs, ys, kernel, strides, dil, begin):
    """1 / (the divisor of each output window), per output position: onnxruntime runs the
    pool on ones (giving valid/divisor) and the valid counts are exact integers, so the
    gradient matches the runtime's own count_include_pad and ceil_mode conventions."""
    import onnxruntime as ort

    sp = list(xs[2:])
    probe = helper.make_graph([helper.make_node("AveragePool", ["x"], ["y"], **{a.name: helper.get_attribute_value(a)
                                                                              for a in node.attribute})],
                              "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, *sp])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(probe, opset_imports=[helper.make_opsetid("", b.opset)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ones = session.run(None, {"x": np.ones((1, 1, *sp), np.float32)})[0][0, 0]
    valid = np.ones((), np.float64)
    for i, o, k, s, d, pb in zip(sp, ys[2:], kernel, strides, dil, begin):
        pos = np.arange(o)[:, None] * s - pb + np.arange(k)[None, :] * d
        valid = np.multiply.outer(valid, ((pos >= 0) & (pos < i)).sum(1))
    return np.where(valid > 0, ones / np.maximum(valid, 1), 0).astype(np.float32)


@rule("AveragePool")
def average_pool(b, node, gy, need):
    xs, ys = b.shape(node.input[0]), b.shape(node.output[0])
    kernel = list(attr(node, "kernel_shape"))
    geo = _geometry(b, node, kernel)
    begin = geo["pads"][:len(kernel)]
    weights = _pool_weights(b, node, xs, ys, kernel, geo["strides"], geo["dilations"], begin)
    ones = b.const(np.ones((xs[1], 1, *kernel), np.float32))
    g = b.op("Mul", gy[0], b.const(weights[None, None]))
    return [b.op("ConvTranspose", g, ones, group=xs[1], **geo)]


@rule("GlobalAveragePool")
def global_average_pool(b, node, gy, need):
    # one broadcast Mul by 1 / area over the window: twice as fast in onnxruntime as a Mul and
    # an Expand, and Builder.transpose can fold an NHWC transpose after it
    xs = b.shape(node.input[0])
    k = np.full((1, 1, *xs[2:]), 1.0 / float(np.prod(xs[2:])), np.float32)
    g = b.op("Mul", gy[0], b.const(k))
    b.broadcasts[g] = (gy[0], k, b.shape(node.output[0]))
    return [g]


@rule("GlobalMaxPool")
def global_max_pool(b, node, gy, need):
    x, xs = node.input[0], b.shape(node.input[0])
    area = int(np.prod(xs[2:]))
    first = b.op("ArgMax", b.op("Reshape", x, b.const([0, 0, -1])), axis=2, keepdims=1, select_last_index=0)
    hit = b.op("Cast", b.op("Equal", first, b.const(np.arange(area).reshape(1, 1, area))), to=onnx.TensorProto.FLOAT)
    return [b.like(b.op("Mul", hit, b.op("Reshape", gy[0], b.const([0, 0, 1]))), x)]


@rule("ReduceMean", "ReduceSum")
def reduce(b, node, gy, need):
    x = node.input[0]
    xs = b.shape(x)
    axes = attr(node, "axes")
    if len(node.input) > 1 and node.input[1]:   # axes as an input: ReduceSum >= 13, ReduceMean >= 18
        axes = b.value(node.input[1])
        if axes is None:
            _refuse(node, "the axes must be constants")
    if axes is None or len(axes) == 0:
        if attr(node, "noop_with_empty_axes", 0):
            return _none(node, gy[0])
        axes = range(len(xs))
    axes = sorted(int(a) % len(xs) for a in axes)
    if 0 in axes:
        _refuse(node, "reduction over the batch axis")
    g = gy[0] if attr(node, "keepdims", 1) else b.op("Unsqueeze", gy[0], b.const(axes))
    if node.op_type == "ReduceMean":
        g = b.op("Mul", g, b.const(1.0 / float(np.prod([xs[a] for a in axes]))))
    return _none(node, b.op("Expand", g, b.const([1, *xs[1:]])))


@rule("Gemm")
def gemm(b, node, gy, need):
    a, w = node.input[:2]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    ta, tb, g = attr(node, "transA", 0), attr(node, "transB", 0), gy[0]
    out = [None] * len(node.input)
    if need[0]:   # y = alpha * A' B' + beta * C, A' = A or A^T, B' = B or B^T
        out[0] = b.op("Gemm", g, w, alpha=alpha, transB=1 - tb) if not ta else \
            b.op("Gemm", w, g, alpha=alpha, transA=tb, transB=1)
    if need[1]:
        out[1] = b.op("Gemm", a, g, alpha=alpha, transA=1 - ta) if not tb else \
            b.op("Gemm", g, a, alpha=alpha, transA=1, transB=ta)
    if c and need[2]:
        out[2] = b.reduce_to(b.op("Mul", g, b.const(beta)), c, node.output[0])
    return out


def _swap_last(b, name):
    value = b.value(name)
    if value is not None:   # a constant weight: transpose it now, not at every run
        return b.const(np.swapaxes(value, -1, -2))
    r = len(b.shape(name))
    return b.op("Transpose", name, perm=list(range(r - 2)) + [r - 1, r - 2])


@rule("MatMul")
def matmul(b, node, gy, need):
    (a, w), out = node.input, b.shape(node.output[0])
    sa, sw = b.shape(a), b.shape(w)
    if len(sa) < 2 or len(sw) < 2:
        _refuse(node, "1-D operands are not supported")
    ga = b.reduce_to(b.op("MatMul", gy[0], _swap_last(b, w)), a, (*out[:-2], *sa[-2:])) if need[0] else None
    gw = b.reduce_to(b.op("MatMul", _swap_last(b, a), gy[0]), w, (*out[:-2], *sw[-2:])) if need[1] else None
    return [ga, gw]


@rule("LRN")
def lrn(b, node, gy, need):
    """y_c = x_c / d_c^beta, d_c = bias + alpha/size * sum of x^2 over channels
    [c - floor((size-1)/2), c + ceil((size-1)/2)]:
    dx_k = g_k d_k^-beta - 2 alpha beta / size * x_k * sum over the c whose window holds k of g_c y_c / d_c."""
    x, y, g = node.input[0], node.output[0], gy[0]
    size = attr(node, "size")
    alpha, beta, bias = attr(node, "alpha", 1e-4), attr(node, "beta", 0.75), attr(node, "bias", 1.0)
    lo = (size - 1) // 2
    hi = size - 1 - lo
    rank = len(b.shape(x))

    def channel_sum(z, before, after):   # a 1-channel convolution over (N, 1, C, H, W)
        ones = b.const(np.ones((1, 1, size, *[1] * (rank - 2)), np.float32))
        pads = [before, *[0] * (rank - 2), after, *[0] * (rank - 2)]
        return b.op("Squeeze", b.op("Conv", b.op("Unsqueeze", z, b.const([1])), ones, pads=pads), b.const([1]))
    d = b.op("Add", b.const(bias), b.op("Mul", b.const(alpha / size), channel_sum(b.op("Mul", x, x), lo, hi)))
    direct = b.op("Mul", g, b.op("Pow", d, b.const(-beta)))
    spread = channel_sum(b.op("Div", b.op("Mul", g, y), d), hi, lo)   # the mirrored window
    return [b.op("Sub", direct, b.op("Mul", b.op("Mul", x, spread), b.const(2 * alpha * beta / size)))]
