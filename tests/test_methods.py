"""Every CAM method against an independent reference: TensorFlow's GradientTape on the
Keras model for the gradient methods, slow loops written from the papers for Score-CAM
and Ablation-CAM, numpy's SVD for Eigen-CAM."""
import cv2
import numpy as np
import pytest

from explicam.runtime import Explainer
from explicam.runtime.methods import METHODS, MethodError, register
from tests.conftest import SIZE

GRADIENT_METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]


def _norm(m):
    m = np.asarray(m, np.float64)
    span = m.max() - m.min()
    return np.zeros_like(m) if span < 1e-12 else (m - m.min()) / span


def _relu(x):
    return np.maximum(x, 0)


def _keras(run):
    import keras

    return keras.models.load_model(run / "model.keras")


def _tape(model, x, targets):
    """Features A and d logits[target] / d A per image, by tf.GradientTape."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(model.input, [model.get_layer("conv4").output, model.output])
    with tf.GradientTape() as tape:
        a, y = grad_model(tf.constant(x), training=False)
        score = tf.reduce_sum(tf.gather(y, targets, axis=1, batch_dims=1))
    return a.numpy().astype(np.float64), tape.gradient(score, a).numpy().astype(np.float64), y.numpy()


def reference_cam(method, a, g, model=None, target=None):
    """The papers' formulas, written out in plain numpy (one image: a, g are (h, w, C))."""
    if method == "gradcam":
        return _relu((a * g.mean(axis=(0, 1))).sum(-1))
    if method == "gradcam++":
        g2, g3 = g ** 2, g ** 3
        denom = 2 * g2 + a.sum(axis=(0, 1)) * g3
        alpha = np.divide(g2, denom, out=np.zeros_like(g2), where=denom != 0)
        return _relu((a * (alpha * _relu(g)).sum(axis=(0, 1))).sum(-1))
    if method == "xgradcam":
        w = (g * a / (a.sum(axis=(0, 1)) + 1e-7)).sum(axis=(0, 1))
        return _relu((a * w).sum(-1))
    if method == "hirescam":
        return _relu((g * a).sum(-1))
    if method == "layercam":
        return _relu((_relu(g) * a).sum(-1))
    if method == "cam":  # Zhou 2016: the Dense weights of the target class
        return _relu((a * model.get_layer("logits").kernel.numpy()[:, target]).sum(-1))
    raise KeyError(method)


def _inputs(val_images):
    return np.stack([cv2.resize(i, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for i in val_images[0]])


@pytest.fixture(scope="module")
def explainer(onnx_model):
    return Explainer(onnx_model)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_methods_match_gradienttape(method, trained_run, explainer, val_images):
    model = _keras(trained_run[0])
    images = _inputs(val_images)
    targets = np.array([0, 1, 2, 3, 0, 1, 2, 3])  # every class, not just the top-1
    res = explainer.explain(images, method, target=list(targets))
    a, g, _ = _tape(model, images.astype(np.float32) / 255, targets)
    for i in range(len(images)):
        ref = reference_cam(method, a[i], g[i])
        np.testing.assert_allclose(_norm(res.cams[i]), _norm(ref), atol=1e-4, err_msg=f"{method} image {i}")


@pytest.mark.parametrize("method", GRADIENT_METHODS + ["cam"])
def test_gap_head_methods_match_reference(method, trained_gap_run, onnx_gap_model, val_images):
    model = _keras(trained_gap_run[0])
    ex = Explainer(onnx_gap_model)
    images = _inputs(val_images)[:4]
    res = ex.explain(images, method)
    a, g, y = _tape(model, images.astype(np.float32) / 255, res.targets)
    assert res.targets.tolist() == y.argmax(1).tolist()  # target=None is the top-1 class
    for i in range(len(images)):
        ref = reference_cam(method, a[i], g[i], model, res.targets[i])
        np.testing.assert_allclose(_norm(res.cams[i]), _norm(ref), atol=1e-4, err_msg=f"{method} image {i}")


def test_cam_refuses_the_flatten_head(explainer, val_images):
    with pytest.raises(MethodError, match="global-average-pooling head"):
        explainer.explain(val_images[0][0], "cam")


def test_scorecam_matches_a_slow_loop_from_the_paper(trained_run, explainer, val_images):
    model = _keras(trained_run[0])
    img = _inputs(val_images)[1]
    x = img.astype(np.float32) / 255
    res = explainer.explain(img, "scorecam")
    t = int(res.targets[0])
    a, _, _ = _tape(model, x[None], np.array([t]))
    a = a[0]
    weights = np.zeros(a.shape[-1])
    for k in range(a.shape[-1]):  # one channel at a time, Keras as the network
        up = cv2.resize(a[..., k].astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        if up.max() == up.min():
            continue
        mask = (up - up.min()) / (up.max() - up.min())
        logits = model(x[None] * mask[None, :, :, None], training=False).numpy()[0]
        weights[k] = np.exp(logits[t] - logits.max()) / np.exp(logits - logits.max()).sum()
    ref = _relu((a * weights).sum(-1))
    np.testing.assert_allclose(_norm(res.cams[0]), _norm(ref), atol=1e-4)


def test_scorecam_topk_keeps_only_k_channels(explainer, val_images):
    full = explainer.explain(val_images[0][0], "scorecam")
    fast = explainer.explain(val_images[0][0], "scorecam", scorecam_topk=16)
    assert fast.cams.shape == full.cams.shape and np.isfinite(fast.cams).all()
    assert np.corrcoef(fast.cams.ravel(), full.cams.ravel())[0, 1] > 0.5


def test_ablationcam_matches_a_slow_loop_from_the_paper(trained_run, explainer, val_images):
    model = _keras(trained_run[0])
    img = _inputs(val_images)[2]
    res = explainer.explain(img, "ablationcam")
    t = int(res.targets[0])
    a, _, _ = _tape(model, img[None].astype(np.float32) / 255, np.array([t]))
    a = a[0].astype(np.float32)
    names = [layer.name for layer in model.layers]
    head = model.layers[names.index("conv4") + 1:]

    def score(features):
        h = features[None]
        for layer in head:
            h = layer(h, training=False)
        return float(h.numpy()[0, t])

    y = score(a)
    weights = np.empty(a.shape[-1])
    for k in range(a.shape[-1]):
        ablated = a.copy()
        ablated[..., k] = 0
        weights[k] = (y - score(ablated)) / y
    ref = _relu((a * weights).sum(-1))
    np.testing.assert_allclose(_norm(res.cams[0]), _norm(ref), atol=1e-4)


def test_eigencam_matches_numpy_svd(explainer, val_images):
    images = _inputs(val_images)[:4]
    res = explainer.explain(images, "eigencam")
    out = explainer.model.run(explainer.model.preprocess(images), np.full(len(images), -1))
    for i, feats in enumerate(out["features"]):
        m = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
        proj = m @ np.linalg.svd(m, full_matrices=False)[2][0]
        if np.corrcoef(proj, m.sum(1))[0, 1] < 0:  # the sign that agrees with the activations
            proj = -proj
        ref = _relu(proj).reshape(feats.shape[:2])
        np.testing.assert_allclose(_norm(res.cams[i]), _norm(ref), atol=1e-4)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "scorecam", "ablationcam", "eigencam"])
def test_batch_equals_one_by_one(method, explainer, val_images):
    images = val_images[0][:4]  # different original sizes are fine
    together = explainer.explain(images, method, target=[0, 1, None, 3])
    for i, img in enumerate(images):
        alone = explainer.explain(img, method, target=[0, 1, None, 3][i])
        np.testing.assert_allclose(together.cams[i], alone.cams[0], rtol=1e-4, atol=1e-5 * max(1, alone.cams.max()))
        assert together.targets[i] == alone.targets[0]


def test_default_call_size_is_a_pixel_budget(explainer, onnx_model, val_images):
    from explicam.runtime.explainer import CALL_PIXELS

    h, w = explainer.input_hw
    assert explainer.batch_size == max(1, CALL_PIXELS // (h * w)) and Explainer(onnx_model, batch_size=5).batch_size == 5
    images = val_images[0][:7]
    one_call, three = explainer.explain(images, "gradcam"), Explainer(onnx_model, batch_size=3).explain(images, "gradcam")
    np.testing.assert_allclose(three.cams, one_call.cams, rtol=1e-4, atol=1e-5 * max(1, one_call.cams.max()))
    np.testing.assert_array_equal(three.targets, one_call.targets)


def test_numba_and_numpy_kernels_agree(onnx_model, val_images):
    a, b = Explainer(onnx_model, kernels="numba"), Explainer(onnx_model, kernels="numpy")
    for method in GRADIENT_METHODS + ["eigencam"]:
        ra, rb = a.explain(val_images[0], method), b.explain(val_images[0], method)
        np.testing.assert_allclose(ra.heatmaps, rb.heatmaps, atol=1e-5)


def test_result_shapes_targets_and_ranges(explainer, val_images):
    names = explainer.class_names
    res = explainer.explain(val_images[0][:3], "gradcam", target=names[2])
    n, h = 3, SIZE // 16
    assert res.cams.shape == (n, h, h) and res.cams.dtype == np.float32 and (res.cams >= 0).all()
    assert res.heatmaps.shape == (n, SIZE, SIZE) and res.heatmaps.min() >= 0 and res.heatmaps.max() <= 1
    assert res.targets.tolist() == [2, 2, 2] and res.target_names == [names[2]] * 3
    assert res.probabilities.shape == (n, len(names))
    np.testing.assert_allclose(res.probabilities.sum(1), 1, atol=1e-5)
    assert res.top_k(2)[0][0][1] == pytest.approx(res.probabilities[0].max())
    single = explainer.explain(np.asarray(val_images[0][0]), "gradcam", target=1)
    assert single.cams.shape == (1, h, h) and single.targets.tolist() == [1]
    with pytest.raises(ValueError, match="unknown target class 'zebra'"):
        explainer.explain(val_images[0][0], target="zebra")
    with pytest.raises(ValueError, match="out of range"):
        explainer.explain(val_images[0][0], target=99)
    with pytest.raises(ValueError, match="unknown method 'gradkam'"):
        explainer.explain(val_images[0][0], "gradkam")


def test_a_new_method_is_one_function_and_all_zero_maps_give_zeros(explainer, val_images):
    @register("zeros")
    def zeros(a):
        """A method whose map is all zero: the heatmap must be zeros, never NaN."""
        return np.zeros(a.features.shape[:3], np.float32)

    try:
        assert "zeros" in explainer.methods
        res = explainer.explain(val_images[0][:2], "zeros")
        assert np.isfinite(res.heatmaps).all() and (res.heatmaps == 0).all()
    finally:
        METHODS.pop("zeros")


def test_bad_model_files_get_clear_errors(tmp_path):
    from explicam.runtime.model import ModelError

    with pytest.raises(ModelError, match="no such model file"):
        Explainer(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        Explainer(tmp_path / "junk.onnx")
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])
    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["image"], ["logits"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(ModelError, match="not an explicam export"):
        Explainer(tmp_path / "plain.onnx")
