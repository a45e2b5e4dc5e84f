"""explicam's ONNX reverse-mode differentiation, one op at a time (export/autodiff*.py).

Each vector-Jacobian rule against onnxruntime's own forward op: by the adjoint identity
<f(x) - f(0), u> = <x, J^T u> for the linear and piecewise-linear ops (exact in float32
whatever the padding, stride, ceil mode or tie) and by central differences for the smooth
ones. Needs only onnx and onnxruntime; the whole models are in test_autodiff.py.
"""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

try:
    from explicam.export import autodiff, graph
except ImportError:
    from export import autodiff, graph

F32 = TensorProto.FLOAT


def _session(model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _model(nodes, inputs, inits=None, opset=17, output="y"):
    inits = [numpy_helper.from_array(np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f" else np.int64), k)
             for k, v in (inits or {}).items()]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(k, F32, s) for k, s in inputs.items()],
                          [helper.make_tensor_value_info(output, F32, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _grad_session(model, wrt="x", out="y"):
    """The model plus an input `seed` (shaped like out) and an output `grad` = J^T seed."""
    return _session(_grad_model(model, wrt, out))


def _grad_model(model, wrt="x", out="y"):
    m = copy.deepcopy(model)
    shapes, dtypes = graph.infer_shapes(m)
    feeds = {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32) for i in m.graph.input}
    shapes.update(autodiff.measure_shapes(m, [n for n in shapes if dtypes.get(n) == F32 and n not in feeds], feeds))
    forward = list(m.graph.node)
    m.graph.input.append(helper.make_tensor_value_info("seed", F32, shapes[out]))
    b = autodiff.Builder(m, shapes, dtypes, graph.opset_of(m))
    b.node("Identity", [autodiff.backward(b, forward, wrt, out, "seed")], ["grad"])
    m.graph.output.append(helper.make_tensor_value_info("grad", F32, None))
    return m


def check_adjoint(model, x, seed=0):
    """<f(x) - f(0), u> == <x, J^T u>: exact for affine and positively homogeneous ops."""
    rng = np.random.default_rng(seed)
    fwd, grad = _session(model), _grad_session(model)
    y, y0 = fwd.run(None, {"x": x})[0], fwd.run(None, {"x": np.zeros_like(x)})[0]
    for _ in range(2):
        u = rng.standard_normal(y.shape).astype(np.float32)
        g = grad.run(["grad"], {"x": x, "seed": u})[0]
        assert g.shape == x.shape
        lhs, rhs = float(((y - y0).astype(np.float64) * u).sum()), float((x.astype(np.float64) * g).sum())
        assert abs(lhs - rhs) <= 1e-5 * (np.abs(y * u).sum() + np.abs(x * g).sum()) + 1e-6, (lhs, rhs)
    return g


def check_fd(model, x, seed=0, h=1e-3, tol=2e-3):
    """<J^T u, v> against the central difference of <f(x), u> along v."""
    rng = np.random.default_rng(seed)
    fwd, grad = _session(model), _grad_session(model)
    y = fwd.run(None, {"x": x})[0]
    u = rng.standard_normal(y.shape)
    for _ in range(2):
        v = rng.standard_normal(x.shape)
        g = grad.run(["grad"], {"x": x, "seed": u.astype(np.float32)})[0].astype(np.float64)
        plus = (fwd.run(None, {"x": (x + h * v).astype(np.float32)})[0] * u).sum()
        minus = (fwd.run(None, {"x": (x - h * v).astype(np.float32)})[0] * u).sum()
        fd, exact = (plus - minus) / (2 * h), (g * v).sum()
        assert abs(fd - exact) <= tol * (abs(exact) + np.abs(g * v).sum() / np.sqrt(v.size)), (fd, exact)


def _x(shape, seed=1, low=-2.0, high=2.0, away=()):
    x = np.random.default_rng(seed).uniform(low, high, shape)
    for k in away:   # keep finite differences off the kinks
        x = np.where(np.abs(x - k) < 0.05, x + 0.1, x)
    return x.astype(np.float32)


def _one(op, x_shape, inits=None, opset=17, inputs=("x",), **attrs):
    names = list(inputs) + [k for k in (inits or {}) if k not in inputs]
    return _model([helper.make_node(op, names, ["y"], **attrs)], {"x": x_shape}, inits, opset)


# ---- per op: linear and piecewise-linear, by the adjoint identity --------------------------

CONVS = [({"pads": [0, 1, 2, 1], "strides": [2, 3]}, (2, 4, 9, 8), (6, 4, 3, 2)),
         ({"group": 2, "dilations": [2, 1], "pads": [1, 1, 1, 1]}, (2, 4, 9, 8), (6, 2, 3, 3)),
         ({"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}, (2, 4, 8, 8), (4, 1, 3, 3)),
         ({"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}, (2, 4, 7, 7), (8, 1, 3, 3)),
         ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (2, 3, 7, 8), (5, 3, 4, 4)),
         ({"auto_pad": "SAME_LOWER", "strides": [2, 1]}, (2, 3, 7, 8), (5, 3, 4, 3)),
         ({"auto_pad": "VALID", "strides": [3, 2], "dilations": [1, 2]}, (2, 3, 10, 9), (5, 3, 2, 3)),
         ({"strides": [2, 2]}, (1, 3, 8, 9), (4, 3, 1, 1)),
         ({"strides": [2], "pads": [1, 0]}, (2, 3, 11), (4, 3, 3)),
         # stride 1: the gradient is a Conv with flipped weights (autodiff_nn._flipped_conv)
         ({"pads": [0, 2, 1, 0]}, (2, 8, 7, 8), (6, 8, 3, 3)),
         ({"auto_pad": "SAME_UPPER"}, (2, 8, 7, 8), (5, 8, 4, 4)),
         ({"auto_pad": "SAME_LOWER"}, (2, 9, 7, 8), (5, 9, 2, 3)),
         ({"dilations": [2, 1], "pads": [2, 1, 1, 0]}, (2, 8, 9, 8), (5, 8, 3, 2)),
         ({"pads": [1, 1, 2, 2]}, (2, 3, 7, 7), (5, 3, 4, 4)),   # from 3 channels: ConvTranspose
         ({"group": 6, "pads": [1, 1, 1, 1]}, (2, 6, 7, 7), (12, 1, 3, 3)),
         ({"group": 3}, (2, 6, 5, 5), (9, 2, 1, 1)),
         ({"pads": [3, 0, 0, 3]}, (1, 2, 6, 6), (3, 2, 2, 2)),   # padding beyond the kernel: ConvTranspose
         ({"pads": [2, 1]}, (2, 8, 9), (4, 8, 3)),
         # strided depthwise: g spread onto the stride grid, then the flipped Conv
         ({"group": 4, "auto_pad": "SAME_UPPER", "strides": [2, 2]}, (2, 4, 9, 8), (4, 1, 5, 5)),
         ({"group": 4, "strides": [2, 1], "dilations": [2, 2], "pads": [2, 1, 2, 2]}, (1, 4, 11, 9), (4, 1, 3, 3)),
         ({"group": 4, "strides": [3, 2], "pads": [0, 1, 2, 0]}, (2, 4, 10, 9), (8, 1, 3, 2)),
         ({"group": 3, "strides": [2], "pads": [1, 2]}, (2, 3, 12), (3, 1, 5)),
         ({"group": 4, "strides": [2, 2], "pads": [0, 0, 4, 4]}, (1, 4, 6, 6), (4, 1, 3, 3))]   # beyond: ConvTranspose


@pytest.mark.parametrize("attrs, xs, ws", CONVS)
@pytest.mark.parametrize("bias", [False, True])
def test_conv(attrs, xs, ws, bias):
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal(ws)}
    if bias:
        inits["b"] = rng.standard_normal(ws[0])
    check_adjoint(_one("Conv", xs, inits, inputs=("x", "w"), **attrs), _x(xs))


@pytest.mark.parametrize("attrs, xs, ws", [({"strides": [2, 2], "pads": [1, 0, 1, 1], "output_padding": [1, 0]},
                                            (2, 4, 5, 4), (4, 3, 3, 3)),
                                           ({"group": 2, "strides": [3, 1], "dilations": [1, 2]}, (1, 4, 4, 5), (4, 1, 2, 3))])
def test_conv_transpose(attrs, xs, ws):
    w = np.random.default_rng(0).standard_normal(ws)
    check_adjoint(_one("ConvTranspose", xs, {"w": w}, inputs=("x", "w"), **attrs), _x(xs))


POOLS = [dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
         dict(kernel_shape=[2, 2], strides=[2, 2]),
         dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
         dict(kernel_shape=[3, 2], strides=[2, 1], pads=[0, 1, 2, 0], ceil_mode=1),
         dict(kernel_shape=[2, 2], strides=[1, 1], dilations=[2, 2]),
         dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2])]


@pytest.mark.parametrize("attrs", POOLS)
@pytest.mark.parametrize("size", [8, 7])
def test_max_pool(attrs, size):
    check_adjoint(_one("MaxPool", (2, 3, size, size), **attrs), _x((2, 3, size, size)))


def _first_max_routing(x, k, s, p):
    """numpy: each window's gradient (1) to its first maximum, row-major, padding excluded."""
    g = np.zeros_like(x)
    n, c, h, w = x.shape
    for i in range(0, h + 2 * p - k + 1, s):
        for j in range(0, w + 2 * p - k + 1, s):
            rows, cols = range(max(i - p, 0), min(i - p + k, h)), range(max(j - p, 0), min(j - p + k, w))
            win = x[:, :, rows][:, :, :, cols].reshape(n, c, -1)
            first = win.argmax(-1)
            for a in range(n):
                for b in range(c):
                    r, q = divmod(int(first[a, b]), len(cols))
                    g[a, b, rows[r], cols[q]] += 1
    return g


@pytest.mark.parametrize("k, s, p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_pool_ties_go_to_the_first_maximum(k, s, p):
    # after a ReLU most windows are all zeros: torch's and TF's gradients pick the first element
    x = np.random.default_rng(3).integers(0, 2, (2, 3, 7, 7)).astype(np.float32)
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    y = _session(_one("MaxPool", x.shape, **attrs)).run(None, {"x": x})[0]
    g = _grad_session(_one("MaxPool", x.shape, **attrs)).run(["grad"], {"x": x, "seed": np.ones_like(y)})[0]
    np.testing.assert_array_equal(g, _first_max_routing(x, k, s, p))


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
                                   dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                                   dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1,
                                        count_include_pad=1),
                                   dict(kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1),
                                   dict(kernel_shape=[2, 2], strides=[2, 2])])
@pytest.mark.parametrize("size", [8, 7])
def test_average_pool(attrs, size):
    check_adjoint(_one("AveragePool", (2, 3, size, size), **attrs), _x((2, 3, size, size)))


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pools(op):
    check_adjoint(_one(op, (2, 3, 5, 4)), _x((2, 3, 5, 4)))


# a Pad before a ConvTranspose (whose gradient is a strided Conv) or an average pool
@pytest.mark.parametrize("op, attrs, ws", [("ConvTranspose", {"strides": [2, 2], "pads": [2, 2, 2, 2]}, (4, 3, 3, 3)),  # a strided Conv
                                            ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2]}, None)])
def test_pad_before_other_windowed_ops(op, attrs, ws):
    inits = {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1])}
    names = ["p"]
    if ws:
        inits["w"], names = np.random.default_rng(0).standard_normal(ws), ["p", "w"]
    model = _model([helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node(op, names, ["y"], **attrs)],
                   {"x": (2, 4, 7, 6)}, inits)
    check_adjoint(model, _x((2, 4, 7, 6)))


# a torch network's features in NHWC, then its global pool: the pool's broadcast gradient and the
# transpose back fold into one Mul (autodiff.Builder.transpose) where the batch stays first
@pytest.mark.parametrize("perm, folded", [([0, 3, 1, 2], True), ([1, 0, 2, 3], False)])
def test_transpose_then_global_average_pool(perm, folded):
    model = _model([helper.make_node("Transpose", ["x"], ["t"], perm=perm), helper.make_node("GlobalAveragePool", ["t"], ["y"])],
                   {"x": (2, 5, 4, 3)})
    check_adjoint(model, _x((2, 5, 4, 3)))
    made = [n.op_type for n in _grad_model(model).graph.node[2:]]
    assert ("Transpose" not in made and "Expand" not in made) == folded, made


def test_global_max_pool_ties():
    x = np.zeros((1, 2, 3, 3), np.float32)
    x[0, 1, 1, 2] = x[0, 1, 2, 0] = 1.0
    g = _grad_session(_one("GlobalMaxPool", x.shape)).run(["grad"], {"x": x, "seed": np.ones((1, 2, 1, 1), np.float32)})[0]
    assert g[0, 0, 0, 0] == 1 and g[0, 1, 1, 2] == 1 and g.sum() == 2


@pytest.mark.parametrize("op, opset, attrs, axes", [("ReduceMean", 17, {"axes": [2, 3], "keepdims": 0}, None),
                                                    ("ReduceMean", 18, {"keepdims": 1}, [-1]),
                                                    ("ReduceSum", 13, {"keepdims": 0}, [1, 3])])
def test_reductions(op, opset, attrs, axes):
    inits = {"axes": np.array(axes, np.int64)} if axes is not None else None
    model = _one(op, (2, 3, 4, 5), inits, opset, inputs=("x", "axes") if axes else ("x",), **attrs)
    check_adjoint(model, _x((2, 3, 4, 5)))


def test_shape_ops():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "shape"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "one"], ["u"]),
             helper.make_node("Squeeze", ["u", "one"], ["s"]),
             helper.make_node("Flatten", ["s"], ["f"], axis=1),
             helper.make_node("Dropout", ["f"], ["d"]),
             helper.make_node("Identity", ["d"], ["y"])]
    model = _model(nodes, {"x": (2, 3, 4, 6)}, {"shape": np.array([0, 4, 18]), "one": np.array([1])})
    check_adjoint(model, _x((2, 3, 4, 6)))


@pytest.mark.parametrize("starts, ends, axes, steps", [([1, -5], [4, 100], [1, 3], [1, 2]),
                                                       ([-1], [-100], [2], [-2]),
                                                       ([0, 1, 0], [1, 3, 2], [0, 1, 3], [1, 1, 3]),
                                                       ([5], [1], [3], [-1])])
def test_slice(starts, ends, axes, steps):
    inits = {"starts": np.array(starts), "ends": np.array(ends), "axes": np.array(axes), "steps": np.array(steps)}
    model = _one("Slice", (1, 5, 6, 7), inits, inputs=("x", "starts", "ends", "axes", "steps"))
    check_adjoint(model, _x((1, 5, 6, 7)))


@pytest.mark.parametrize("opset, pads, axes", [(17, [0, 1, 2, -1, 0, 0, 1, 2], None), (18, [1, -2, 0, 3], [2, 3])])
def test_pad(opset, pads, axes):
    inits = {"pads": np.array(pads), "value": np.array(0.5, np.float32)}
    names = ("x", "pads", "value")
    if axes:
        inits["axes"], names = np.array(axes), names + ("axes",)
    check_adjoint(_one("Pad", (2, 3, 5, 6), inits, opset, inputs=names), _x((2, 3, 5, 6)))


# EfficientNet-Lite0's torch port: an explicit zero Pad before each convolution, whose gradient
# crop goes into the convolution's gradient (autodiff_rules._crop_into_conv) where it can
@pytest.mark.parametrize("pads, attrs, ws, folded", [
    ([0, 0, 1, 1, 0, 0, 2, 2], {"strides": [2, 2], "group": 4}, (4, 1, 5, 5), True),   # ConvTranspose
    ([0, 0, 0, 0, 0, 0, 1, 1], {"strides": [2, 2]}, (8, 3, 3, 3), True),                # the stem, from 3 channels
    ([0, 0, 2, 1, 0, 0, 0, 2], {"group": 4}, (4, 1, 3, 3), True),                        # stride 1: a Conv pads less
    ([0, 0, 1, 1, 0, 0, 1, 1], {"pads": [1, 0, 0, 1]}, (6, 4, 3, 2), True),
    ([0, 0, 3, 0, 0, 0, 0, 3], {}, (6, 8, 2, 2), False),                                 # beyond a Conv's pads: a Pad
    ([0, 1, 1, 1, 0, 0, 1, 1], {}, (6, 5, 3, 3), False)])                                # a channel padded: a Pad
def test_pad_before_conv(pads, attrs, ws, folded):
    xs = (2, ws[1] * attrs.get("group", 1) - (1 if pads[1] else 0), 9, 8)
    w = np.random.default_rng(0).standard_normal(ws)
    model = _model([helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("Conv", ["p", "w"], ["y"], **attrs)],
                   {"x": xs}, {"pads": np.array(pads), "w": w})
    check_adjoint(model, _x(xs))
    made = [n.op_type for n in _grad_model(model).graph.node[2:]]
    assert ("Pad" not in made) == folded, made


def test_split_concat_and_accumulation():
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=1),
             helper.make_node("Concat", ["c", "a", "k", "x"], ["y"], axis=1)]   # b unused, x read twice
    model = _model(nodes, {"x": (2, 7, 3, 3)}, {"sizes": np.array([2, 3, 2]), "k": np.ones((2, 1, 3, 3))})
    check_adjoint(model, _x((2, 7, 3, 3)))


@pytest.mark.parametrize("attrs, ws, xs", [({"transB": 1, "alpha": 1.5, "beta": 0.5}, (4, 5), (3, 5)),
                                           ({}, (5, 4), (3, 5)),
                                           ({"transA": 1, "transB": 1}, (4, 5), (5, 3))])
def test_gemm(attrs, ws, xs):
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal(ws), "c": rng.standard_normal(4)}
    check_adjoint(_one("Gemm", xs, inits, inputs=("x", "w", "c"), **attrs), _x(xs))


@pytest.mark.parametrize("xs, ws", [((2, 3, 5), (5, 4)), ((2, 5), (3, 5, 4))])
def test_matmul(xs, ws):
    w = np.random.default_rng(0).standard_normal(ws)
    check_adjoint(_one("MatMul", xs, {"w": w}, inputs=("x", "w")), _x(xs))


def test_batch_normalization():
    rng = np.random.default_rng(0)
    inits = {"s": rng.uniform(0.5, 2, 3), "b": rng.standard_normal(3), "m": rng.standard_normal(3),
             "v": rng.uniform(0.5, 2, 3)}
    model = _one("BatchNormalization", (2, 3, 4, 4), inits, inputs=("x", "s", "b", "m", "v"), epsilon=1e-3)
    check_adjoint(model, _x((2, 3, 4, 4)))


# ---- per op: smooth and kinked elementwise ops, by central differences ---------------------

UNARY = [("Relu", {}, (0,)), ("LeakyRelu", {"alpha": 0.1}, (0,)), ("Sigmoid", {}, ()), ("Tanh", {}, ()),
         ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, (-4 / 3, 2)), ("HardSwish", {}, (-3, 3)),
         ("Elu", {"alpha": 0.7}, (0,)), ("Selu", {}, (0,)), ("Softplus", {}, ()), ("Exp", {}, ()), ("Erf", {}, ()),
         ("Neg", {}, ()), ("Softmax", {"axis": 1}, ()), ("LogSoftmax", {"axis": -1}, ()), ("Identity", {}, ())]


@pytest.mark.parametrize("op, attrs, kinks", UNARY)
def test_unary(op, attrs, kinks):
    check_fd(_one(op, (2, 3, 4, 5), **attrs), _x((2, 3, 4, 5), low=-4, high=4, away=kinks))


@pytest.mark.parametrize("op", ["Sqrt", "Log", "Reciprocal"])
def test_unary_positive(op):
    check_fd(_one(op, (2, 3, 4, 5)), _x((2, 3, 4, 5), low=0.5, high=2))


@pytest.mark.parametrize("names, inits", [(("x", "lo", "hi"), {"lo": np.array(-1.0), "hi": np.array(1.5)}),
                                          (("x", "", "hi"), {"hi": np.array(6.0)}),
                                          (("x", "lo"), {"lo": np.array(0.0)})])
def test_clip(names, inits):
    model = _model([helper.make_node("Clip", list(names), ["y"])], {"x": (2, 3, 4, 5)}, inits)
    check_fd(model, _x((2, 3, 4, 5), low=-3, high=8, away=(-1, 0, 1.5, 6)))


def test_prelu_pow_lrn():
    slope = np.random.default_rng(0).uniform(-0.5, 0.5, (3, 1, 1))
    check_fd(_one("PRelu", (2, 3, 4, 5), {"s": slope}, inputs=("x", "s")), _x((2, 3, 4, 5), away=(0,)))
    check_fd(_one("Pow", (2, 3, 4, 5), {"e": np.array(3.0)}, inputs=("x", "e")), _x((2, 3, 4, 5)))
    for size in (3, 5):   # onnxruntime's LRN takes odd sizes only
        check_fd(_one("LRN", (2, 7, 3, 3), size=size, alpha=0.5, beta=0.75, bias=1.5), _x((2, 7, 3, 3)))


def test_broadcasting_binary_ops():
    # y = x / (mean_h(x)^2 + 1) - W * x[:, :1, :1]: Div with both operands live, broadcast
    # over H; Mul of a tensor with itself; Sub and Mul of a slice broadcast over C and H
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2], keepdims=1),
             helper.make_node("Mul", ["m", "m"], ["m2"]),
             helper.make_node("Add", ["m2", "one"], ["d"]),
             helper.make_node("Div", ["x", "d"], ["q"]),
             helper.make_node("Cos", ["x"], ["x00"]),
             helper.make_node("Mul", ["w", "x00"], ["wx"]),
             helper.make_node("Sub", ["q", "wx"], ["y"])]
    inits = {"one": np.array(1.0), "w": np.random.default_rng(0).standard_normal((2, 3, 4, 5)),
             "s0": np.array([0, 0]), "s1": np.array([1, 1]), "ax": np.array([1, 2])}
    with pytest.raises(graph.GraphError, match=r"\(Cos\) .*no gradient rule; supported: .*Conv"):
        check_fd(_model(nodes, {"x": (2, 3, 4, 5)}, inits), _x((2, 3, 4, 5)))
    nodes[4] = helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["x00"])
    check_fd(_model(nodes, {"x": (2, 3, 4, 5)}, inits), _x((2, 3, 4, 5)))


def test_matmul_both_live_and_where():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "t"], ["xx"]),
             helper.make_node("Mul", ["xx", "two"], ["xx2"]),
             helper.make_node("Where", ["cond", "xx", "xx2"], ["y"])]
    cond = np.random.default_rng(0).random((2, 3, 3)) > 0.5
    model = _model(nodes, {"x": (2, 3, 4)}, {"two": np.array(2.0)})
    model.graph.initializer.append(numpy_helper.from_array(cond, "cond"))
    check_fd(model, _x((2, 3, 4)))
