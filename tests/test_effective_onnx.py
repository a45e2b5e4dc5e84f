"""The effective centre of each feature cell from the ONNX file itself (export/input_grads.py:
the export's graph differentiated per cell, onnx + onnxruntime only): a delta kernel's tap found
through the prologue, equal to TensorFlow's measurement on the seed network, written by
`export --input-grads` and offered as `--placement effective`."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch makes the PyTorch test file (pip install torch==2.13.0)")


class Delta(torch.nn.Module):
    """Conv k=4, stride 2, pads 1 with a delta at tap (2, 2): cell j sees input pixel 2 j + 1 alone,
    while its receptive field's centre is 2 j + 0.5."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 4, 2, 1, bias=False)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, :, 2, 2] = 1.0

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def delta_export(tmp_path_factory):
    from explicam.export.anymodel import ExportConfig, export_any

    tmp = tmp_path_factory.mktemp("delta")
    torch.onnx.export(Delta().eval(), torch.rand(1, 3, 16, 16), str(tmp / "delta.onnx"), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["scores"])
    return export_any(ExportConfig(model=str(tmp / "delta.onnx"), out=str(tmp / "m" / "model.onnx"),
                                   input_grads=True), log=lambda *_: None)


def test_the_export_measures_a_delta_kernels_tap(delta_export):
    from explicam.evaluate.effective import cell_centres
    from explicam.export.input_grads import cell_saliency

    meta = delta_export["metadata"]
    eff, geo = meta["effective_geometry"], meta["geometry"]
    assert geo["stride"] == [2.0, 2.0] and geo["offset"] == [0.5, 0.5]
    assert eff["stride"] == pytest.approx([2, 2]) and eff["offset"] == pytest.approx([1, 1], abs=1e-6)
    assert eff["from_geometric_px"] == pytest.approx([0.5, 0.5], abs=1e-6) and eff["images_from"] == "random images"
    x = np.random.default_rng(0).uniform(0.1, 1, (2, 16, 16, 3)).astype(np.float32)
    sal = cell_saliency(delta_export["onnx"], x, np.arange(8), np.arange(8))
    j = np.arange(8)
    c = cell_centres(sal)
    assert np.allclose(c[..., 0], (2 * j + 1)[:, None]) and np.allclose(c[..., 1], (2 * j + 1)[None, :])
    assert np.allclose(sal.sum(axis=(2, 3)), 3.0)   # one pixel, three colours, weight 1


def test_placement_effective_draws_each_cell_at_its_measured_centre(delta_export):
    from explicam import camkernels as ck
    from explicam.runtime.explainer import Explainer

    ex = Explainer(delta_export["onnx"], kernels="numpy", warmup=False, placement="effective")
    eff = delta_export["metadata"]["effective_geometry"]
    images = (np.random.default_rng(1).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    res = ex.explain(images, "gradcam")
    want = ck.get("numpy").upsample_placed(res.cams, 16, 16, eff["stride"][0], eff["offset"][0], eff["stride"][1],
                                           eff["offset"][1])
    np.testing.assert_allclose(res.heatmaps, ck.get("numpy").normalize_minmax(want), atol=1e-6)
    geometric = Explainer(delta_export["onnx"], kernels="numpy", warmup=False).explain(images, "gradcam")
    assert not np.allclose(geometric.heatmaps, res.heatmaps, atol=1e-3)


def test_evaluate_measures_it_from_the_onnx_file(delta_export):
    from explicam.evaluate.effective import measure_effective

    x = np.random.default_rng(2).uniform(0.1, 1, (3, 16, 16, 3)).astype(np.float32)
    out = measure_effective(delta_export["onnx"], delta_export["metadata"], x, delta_export["metadata"]["geometry"])
    assert "ONNX" in out["source"] and out["offset"] == pytest.approx([1, 1], abs=1e-6) and out["images"] == 3


def test_onnx_cell_gradients_equal_tensorflow_on_the_seed_network():
    pytest.importorskip("tensorflow", reason="the reference is tf.GradientTape (the [train] extra)")
    import keras

    from explicam.evaluate.effective import keras_cell_saliency
    from explicam.export.input_grads import cell_saliency
    from explicam.export.onnx import build_onnx
    from explicam.train.model import build_model

    keras.utils.set_random_seed(1)
    model = build_model(kernel=4, input_size=64, num_classes=3)
    main, _ = build_onnx(model, "conv4")
    x = np.random.default_rng(3).random((2, 64, 64, 3), dtype=np.float32)
    want = keras_cell_saliency(model, "conv4", x)
    got = cell_saliency(main, x, np.arange(4), np.arange(4))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_the_command_line_explains_with_input_gradients_and_effective_placement(delta_export, tmp_path):
    import cv2

    from tests.conftest import run_cli

    photo = (np.random.default_rng(4).random((30, 40, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "p.png"), photo)
    res = run_cli("explain", tmp_path / "p.png", "--model", delta_export["onnx"], "--out", tmp_path / "o",
                  "--method", "saliency,integrated-gradients", "--placement", "effective",
                  "--ig-steps", 4, "--ig-baseline", "blur", "--smoothgrad-samples", 3)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "o" / "p_saliency+integrated-gradients.png").is_file()
