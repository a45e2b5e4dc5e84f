"""explicam's ONNX reverse-mode differentiation, one op at a time (export/autodiff_extra.py):
Expand, Tile, Max, Min, ReduceMax, ReduceMin, Einsum, Resize, InstanceNormalization,
LayerNormalization.

Each rule against torch autograd of the same op in float64 (the forward is checked equal
first, so the ONNX node is the torch op), and the linear ones also by the adjoint identity
against onnxruntime's own forward op (test_autodiff_ops.check_adjoint), the smooth ones by
central differences. Ties of the extrema split as torch's maximum and amax split them.
"""
import numpy as np
import pytest
from onnx import helper

from tests.test_autodiff_ops import _grad_session, _model, _one, _session, _x, check_adjoint, check_fd


def _torch():
    return pytest.importorskip("torch", reason="torch is the reference here (pip install torch, the CPU wheel)")


def check_torch(model, x, fn, seed=0, rtol=1e-5):
    """The ONNX model's forward equals torch's fn(x) and explicam's J^T u equals torch autograd's."""
    torch = _torch()
    u = np.random.default_rng(seed).standard_normal(_session(model).run(None, {"x": x})[0].shape)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = fn(xt)
    (y * torch.tensor(u)).sum().backward()
    want = xt.grad.numpy()
    got_y = _session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got_y, y.detach().numpy(), rtol=1e-5, atol=1e-5 * np.abs(got_y).max())
    got = _grad_session(model).run(["grad"], {"x": x, "seed": u.astype(np.float32)})[0]
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    return got


def _t(value):
    return _torch().tensor(np.asarray(value, np.float32), dtype=_torch().float64)


# ---- broadcasting and repetition -----------------------------------------------------------

@pytest.mark.parametrize("xs, shape", [((2, 1, 4, 1), [1, 3, 4, 5]), ((2, 3, 1, 5), [2, 3, 4, 1]), ((2, 3), [1, 3])])
def test_expand(xs, shape):
    model = _one("Expand", xs, {"shape": np.array(shape)}, inputs=("x", "shape"))
    x = _x(xs)
    check_adjoint(model, x)
    full = np.broadcast_shapes(xs, tuple(shape))
    check_torch(model, x, lambda t: t.expand(*full))


@pytest.mark.parametrize("reps", [[1, 2, 3, 1], [1, 1, 1, 1], [1, 1, 2, 3]])
def test_tile(reps):
    model = _one("Tile", (2, 3, 2, 4), {"reps": np.array(reps)}, inputs=("x", "reps"))
    x = _x((2, 3, 2, 4))
    check_adjoint(model, x)
    check_torch(model, x, lambda t: t.repeat(*reps))


# ---- extrema -------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["Max", "Min"])
def test_variadic_extremum_with_broadcasting(op):
    torch = _torch()
    rng = np.random.default_rng(0)
    w, c = rng.standard_normal((1, 3, 1, 5)).astype(np.float32), np.array([0.2], np.float32)
    model = _one(op, (2, 3, 4, 5), {"w": w, "c": c}, inputs=("x", "w", "c"))
    pick = torch.maximum if op == "Max" else torch.minimum
    check_torch(model, _x((2, 3, 4, 5)), lambda t: pick(pick(t, _t(w)), _t(c)))
    check_adjoint(_one(op, (2, 3, 4, 5), {"w": np.zeros(5)}, inputs=("x", "w")), _x((2, 3, 4, 5)))  # homogeneous


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_extremum_ties_split_like_torch(op):
    # integer inputs: x ties with the constant 0 and with relu(x) itself; torch.maximum gives
    # each of two tied operands half the gradient
    torch = _torch()
    x = np.random.default_rng(2).integers(-2, 3, (2, 3, 4, 4)).astype(np.float32)
    pick = torch.maximum if op == "Max" else torch.minimum
    tied = _one(op, x.shape, {"z": np.zeros(1)}, inputs=("x", "z"))
    g = check_torch(tied, x, lambda t: pick(t, _t(np.zeros(1))))
    assert (x == 0).any() and np.abs(g[x == 0]).max() > 0   # the ties were there, and got their half
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, ["x", "r"], ["y"])]
    check_torch(_model(nodes, {"x": x.shape}), x, lambda t: pick(t, torch.relu(t)))


@pytest.mark.parametrize("op, opset, attrs, axes, dims, keep", [
    ("ReduceMax", 18, {"keepdims": 1}, [2, 3], (2, 3), True),
    ("ReduceMin", 18, {"keepdims": 0}, [-1], (-1,), False),
    ("ReduceMax", 17, {"axes": [1], "keepdims": 0}, None, (1,), False),
    ("ReduceMin", 13, {"axes": [1, 3]}, None, (1, 3), True)])
@pytest.mark.parametrize("ties", [False, True])
def test_reduce_extremum_like_amax(op, opset, attrs, axes, dims, keep, ties):
    torch = _torch()
    inits = {"axes": np.array(axes)} if axes is not None else None
    model = _one(op, (2, 3, 4, 5), inits, opset, inputs=("x", "axes") if axes else ("x",), **attrs)
    x = np.random.default_rng(1).integers(0, 3, (2, 3, 4, 5)).astype(np.float32) if ties else _x((2, 3, 4, 5))
    amax = torch.amax if op == "ReduceMax" else torch.amin
    check_torch(model, x, lambda t: amax(t, dim=dims, keepdim=keep))   # ties: split evenly, as amax does


# ---- Einsum --------------------------------------------------------------------------------

EINSUMS = [("bchw,kc->bkhw", (2, 3, 4, 5), (6, 3)),
           ("bij,jk", (2, 3, 4), (4, 5)),                       # implicit output: bik
           ("...ij,jk->...ik", (2, 3, 4), (4, 5)),
           ("...ij,...jk->...ik", (2, 1, 3, 4), (1, 5, 4, 6)),  # the ellipsis broadcast: summed back
           ("bchw->bc", (2, 3, 4, 5), None),                    # summed-away letters broadcast back
           ("bchw->bwhc", (2, 3, 4, 5), None),
           ("bij,bkj->bik", (2, 3, 4), "x"),                    # both operands x: x x^T
           ("bchw,bchw->bc", (2, 3, 4, 5), "x")]


@pytest.mark.parametrize("eq, xs, ws", EINSUMS)
def test_einsum(eq, xs, ws):
    torch = _torch()
    w = np.random.default_rng(0).standard_normal(ws).astype(np.float32) if isinstance(ws, tuple) else None
    inputs = ("x",) if ws is None else ("x", "x") if ws == "x" else ("x", "w")
    model = _one("Einsum", xs, {"w": w} if w is not None else None, inputs=inputs, equation=eq)
    x = _x(xs)
    others = [] if ws is None else [None] if ws == "x" else [_t(w)]
    check_torch(model, x, lambda t: torch.einsum(eq, t, *[t if o is None else o for o in others]))
    if ws != "x":
        check_adjoint(model, x)


# ---- Resize --------------------------------------------------------------------------------

MODES = [("nearest", "round_prefer_floor"), ("nearest", "floor"), ("nearest", "round_prefer_ceil"),
         ("linear", None), ("cubic", None)]


@pytest.mark.parametrize("mode, nearest", MODES)
@pytest.mark.parametrize("ctm", ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
@pytest.mark.parametrize("how", ["scales", "sizes"])
def test_resize_adjoint(mode, nearest, ctm, how):
    # scales: 5x7 -> 10x10 (2, 1.5); sizes: 5x7 -> 3x9 (down and up)
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 1.5], np.float32)} if how == "scales" else \
        {"roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32), "sizes": np.array([2, 3, 3, 9])}
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm, **({"nearest_mode": nearest} if nearest else {})}
    model = _one("Resize", (2, 3, 5, 7), inits, 13, inputs=("x", *inits), **attrs)
    g = check_adjoint(model, _x((2, 3, 5, 7)))
    assert np.abs(g).max() > 0


def test_resize_opset18_axes():
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array([3, 0.6], np.float32)}
    model = _one("Resize", (2, 3, 5, 5), inits, 18, inputs=("x", *inits), mode="linear", axes=[2, 3])
    check_adjoint(model, _x((2, 3, 5, 5)))


INTERPOLATIONS = [dict(scale_factor=2, mode="nearest"), dict(size=(9, 11), mode="nearest"),
                  dict(scale_factor=2, mode="bilinear", align_corners=False),
                  dict(size=(9, 4), mode="bilinear", align_corners=False),
                  dict(scale_factor=3, mode="bilinear", align_corners=True),
                  dict(scale_factor=2, mode="bicubic", align_corners=False),
                  dict(size=(4, 5), mode="nearest"), dict(size=(5, 9), mode="bicubic", align_corners=True)]


@pytest.mark.parametrize("kw", INTERPOLATIONS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_resize_as_torch_exports_interpolate(kw, tmp_path):
    """The Resize node torch.onnx writes for F.interpolate, against F.interpolate's autograd."""
    import onnx

    torch = _torch()

    class Up(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, **kw)

    path = tmp_path / "up.onnx"
    torch.onnx.export(Up(), torch.rand(2, 3, 6, 7), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    model = onnx.load(str(path))
    assert "Resize" in [n.op_type for n in model.graph.node]
    check_torch(model, _x((2, 3, 6, 7)), lambda t: torch.nn.functional.interpolate(t, **kw))


# ---- normalisation over a sample -----------------------------------------------------------

def test_instance_normalization():
    torch = _torch()
    rng = np.random.default_rng(0)
    s, b = rng.uniform(0.5, 2, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    model = _one("InstanceNormalization", (2, 3, 4, 5), {"s": s, "b": b}, inputs=("x", "s", "b"), epsilon=1e-3)
    x = _x((2, 3, 4, 5))
    check_torch(model, x, lambda t: torch.nn.functional.instance_norm(t, weight=_t(s), bias=_t(b), eps=1e-3))
    check_fd(model, x)


@pytest.mark.parametrize("axis, bias", [(-1, True), (1, True), (2, False)])
def test_layer_normalization(axis, bias):
    torch = _torch()
    xs = (2, 3, 4, 5)
    rng = np.random.default_rng(0)
    s = rng.uniform(0.5, 2, xs[axis:]).astype(np.float32)
    inits = {"s": s, **({"b": rng.standard_normal(xs[axis:]).astype(np.float32)} if bias else {})}
    model = _one("LayerNormalization", xs, inits, 17, inputs=("x", *inits), axis=axis, epsilon=1e-4)
    x = _x(xs)
    check_torch(model, x, lambda t: torch.nn.functional.layer_norm(t, xs[axis:], _t(s),
                                                                   _t(inits["b"]) if bias else None, 1e-4))
    check_fd(model, x)


@pytest.mark.parametrize("op, lo, hi", [("Clip", 0.0, 6.0), ("Clip", -1.0, 1.5), ("Relu", 0.0, None)])
def test_rectifier_gradient_at_and_next_to_its_bounds(op, lo, hi):
    """The kinks go as torch's relu and hardtanh: nothing passes at a bound, everything one float
    inside it. Next to a zero bound the nearest float is subnormal: the mask's scale stops at
    2^-127 (autodiff_more._inside), so the smallest normal float is the first to pass all."""
    f32, tiny = np.float32, np.finfo(np.float32).tiny   # 2^-126
    top = 8.0 if hi is None else hi
    inside_lo = tiny if lo == 0 else np.nextafter(f32(lo), f32(top))
    x = np.array([lo - 1, lo, inside_lo, (lo + top) / 2, np.nextafter(f32(top), f32(lo)), top, top + 1], f32)
    bounds = {"lo": np.array(lo)} if hi is None else {"lo": np.array(lo), "hi": np.array(hi)}
    names = ["x"] if op == "Relu" else ["x", *bounds]
    model = _model([helper.make_node(op, names, ["y"])], {"x": (7,)}, {} if op == "Relu" else bounds)
    session = _grad_session(model)
    g = session.run(["grad"], {"x": x, "seed": np.ones(7, f32)})[0]
    assert g.tolist() == ([0, 0, 1, 1, 1, 0, 0] if hi is not None else [0, 0, 1, 1, 1, 1, 1])
    if lo == 0:   # a subnormal activation passes a fraction, never nothing or more
        sub = session.run(["grad"], {"x": np.full(7, 2.0 ** -140, f32), "seed": np.ones(7, f32)})[0]
        assert np.all((sub > 0) & (sub < 1))
