"""The files an export makes from its head. model.headgrad.onnx (export/headgrad.py): d sum_c
seed_c logits_c / d features through the head alone, checked against model.onnx's own
gradients one class at a time (linearity is the independent expectation: the side file never
sees the main graph's backward walk), and Finer-CAM through it against Finer-CAM through k + 1
main-graph passes. model.recipro.onnx (export/recipro.py): Recipro-CAM's scores without the
masked maps, against the head run on the masked maps written out."""
import os

import numpy as np
import onnx
import pytest

from explicam.runtime import Explainer
from explicam.runtime.model import OnnxModel
from tests.test_methods import _inputs


@pytest.mark.parametrize("which", ["onnx_model", "onnx_gap_model"])
def test_headgrad_is_the_seeded_sum_of_class_gradients(which, request, val_images):
    path = request.getfixturevalue(which)
    model = OnnxModel(path)
    assert model.meta["headgrad_file"] == "model.headgrad.onnx"
    side = onnx.load(os.path.join(os.path.dirname(path), "model.headgrad.onnx"))
    assert [i.name for i in side.graph.input] == ["features", "classes", "weights"]
    assert [o.name for o in side.graph.output] == ["grads"]
    x = model.preprocess(_inputs(val_images)[:3])
    classes = model.num_classes
    per_class = []
    for c in range(classes):   # model.onnx's gradient of each class score, one pass each
        out = model.run(x, np.full(len(x), c))
        per_class.append(out["grads"])
    feats = out["features"]
    seed = np.random.default_rng(0).normal(size=(len(x), classes)).astype(np.float32)
    want = np.einsum("nc,cnhwk->nhwk", seed.astype(np.float64), np.stack(per_class).astype(np.float64))
    got = model.head_grads(feats, seed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # the file's own form: a few (class, weight) pairs per image, a class named twice adds up
    pairs = np.array([[1, 0, 1], [2, 2, 0], [classes - 1, 0, 3]]) % classes
    weights = np.array([[0.5, -2.0, 1.5], [1.0, 1.0, -0.25], [3.0, 0.0, 1.0]])
    dense = np.zeros((len(x), classes))
    np.add.at(dense, (np.repeat(np.arange(len(x)), 3), pairs.reshape(-1)), weights.reshape(-1))
    want = np.einsum("nc,cnhwk->nhwk", dense, np.stack(per_class).astype(np.float64))
    got = model.head_grads(feats, (pairs, weights))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_finercam_through_the_head_equals_k_plus_one_passes(onnx_model, val_images):
    images = _inputs(val_images)[:4]
    fast = Explainer(onnx_model)
    slow = Explainer(onnx_model)
    slow.model.head_grads = lambda features, seed: None   # as an export without the side file
    slow.model.meta["head_channel_grads"] = "varying"   # (whose rows would come from that file)
    for k, alpha in ((1, 1.0), (3, 0.6)):
        a = fast.explain(images, "finercam", target=[0, 1, None, 3], finercam_k=k, finercam_alpha=alpha).cams
        b = slow.explain(images, "finercam", target=[0, 1, None, 3], finercam_k=k, finercam_alpha=alpha).cams
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * b.max())


def test_an_export_without_the_side_file_still_explains(onnx_model, val_images, tmp_path):
    import shutil

    folder = os.path.dirname(onnx_model)
    for name in os.listdir(folder):
        if name.startswith("model.") and name.endswith(".onnx") and name != "model.headgrad.onnx":
            shutil.copy(os.path.join(folder, name), tmp_path / name)
    copied = Explainer(str(tmp_path / "model.onnx"))
    assert copied.model.head_grads(np.zeros((1, *copied.model.feature_shape), np.float32),
                                   np.zeros((1, copied.model.num_classes), np.float32)) is None
    images = _inputs(val_images)[:2]
    np.testing.assert_allclose(copied.explain(images, "finercam").cams, Explainer(onnx_model).explain(images, "finercam").cams,
                               rtol=1e-4, atol=1e-6)


def _counting_main_graph(explainer) -> list:
    """The calls of the explainer's model.onnx from now on."""
    calls, run = [], explainer.model.run
    explainer.model.run = lambda *args, **kw: calls.append(args) or run(*args, **kw)
    return calls


@pytest.mark.parametrize("n", [1, 4])
def test_finercam_alone_skips_the_main_graph_and_agrees_with_it(onnx_model, val_images, n):
    """Finer-CAM alone: model.forward.onnx's features and logits, model.headgrad.onnx's
    gradients (one thread at batch 1); beside Grad-CAM++ (which needs the gradient map) it takes
    the main graph: the same maps."""
    ex = Explainer(onnx_model)
    images, target = _inputs(val_images)[:n], [None, 1, 0, 3][:n]
    calls = _counting_main_graph(ex)
    for opts in ({}, {"finercam_k": 1, "finercam_alpha": 0.6}):
        alone = ex.explain(images, "finercam", target=target, **opts)
        assert not calls
        both = ex.explain_methods(images, ["finercam", "gradcam++"], target=target, **opts)["finercam"]
        assert len(calls) == 1
        calls.clear()
        np.testing.assert_array_equal(alone.targets, both.targets)
        np.testing.assert_allclose(alone.logits, both.logits, atol=1e-6)
        np.testing.assert_allclose(alone.probabilities, both.probabilities, atol=1e-7)
        np.testing.assert_allclose(alone.cams, both.cams, rtol=1e-5, atol=1e-6 * both.cams.max())
    # no reference class (finercam_k=0): the target's own gradient, from the head's graph too
    zero = ex.explain(images, "finercam", target=target, finercam_k=0)
    assert not calls
    np.testing.assert_allclose(zero.cams, ex.explain(images, "gradcam", target=target).cams, rtol=1e-5,
                               atol=1e-6 * zero.cams.max())


def test_a_forward_file_without_features_takes_the_main_graph(onnx_model, val_images, tmp_path):
    """An older export: model.forward.onnx outputs logits and probabilities alone."""
    import shutil

    folder = os.path.dirname(onnx_model)
    for name in os.listdir(folder):
        if name.startswith("model.") and name.endswith(".onnx"):
            shutil.copy(os.path.join(folder, name), tmp_path / name)
    forward = onnx.load(str(tmp_path / "model.forward.onnx"))
    keep = [o for o in forward.graph.output if o.name != "features"]
    del forward.graph.output[:]
    forward.graph.output.extend(keep)
    onnx.save(forward, str(tmp_path / "model.forward.onnx"))
    old = Explainer(str(tmp_path / "model.onnx"))
    assert old.model.forward_session() is not None and old.model.forward_features(np.zeros((1, *old.input_hw, 3))) is None
    calls = _counting_main_graph(old)
    images = _inputs(val_images)[:3]
    got = old.explain(images, "finercam", target=[0, None, 2])
    assert len(calls) == 1
    want = Explainer(onnx_model).explain(images, "finercam", target=[0, None, 2])
    np.testing.assert_array_equal(got.targets, want.targets)
    np.testing.assert_allclose(got.cams, want.cams, rtol=1e-5, atol=1e-6 * want.cams.max())


def test_finercam_on_another_layer_reads_that_layers_gradients(tmp_path):
    """An export with three layers: Finer-CAM at features_1 (no side file for it) is w (g_t -
    alpha g_d) of that layer's own gradients, each from model.onnx with one target (k = 1:
    the one weight p / (p + 1e-9) is 1 to within 1e-9 / p)."""
    pytest.importorskip("torch")
    from tests.test_input_grads import _export_torch, _relu_net

    path = _export_torch(tmp_path, _relu_net(3), layer="auto:3", input_grads=False)["onnx"]
    ex = Explainer(path, feature_layer="features_1")
    images = (np.random.default_rng(1).random((3, *ex.input_hw, 3)) * 255).astype(np.uint8)
    res = ex.explain(images, "finercam", finercam_k=1, finercam_alpha=0.5)
    x = ex.model.preprocess(images)
    out = ex.model.run(x, res.targets)
    logits = out["logits"].astype(np.float64)
    for i, t in enumerate(res.targets):
        dist = np.abs(logits[i] - logits[i, t])
        dist[t] = np.inf
        d = int(np.argmin(dist))
        g_d = ex.model.run(x[i:i + 1], np.array([d]))["grads_1"][0]
        weights = (out["grads_1"][i] - 0.5 * g_d).mean(axis=(0, 1))
        want = np.maximum((out["features_1"][i] * weights).sum(-1), 0)
        np.testing.assert_allclose(res.cams[i], want, rtol=1e-4, atol=1e-5 * max(want.max(), 1e-6))


@pytest.mark.parametrize("which", ["onnx_model", "onnx_gap_model"])
def test_recipro_file_equals_the_head_on_masked_maps(which, request, val_images):
    from explicam.runtime.methods_perturb import reciprocam_maps

    path = request.getfixturevalue(which)
    model = OnnxModel(path)
    assert model.meta["recipro_file"] == "model.recipro.onnx"
    feats = model.run(model.preprocess(_inputs(val_images)[:3]), np.full(3, -1))["features"]
    n, h, w, c = feats.shape
    masked = np.zeros((n, h * w, h, w, c), np.float32)   # the paper's one-hot spatial masks, written out
    for p in range(h * w):
        masked[:, p, p // w, p % w] = feats[:, p // w, p % w]
    want = model.head(masked.reshape(-1, h, w, c), "probabilities").reshape(n, h * w, -1)
    np.testing.assert_allclose(model.recipro(feats), want, rtol=1e-5, atol=1e-6)
    ex, slow = Explainer(path), Explainer(path)
    slow.model.recipro = lambda features: None   # as an export without the side file
    images = _inputs(val_images)[:3]
    np.testing.assert_allclose(ex.explain(images, "reciprocam", target=[0, 1, None]).cams,
                               slow.explain(images, "reciprocam", target=[0, 1, None]).cams, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reciprocam_maps(slow.model, feats).transpose(0, 2, 3, 1).reshape(n, h * w, -1),
                               want, rtol=1e-5, atol=1e-6)


def test_heads_of_other_shapes_get_no_recipro_file():
    """A head with a convolution before its pooling is not linear in the masked map."""
    from onnx import TensorProto, helper, numpy_helper

    from explicam.export.recipro import recipro_model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "k"),
             numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Transpose", ["features"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "k"], ["conv"]), helper.make_node("Relu", ["conv"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3, 3, 4])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])], inits)
    head = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert recipro_model(head) is None
    nodes[1:3] = [helper.make_node("Identity", ["t"], ["r"])]   # without the convolution it is
    del head.graph.node[:]
    head.graph.node.extend(nodes)
    assert recipro_model(head) is not None


def test_headgrad_of_a_head_without_a_final_linear_layer():
    """A head that ends in global pooling (SqueezeNet's 1x1 conv to the classes, then the mean):
    the seed goes in as one-hot rows of the logits. d logits[c] / d features[i, j, k] is
    [k == c] / (h w), summed with the weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from explicam.export.headgrad import headgrad_model

    n, h, w, c = 2, 3, 4, 5
    g = helper.make_graph([helper.make_node("Transpose", ["features"], ["t"], perm=[0, 3, 1, 2]),
                           helper.make_node("GlobalAveragePool", ["t"], ["p"]),
                           helper.make_node("Flatten", ["p"], ["logits"]),
                           helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "head",
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", h, w, c])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", c]) for o in ("logits", "probabilities")])
    side = headgrad_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    s = ort.InferenceSession(side.SerializeToString(), providers=["CPUExecutionProvider"])
    classes, weights = np.array([[0, 3, 3], [4, 1, 0]]), np.array([[1.0, -0.5, 2.0], [0.25, 1.0, -1.0]], np.float32)
    got = s.run(None, {"features": np.random.default_rng(0).random((n, h, w, c), dtype=np.float32),
                       "classes": classes, "weights": weights})[0]
    want = np.zeros((n, h, w, c))
    for i in range(n):
        for cls, wt in zip(classes[i], weights[i]):
            want[i, :, :, cls] += wt / (h * w)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
