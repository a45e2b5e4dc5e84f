"""The tiled max-pool gradient (export/autodiff_nn._tiled_max_pool: strides = kernel, no
padding) under many exact ties, against torch's F.max_pool2d backward in float64: every
window's gradient goes to its first maximum in row-major order, alone and through a Relu
before the pool (whose rule the pool applies at the pooled size)."""
import copy

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.test_autodiff_ops import _model, _one
from tests.test_autodiff_ops2 import _torch, check_torch

try:
    from explicam.export import autodiff, autodiff_nn, graph
except ImportError:
    from export import autodiff, autodiff_nn, graph


def _tied(shape, seed=0):
    """Few distinct values (ties in most windows, zeros and negatives included), a constant
    block, a constant row and column, and repeated values straddling window borders."""
    x = np.random.default_rng(seed).integers(-2, 3, shape).astype(np.float32)
    x[..., 1:6, 2:9] = 1.5
    x[..., shape[-2] // 2 + 1, :] = 2.0
    x[..., :, -3] = 0.0
    x[0, 0] = 0.75   # a whole plane tied
    return x


def _grad_ops(model):
    """The op types the backward walk writes for `model` (x -> y)."""
    m = copy.deepcopy(model)
    shapes, dtypes = graph.infer_shapes(m)
    feeds = {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32) for i in m.graph.input}
    shapes.update(autodiff.measure_shapes(m, [n for n in shapes if dtypes.get(n) == onnx.TensorProto.FLOAT
                                              and n not in feeds], feeds))
    forward = list(m.graph.node)
    b = autodiff.Builder(m, shapes, dtypes, graph.opset_of(m))
    autodiff.backward(b, forward, "x", "y", "y")
    return {n.op_type for n in m.graph.node[len(forward):]}


CASES = [(2, (2, 3, 12, 10)), (2, (2, 3, 13, 11)),   # 13 x 11: floor mode leaves a row and a column out
         (3, (2, 2, 12, 9)), (3, (1, 2, 11, 13)), (2, (1, 8, 4, 4))]


@pytest.mark.parametrize("k, shape", CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_tiled_max_pool_ties_match_torch(k, shape, relu):
    F = _torch().nn.functional
    pool = helper.make_node("MaxPool", ["r" if relu else "x"], ["y"], kernel_shape=[k, k], strides=[k, k])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), pool] if relu else [pool]
    model = _model(nodes, {"x": shape})
    assert "MaxUnpool" in _grad_ops(model) and "ScatterElements" not in _grad_ops(model)   # the tiled rule
    x = _tied(shape)
    check_torch(model, x, lambda t: F.max_pool2d(t.relu() if relu else t, k, k), rtol=1e-6)
    check_torch(model, -x, lambda t: F.max_pool2d(t.relu() if relu else t, k, k), seed=1, rtol=1e-6)


@pytest.mark.parametrize("opset", [11, 13])
def test_tiled_max_pool_old_opsets_and_int64_indices(opset, monkeypatch):
    # opset 11: Resize's roi as an empty tensor; F32_EXACT = 0: the indices in int64 throughout
    monkeypatch.setattr(autodiff_nn, "F32_EXACT", 0)
    model = _one("MaxPool", (2, 3, 9, 8), opset=opset, kernel_shape=[2, 2], strides=[2, 2])
    check_torch(model, _tied((2, 3, 9, 8), seed=2), lambda t: _torch().nn.functional.max_pool2d(t, 2, 2))


def test_tiled_max_pool_without_a_hit_stays_in_its_window():
    # a window of NaNs has no element equal to its maximum: its gradient stays inside it
    x = _tied((1, 2, 6, 6))
    x[0, 1, 2:4, 2:4] = np.nan
    model = _one("MaxPool", x.shape, kernel_shape=[2, 2], strides=[2, 2])
    from tests.test_autodiff_ops import _grad_session

    g = _grad_session(model).run(["grad"], {"x": x, "seed": np.ones((1, 2, 3, 3), np.float32)})[0]
    assert g.sum() == 18 and (g.reshape(1, 2, 3, 2, 3, 2).sum(axis=(3, 5)) == 1).all()
