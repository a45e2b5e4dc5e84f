"""Ablation-CAM without head runs: where the head adds up one positively homogeneous function of
each feature channel (pooling, then linear layers), zeroing channel k lowers the score by
exactly sum_ij A_ij^k dy/dA_ij^k. The export measures which heads have it
(export/headgrad.ablation_linear); these tests check the measurement against heads that have
it and heads that do not, and the maps against the head re-runs of the paper's definition."""
from __future__ import annotations

import numpy as np
import pytest

from explicam.runtime import Explainer
from tests.test_channel_rows import _counting, _head, _heads
from tests.test_methods import _inputs


@pytest.mark.parametrize("name", list(_heads()))
def test_the_export_measures_which_heads_drop_by_gradient_times_activation(name):
    from explicam.export.headgrad import ablation_linear, headgrad_model

    # pooling then linear layers: yes; a ReLU between linear layers, a conv (channels mixed
    # before a ReLU), a squeeze-excitation gate: no
    want = name in ("gap, dense", "max-pool, flatten, dense", "global max-pool, dense")
    _, nodes, inits = _heads()[name]
    head = _head(nodes, inits)
    features = np.maximum(np.random.default_rng(1).normal(size=(4, 4, 4, 3)), 0).astype(np.float32)
    assert ablation_linear(head, headgrad_model(head), features, 5, channels=3) is want


@pytest.mark.parametrize("which", ["onnx_model", "onnx_gap_model"])
def test_ablation_weights_from_the_gradient_equal_the_head_reruns(which, request, val_images):
    """The seed's head (max-pool, flatten, dense) and the GAP head, measured linear: the weights
    from model.onnx's gradient equal (y - y_k) / y from one head run per live channel, the
    definition, on validation images with their own and other targets; no head runs."""
    path = request.getfixturevalue(which)
    fast = Explainer(path)
    assert fast.model.meta["head_ablation"] == "linear"
    images, target = _inputs(val_images)[:4], [None, 1, 0, 3]
    heads = _counting(fast.model, "head")
    got = fast.explain(images, "ablationcam", target=target)
    assert heads == []
    want = fast.explain(images, "ablationcam", target=target, ablation_rerun=True)
    assert len(heads) > 0
    np.testing.assert_allclose(got.cams, want.cams, rtol=1e-4, atol=1e-4 * np.abs(want.cams).max())
    np.testing.assert_allclose(got.heatmaps, want.heatmaps, atol=1e-4)
    # an export whose head was measured otherwise re-runs it, with the same maps
    slow = Explainer(path)
    slow.model.meta["head_ablation"] = "rerun"
    calls = _counting(slow.model, "head")
    again = slow.explain(images, "ablationcam", target=target)
    assert len(calls) > 0
    np.testing.assert_allclose(again.cams, want.cams, rtol=1e-6, atol=1e-6 * np.abs(want.cams).max())
