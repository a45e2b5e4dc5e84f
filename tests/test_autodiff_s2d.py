"""A first block's gradient in space-to-depth (export/autodiff_s2d.py: image -> Conv -> Relu ->
tiled MaxPool) against torch autograd in float64, under exact ties: integer images and
integer weights make integer conv outputs, so most windows hold several equal maxima and
each one's gradient must go to the first in row-major order, as torch routes it."""
import numpy as np
import pytest
from onnx import helper

from tests.test_autodiff_ops import _grad_model, _model
from tests.test_autodiff_ops2 import _torch, check_torch


def _block(cin, c, kernel, pads, pool, size, nhwc, batch=2, seed=0, stride=1):
    """(model x -> y, torch fn, x): [Transpose NHWC -> NCHW,] Conv, Relu, MaxPool; integer data."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-1, 2, (c, cin, kernel, kernel)).astype(np.float32)
    bias = rng.integers(-1, 2, c).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2])] if nhwc else []
    conv_attrs = {"auto_pad": pads} if isinstance(pads, str) else {"pads": pads}
    nodes += [helper.make_node("Conv", ["t" if nhwc else "x", "w", "b"], ["c"], strides=[stride, stride], **conv_attrs),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[pool, pool], strides=[pool, pool])]
    shape = (batch, size, size, cin) if nhwc else (batch, cin, size, size)
    model = _model(nodes, {"x": shape}, {"w": w, "b": bias})
    x = rng.integers(-2, 3, shape).astype(np.float32)
    x[:, 1:5, 1:6] = 1.0   # a flat patch: every window there ties
    if isinstance(pads, str):   # SAME_UPPER: the extra row and column after
        total = kernel - 1
        pads = [total // 2, total // 2, total - total // 2, total - total // 2]
    F = _torch().nn.functional

    def fn(t):
        t = t.permute(0, 3, 1, 2) if nhwc else t
        t = F.pad(t, (pads[1], pads[3], pads[0], pads[2]))
        z = F.conv2d(t, _torch().tensor(w, dtype=t.dtype), _torch().tensor(bias, dtype=t.dtype), stride=stride)
        return F.max_pool2d(z.relu(), pool, pool)
    return model, fn, x


def _ops(model):
    m = _grad_model(model)
    return [n.op_type for n in m.graph.node[len(model.graph.node):]]


@pytest.mark.parametrize("cin, c, kernel, pads, pool, size", [
    (3, 16, 4, [1, 1, 2, 2], 2, 12),      # the seed's conv0: TF's 'same' for an even kernel
    (3, 16, 2, [0, 0, 1, 1], 2, 8),
    (3, 32, 3, [1, 1, 1, 1], 2, 10),
    (1, 16, 5, [2, 2, 2, 2], 2, 8),       # one channel (grey)
    (3, 16, 4, "SAME_UPPER", 2, 8),
    (3, 16, 3, [1, 1, 1, 1], 3, 9),       # 3 x 3 windows: 9 phases per channel
    (3, 16, 3, [0, 0, 0, 0], 2, 10),      # 'valid': the input's side is not the map's
])
@pytest.mark.parametrize("nhwc", [True, False])
def test_first_block_gradient_equals_torch_under_ties(cin, c, kernel, pads, pool, size, nhwc):
    model, fn, x = _block(cin, c, kernel, pads, pool, size, nhwc)
    ops = _ops(model)
    assert "MaxUnpool" not in ops and "ConvTranspose" not in ops
    # channels-last: the phases go straight into (N, H, W, C) by one Gather, no DepthToSpace left
    assert ("DepthToSpace" not in ops and "Gather" in ops) if nhwc else ops.count("DepthToSpace") == 1
    check_torch(model, x, fn, rtol=1e-6)
    check_torch(model, -x, fn, seed=1, rtol=1e-6)


@pytest.mark.parametrize("case", ["eight channels in", "stride 2", "pool leaves a row", "12 filters"])
def test_other_first_blocks_keep_the_usual_rules(case):
    cin, c, size, stride = {"eight channels in": (8, 16, 8, 1), "stride 2": (3, 16, 16, 2),
                            "pool leaves a row": (3, 16, 9, 1), "12 filters": (3, 12, 8, 1)}[case]
    model, fn, x = _block(cin, c, 3, [1, 1, 1, 1], 2, size, nhwc=False, stride=stride)
    ops = _ops(model)
    assert "MaxUnpool" in ops and "DepthToSpace" not in ops
    check_torch(model, x, fn, rtol=1e-6)


def test_the_walk_leaves_no_node_unread():
    # the pool's DepthToSpace and the conv's are read by nobody once the next rule went around them
    model, _, _ = _block(3, 16, 4, [1, 1, 2, 2], 2, 8, nhwc=True)
    m = _grad_model(model)
    read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    assert all(any(o in read for o in n.output) for n in m.graph.node)
    assert {t.name for t in m.graph.initializer} <= read
