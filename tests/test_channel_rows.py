"""Constant channel weights: where the head after the feature layer is pooling, flatten and
linear layers, mean_ij d y_c / d A_ij^k does not depend on the image (a max-pool moves each
window's gradient to one of its elements, the sum stays), so Grad-CAM's and Finer-CAM's
weights are rows of one matrix (OnnxModel.channel_grad_rows) and no gradient pass runs.
The export measures it (export/headgrad.channel_grads_constant); these tests check the
measurement on heads that have it and heads that do not, and the maps against the paths
that run the gradient graphs."""
from __future__ import annotations

import numpy as np
import pytest

from explicam.runtime import Explainer
from explicam.runtime.model import OnnxModel
from tests.test_methods import _inputs


@pytest.mark.parametrize("which", ["onnx_model", "onnx_gap_model"])
def test_rows_equal_the_channel_means_of_every_images_gradient(which, request, val_images):
    """The seed's head (max-pool, flatten, dense) and the GAP head: measured constant, and each
    class's row (read on one image's features) equals the channel mean of model.onnx's own
    gradient on every other image, ties of ReLU zeros in the pooling windows included."""
    model = OnnxModel(request.getfixturevalue(which))
    assert model.meta["head_channel_grads"] == "constant" and model.constant_channel_grads
    x = model.preprocess(_inputs(val_images)[:6])
    first = model.run(x[:1], np.zeros(1, np.int64))["features"]
    assert (first == 0).any()   # ReLU zeros: tied windows are there to be routed
    for c in range(model.num_classes):
        grads = model.run(x, np.full(len(x), c))["grads"].astype(np.float64)
        want = grads.mean(axis=(1, 2))
        row = model.channel_grad_rows([c], first)[0]
        np.testing.assert_allclose(np.broadcast_to(row, want.shape), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def _head(nodes, inits, hw=(4, 4), channels=3, classes=5):
    """A head ModelProto around the nodes: `features` (N, h, w, C) in, logits and probabilities out."""
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes + [helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "head",
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", *hw, channels])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", classes])
                           for o in ("logits", "probabilities")], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _heads():
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    t = helper.make_node("Transpose", ["features"], ["t"], perm=[0, 3, 1, 2])
    arr = lambda name, *shape: numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)  # noqa: E731
    gap = [t, helper.make_node("GlobalAveragePool", ["t"], ["g"]), helper.make_node("Flatten", ["g"], ["f"])]
    dense = lambda x, out="logits": [helper.make_node("MatMul", [x, "w"], [out])]  # noqa: E731
    return {
        "gap, dense": (True, gap + dense("f"), [arr("w", 3, 5)]),
        "max-pool, flatten, dense": (True, [t, helper.make_node("MaxPool", ["t"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                                            helper.make_node("Flatten", ["p"], ["f"])] + dense("f"), [arr("w", 12, 5)]),
        "global max-pool, dense": (True, [t, helper.make_node("GlobalMaxPool", ["t"], ["g"]),
                                          helper.make_node("Flatten", ["g"], ["f"])] + dense("f"), [arr("w", 3, 5)]),
        "gap, dense, relu, dense": (False, gap + [helper.make_node("MatMul", ["f", "w1"], ["h"]),
                                                  helper.make_node("Relu", ["h"], ["r"])] + dense("r"),
                                    [arr("w1", 3, 8), arr("w", 8, 5)]),
        "conv, relu, gap, dense": (False, [t, helper.make_node("Conv", ["t", "k"], ["c"], pads=[1, 1, 1, 1]),
                                           helper.make_node("Relu", ["c"], ["r"]),
                                           helper.make_node("GlobalAveragePool", ["r"], ["g"]),
                                           helper.make_node("Flatten", ["g"], ["f"])] + dense("f"),
                                   [arr("k", 3, 3, 3, 3), arr("w", 3, 5)]),
        "squeeze-excitation, gap, dense": (False, [t, helper.make_node("GlobalAveragePool", ["t"], ["s"]),
                                                   helper.make_node("Sigmoid", ["s"], ["e"]),
                                                   helper.make_node("Mul", ["t", "e"], ["m"]),
                                                   helper.make_node("GlobalAveragePool", ["m"], ["g"]),
                                                   helper.make_node("Flatten", ["g"], ["f"])] + dense("f"), [arr("w", 3, 5)]),
    }


@pytest.mark.parametrize("name", list(_heads()))
def test_the_export_measures_which_heads_have_constant_channel_means(name):
    from explicam.export.headgrad import channel_grads_constant, headgrad_model

    want, nodes, inits = _heads()[name]
    head = _head(nodes, inits)
    features = np.maximum(np.random.default_rng(1).normal(size=(4, 4, 4, 3)), 0).astype(np.float32)
    assert channel_grads_constant(headgrad_model(head), features, 5) is want


def _counting(model, name) -> list:
    calls, fn = [], getattr(model, name)
    setattr(model, name, lambda *args, **kw: calls.append(args) or fn(*args, **kw))
    return calls


@pytest.mark.parametrize("which", ["onnx_model", "onnx_gap_model"])
@pytest.mark.parametrize("n", [1, 4])
def test_gradcam_and_finercam_alone_run_no_gradient_pass_and_agree(which, n, request, val_images):
    """Alone, Grad-CAM, CAM (GAP head) and Finer-CAM run model.forward.onnx and nothing else once
    each class's row is read; their maps equal those of an explainer told the head is not
    constant (the main graph's gradient for Grad-CAM, model.headgrad.onnx for Finer-CAM)."""
    path = request.getfixturevalue(which)
    fast, slow = Explainer(path), Explainer(path)
    slow.model.meta["head_channel_grads"] = "varying"
    assert not slow.model.constant_channel_grads
    images, target = _inputs(val_images)[:n], [None, 1, 0, 3][:n]
    methods = ["gradcam", "finercam"] + (["cam"] if fast.model.head_kind == "gap" else [])
    for m in methods:
        fast.explain(images, m, target=target)   # the rows of these classes, read once
    main, head = _counting(fast.model, "run"), _counting(fast.model, "head_grads")
    for m in methods:
        for opts in ({}, {"finercam_k": 1, "finercam_alpha": 0.6}) if m == "finercam" else ({},):
            got = fast.explain(images, m, target=target, **opts)
            want = slow.explain(images, m, target=target, **opts)
            np.testing.assert_array_equal(got.targets, want.targets)
            np.testing.assert_allclose(got.cams, want.cams, rtol=1e-5, atol=1e-6 * want.cams.max())
    assert not main and not head
