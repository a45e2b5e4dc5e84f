"""`export --model FILE` for ONNX graphs from PyTorch: gradients against torch autograd,
the runtime on their exports (non-square, grey, shorter-side crops), and the errors a
user can meet. torch makes the test files; the runtime never imports it."""
import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from tests.test_anymodel_keras import _export, _meta
from tests.conftest import cli_in_process, run_cli

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

torch = pytest.importorskip("torch", reason="torch is needed to make ONNX files the PyTorch way (pip install torch)")


class TinyResNet(torch.nn.Module):
    """Stem, one residual block, a strided stage, GAP, Linear: the shape of a torchvision ResNet."""

    def __init__(self, channels=3, classes=6):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(channels, 8, 7, 2, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8))
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, classes)

    def features(self, x):
        x = self.stem(x)
        return self.stage(torch.relu(x + self.block(x)))

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _torch_net(channels=3, seed=0):
    torch.manual_seed(seed)
    net = TinyResNet(channels).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _to_onnx(net, path, shape, **kw):
    torch.onnx.export(net, torch.rand(*shape), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=kw.pop("output_names", ["scores"]), **kw)
    return path


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torch")
    net = _torch_net()
    src = _to_onnx(net, tmp / "tiny.onnx", (1, 3, 72, 96))   # batch fixed to 1, NCHW, not square
    labels = tmp / "labels.txt"
    labels.write_text("".join(f"n0{1440764 + i} thing{i}, other name\n" for i in range(6)))
    out, _ = _export(tmp, src, "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)),
                     "--labels", labels)
    return net, out


def test_a_pytorch_graph_gets_torch_autograd_gradients_batch_1_and_8(torch_export):
    net, path = torch_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 8):
        x = np.random.default_rng(n).random((n, 72, 96, 3), dtype=np.float32)
        t = torch.tensor(((x - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32))
        for c in range(6):
            feats = net.features(t)
            grads, = torch.autograd.grad(net.fc(feats.mean((2, 3)))[:, c].sum(), feats)
            out = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {"image": x, "target": np.full(n, c, np.int64)})))
            np.testing.assert_allclose(out["features"], feats.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
            np.testing.assert_allclose(out["grads"], grads.numpy().transpose(0, 2, 3, 1), atol=1e-7)
    meta = _meta(path)
    assert meta["class_names"][:2] == ["thing0", "thing1"]  # synset lines: the first name
    assert meta["preprocess"]["layout"] == "nchw" and meta["input_size"] == [72, 96]


def test_the_runtime_explains_a_pytorch_export(torch_export, tmp_path):
    from explicam import Explainer

    net, path = torch_export
    ex = Explainer(path)
    photo = np.zeros((150, 200, 3), np.uint8)
    cv2.circle(photo, (140, 60), 30, (230, 40, 40), -1)
    res = ex.explain(photo, "gradcam")
    assert res.heatmaps.shape == (1, 72, 96) and res.cams.shape == (1, 9, 12)  # stride 8
    # classic CAM on a GAP + Linear head: sum_k w_k^c A_k with the Linear layer's weights
    cam = ex.explain(photo, "cam", target=2)
    x = ex.model.preprocess(photo)
    feats = net.features(torch.tensor(((x - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)))
    want = np.maximum(np.einsum("nchw,c->nhw", feats.detach().numpy(), net.fc.weight[2].detach().numpy()), 0)
    np.testing.assert_allclose(cam.cams, want, rtol=1e-4, atol=1e-5)
    for method in ex.methods:  # every method runs on it
        assert np.isfinite(ex.explain(photo, method).heatmaps).all()
    cv2.imwrite(str(tmp_path / "p.png"), photo[..., ::-1])
    res = run_cli("explain", tmp_path / "p.png", "--model", path, "--out", tmp_path / "o", "--method", "all")
    assert res.returncode == 0, res.stderr[-2000:]
    assert cv2.imread(str(tmp_path / "o" / "p_all.png")) is not None


def test_a_grayscale_model(tmp_path):
    from explicam import Explainer

    net = _torch_net(channels=1, seed=2)
    src = _to_onnx(net, tmp_path / "grey.onnx", (1, 1, 64, 64))
    bad = cli_in_process("export", "--model", src, "--out", tmp_path / "x" / "model.onnx")
    assert bad.returncode != 0 and "--channels gray" in bad.stderr
    path, _ = _export(tmp_path, src, "--channels", "gray")
    photo = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    got = Explainer(path).explain(photo, "gradcam", target=1)
    grey = photo.astype(np.float32) / 255.0 @ np.array([0.299, 0.587, 0.114], np.float32)
    with torch.no_grad():
        logits = net(torch.tensor(grey[None, None]))
    np.testing.assert_allclose(got.logits, logits.numpy(), atol=1e-5)


def test_resize_shorter_crops_and_the_overlay_maps_back(tmp_path):
    from explicam import Explainer

    src = _to_onnx(_torch_net(seed=4), tmp_path / "sq.onnx", (1, 3, 64, 64))
    path, _ = _export(tmp_path, src, "--resize-shorter", "80")
    ex = Explainer(path)
    photo = np.random.default_rng(5).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    # the model sees the centre 240x240 window of the photo scaled by 80/300
    window = cv2.resize(photo[30:270, 80:320], (64, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(ex.model.preprocess(photo)[0], window / 255.0, atol=1.5 / 255)
    # a hot input pixel (row 16, col 40) lands on the photo where that pixel came from
    res = ex.explain(photo, "gradcam")
    res.heatmaps[0] = 0
    res.heatmaps[0, 16, 40] = 1
    on_photo = res.heatmap_on(0, photo.shape)
    y, x = np.unravel_index(np.argmax(on_photo), on_photo.shape)
    assert abs(y - (30 + (16 + 0.5) * 240 / 64)) <= 2 and abs(x - (80 + (40 + 0.5) * 240 / 64)) <= 2
    assert on_photo[:, :70].max() == 0 and on_photo[:, 330:].max() == 0  # outside what the model saw


def test_errors_name_the_file_and_what_to_do(tmp_path):
    net = _torch_net()

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x), self.net.features(x).mean((2, 3))

    two = _to_onnx(TwoHeads(), tmp_path / "two.onnx", (1, 3, 32, 32), output_names=["cls", "emb"])
    res = cli_in_process("export", "--model", two, "--out", tmp_path / "a" / "model.onnx")
    assert res.returncode != 0 and "cls" in res.stderr and "emb" in res.stderr and "--output" in res.stderr
    assert cli_in_process("export", "--model", two, "--output", "cls", "--out", tmp_path / "b" / "model.onnx").returncode == 0

    dyn = _to_onnx(net, tmp_path / "dyn.onnx", (1, 3, 32, 32),
                   dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "scores": {0: "n"}})
    res = cli_in_process("export", "--model", dyn, "--out", tmp_path / "c" / "model.onnx")
    assert res.returncode != 0 and "--input-size" in res.stderr and "Traceback" not in res.stderr
    assert cli_in_process("export", "--model", dyn, "--input-size", "48,40",
                   "--out", tmp_path / "d" / "model.onnx").returncode == 0
    assert _meta(tmp_path / "d" / "model.onnx")["input_size"] == [48, 40]

    mlp = _to_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)), tmp_path / "mlp.onnx",
                   (1, 3, 16, 16))
    res = cli_in_process("export", "--model", mlp, "--out", tmp_path / "e" / "model.onnx")
    assert res.returncode != 0 and "Traceback" not in res.stderr and "spatial" in res.stderr
    for folder in "ace":
        assert not (tmp_path / folder).exists()


def test_evaluate_on_a_non_square_cropped_export(tmp_path):
    """Images and masks go through the model's own resize (here a shorter-side crop to a
    72x96 input) alike, so the localisation metrics compare the right pixels."""
    from explicam import Explainer
    from explicam.evaluate.inputs import load_eval_set
    from explicam.train import synth
    from explicam.train.data import find_dataset

    data = tmp_path / "data"
    synth.generate(data, n_train=8, n_val=12, size=96, num_classes=4, seed=3)
    net = _torch_net(seed=5)
    net.fc = torch.nn.Linear(16, 4)
    path, _ = _export(tmp_path, _to_onnx(net.eval(), tmp_path / "t4.onnx", (1, 3, 72, 96)), "--resize-shorter", "80")
    model = Explainer(path, warmup=False).model
    es = load_eval_set(str(data), None, fit=model.fit)
    assert es.images.shape[1:] == (72, 96, 3) and es.masks.shape[1:] == (72, 96)
    mask = cv2.imread(find_dataset(str(data)).mask_path(es.paths[0]), cv2.IMREAD_GRAYSCALE)
    # 96x96 photo, shorter side to 80: the model's 72x96 input is the centre 86.4x96 window
    y0 = (96 - 72 * 96 / 80) / 2
    want = cv2.resize(mask[int(round(y0)):int(round(96 - y0))], (96, 72), interpolation=cv2.INTER_AREA) > 127
    assert (es.masks[0] != want).mean() < 0.01
    res = run_cli("evaluate", "--model", path, "--data", data, "--methods", "gradcam", "--sanity-images", 0,
                  "--out", tmp_path / "eval")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["gradcam", "random"]
