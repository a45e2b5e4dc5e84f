"""Several feature layers in one export (export --layer a,b,c / auto:K, export/layers.py) and
multi-layer Layer-CAM (runtime/methods_input.layercam_fused): every layer's gradient against
torch autograd, the fusion against the paper's written here in numpy (Jiang et al. 2021,
section III-C), --feature-layer for single-layer methods, batch equals one by one, numba
equals numpy, and Keras layer names through the command line."""
import numpy as np
import onnxruntime as ort
import pytest

from tests.test_anymodel_keras import _export, _meta
from tests.test_input_grads import H, W, FromImage, _export_torch, _images, _rel, _relu_net, _u8

torch = pytest.importorskip("torch", reason="torch makes the PyTorch test files (pip install torch==2.13.0)")


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    net = _relu_net(3)
    res = _export_torch(tmp, net, layer="auto:3", input_grads=False)
    return net, res


def _explainer(path, **kw):
    from explicam.runtime.explainer import Explainer

    return Explainer(path, warmup=False, **kw)


def test_auto_3_writes_three_stages_with_torch_autograd_gradients(multi):
    net, res = multi
    layers = res["metadata"]["feature_layers"]
    assert [d["features"] for d in layers] == ["features", "features_1", "features_2"]
    assert [d["feature_shape"] for d in layers] == [[10, 12, 16], [20, 24, 8], [40, 48, 8]]
    assert [d["geometry"]["stride"] for d in layers] == [[4.0, 4.0], [2.0, 2.0], [1.0, 1.0]]
    assert {"grads_fd", "grads_fd_1", "grads_fd_2"} <= set(res["parity"])
    modules = [net.stage[2], net.after, net.stem[2]]   # the ReLUs ending each stage
    x = _images(3, 11)
    session = ort.InferenceSession(res["onnx"], providers=["CPUExecutionProvider"])
    f = FromImage(net)
    for c in (0, 4):
        store = {}
        hooks = [m.register_forward_hook(lambda m, i, o: store.setdefault(m, o)) for m in modules]
        logits = f(torch.tensor(x))
        for h in hooks:
            h.remove()
        store = [store[m] for m in modules]
        want = torch.autograd.grad(logits[:, c].sum(), store)
        out = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"image": x, "target": np.full(3, c, np.int64)})))
        for k, (t, g) in enumerate(zip(store, want)):
            feats, grads = (("features", "grads") if k == 0 else (f"features_{k}", f"grads_{k}"))
            np.testing.assert_allclose(out[feats], t.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
            assert _rel(out[grads], g.numpy().transpose(0, 2, 3, 1)) < 1e-5


def _placed(maps, hw, stride, offset):
    """Bilinear upsampling with cell j at stride * j + offset, edges held: written out by hand."""
    out = maps
    for axis, n_out in ((1, hw[0]), (2, hw[1])):
        n = out.shape[axis]
        u = np.clip((np.arange(n_out) - offset[axis - 1]) / stride[axis - 1], 0, n - 1)
        i0 = np.minimum(np.floor(u).astype(int), n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        frac = (u - i0).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, i0, axis=axis) * (1 - frac) + np.take(out, i1, axis=axis) * frac
    return out


def _paper_fusion(out, layers, fuse="max", gamma=2.0):
    """Layer-CAM of each layer, M = ReLU(sum_k ReLU(g_k) A_k) / max M; tanh(gamma M) for all
    but the coarsest layer (eq. 9); upsampled where each layer's cells look; max (or sum)."""
    maps = []
    coarsest = min(range(len(layers)), key=lambda i: np.prod(layers[i]["feature_shape"][:2]))
    for i, d in enumerate(layers):
        a, g = out[d["features"]].astype(np.float64), out[d["grads"]].astype(np.float64)
        m = np.maximum((np.maximum(g, 0) * a).sum(-1), 0)
        m = m / np.where(m.max((1, 2)) > 0, m.max((1, 2)), 1)[:, None, None]
        if i != coarsest:
            m = np.tanh(gamma * m)
        maps.append(_placed(m, (H, W), d["geometry"]["stride"], d["geometry"]["offset"]))
    return np.max(maps, axis=0) if fuse == "max" else np.sum(maps, axis=0)


@pytest.mark.parametrize("fuse", ["max", "sum"])
def test_fused_layercam_is_the_papers_fusion(multi, fuse):
    _, res = multi
    x = _u8(_images(3, 12))
    ex = _explainer(res["onnx"], kernels="numpy")
    got = ex.explain(x, "layercam", target=2, layercam_fuse=fuse)
    session = ort.InferenceSession(res["onnx"], providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": ex.model.preprocess(x), "target": np.full(3, 2, np.int64)})))
    want = _paper_fusion(out, res["metadata"]["feature_layers"], fuse)
    assert got.cams.shape == (3, H, W) and np.abs(got.cams - want).max() < 1e-5
    # one by one, and numba
    alone = np.concatenate([ex.explain(x[i:i + 1], "layercam", target=2, layercam_fuse=fuse).cams for i in range(3)])
    np.testing.assert_allclose(alone, got.cams, atol=1e-6)
    nb = _explainer(res["onnx"], kernels="numba").explain(x, "layercam", target=2, layercam_fuse=fuse)
    np.testing.assert_allclose(nb.cams, got.cams, atol=1e-5)


def test_feature_layer_picks_one_layer_for_single_layer_methods(multi):
    from explicam.runtime.methods import MethodError

    _, res = multi
    x = _u8(_images(2, 13))
    layer = res["metadata"]["feature_layers"][1]
    for name in ("features_1", 1, layer["layer"]):
        ex = _explainer(res["onnx"], kernels="numpy", feature_layer=name)
        got = ex.explain(x, "gradcam", target=1)
        out = ex.model.run(ex.model.preprocess(x), np.full(2, 1))
        a, g = out["features_1"], out["grads_1"]
        want = np.maximum(np.einsum("nhwc,nc->nhw", a, g.mean((1, 2))), 0)
        assert got.cams.shape == (2, 20, 24) and np.abs(got.cams - want).max() < 1e-5
        assert ex.geometry["stride"] == [2.0, 2.0]
        single = ex.explain(x, "layercam", target=1)   # a chosen layer: Layer-CAM of that layer alone
        assert single.cams.shape == (2, 20, 24)
    with pytest.raises(MethodError, match="no feature layer 'nope'.*features_2"):
        _explainer(res["onnx"], feature_layer="nope")


def test_layers_by_name_and_keras_names_through_the_command_line(tmp_path):
    pytest.importorskip("tensorflow", reason="a Keras model is exported through tf2onnx (the [train] extra)")
    from tests.test_anymodel_keras import _small_keras

    _small_keras(tmp_path / "small.keras")
    path, log = _export(tmp_path, tmp_path / "small.keras", "--layer", "last,r1")
    layers = _meta(path)["feature_layers"]
    assert [d["name"] for d in layers] == ["last", "r1"] and "grads_fd_1" in log
    assert [d["feature_shape"] for d in layers] == [[20, 24, 16], [20, 24, 8]]


def test_feature_layer_on_the_command_line(multi, tmp_path):
    import cv2

    from tests.conftest import run_cli

    _, res = multi
    cv2.imwrite(str(tmp_path / "p.png"), _u8(_images(1, 14))[0])
    out = run_cli("explain", tmp_path / "p.png", "--model", res["onnx"], "--out", tmp_path / "o", "--method",
                  "gradcam", "--feature-layer", "features_2", "--heatmap", "npy")
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.load(tmp_path / "o" / "p_gradcam_heatmap.npy").shape == (H, W)
    bad = run_cli("explain", tmp_path / "p.png", "--model", res["onnx"], "--out", tmp_path / "o2", "--feature-layer",
                  "nope")
    assert bad.returncode != 0 and "no feature layer 'nope'" in bad.stderr
