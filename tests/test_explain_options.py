"""`explain` on image files with the method options of issue #14: Integrated Gradients'
completeness (Sundararajan et al. 2017: sum of attributions = F(x) - F(x')) in
predictions.csv and on the console, held to torch autograd on the same network; and
--seed, which draws SmoothGrad's noise and RISE's masks (same seed, same heatmaps)."""
import copy
import csv

import cv2
import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_input_grads import FromImage, _export_torch, _images, _relu_net, _u8

torch = pytest.importorskip("torch", reason="torch makes the PyTorch test files (pip install torch==2.13.0)")
TARGET = 1


@pytest.fixture(scope="module")
def ig_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("opts")
    net = _relu_net(4)
    res = _export_torch(tmp, net, input_grads=True)
    photos = tmp / "photos"
    photos.mkdir()
    for i, img in enumerate(_u8(_images(3, 21))):
        cv2.imwrite(str(photos / f"p{i}.png"), img)
    return net, res["onnx"], photos


def _rows(out):
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _torch_completeness(net, path, steps):
    """|sum(IG) - (F(x) - F(0))| / |F(x) - F(0)| by torch autograd in float64, the trapezoid rule
    on `steps` points from the black baseline (what explain does by default)."""
    f = FromImage(copy.deepcopy(net).double())
    x = torch.tensor(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB) / 255.0)[None]
    x0 = torch.zeros_like(x)
    alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
    w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
    w[[0, -1]] /= 2
    p = (x0 + alphas[:, None, None, None] * (x - x0)).requires_grad_(True)
    g = torch.autograd.grad(f(p)[:, TARGET].sum(), p)[0]
    total = float(((x - x0) * (w[:, None, None, None] * g).sum(0)).sum())
    with torch.no_grad():
        diff = float(f(x)[0, TARGET] - f(x0)[0, TARGET])
    return abs(total - diff) / abs(diff)


def test_ig_completeness_in_the_csv_and_on_the_console(ig_model, tmp_path):
    from explicam.runtime.files import explain_files

    net, model, photos = ig_model
    out = run_cli("explain", photos, "--model", model, "--out", tmp_path / "cli", "--method",
                  "integrated-gradients", "--ig-steps", 16, "--target", TARGET)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(tmp_path / "cli")
    assert len(rows) == 3 and all(r["ig_completeness"] for r in rows)
    got = {r["file"]: float(r["ig_completeness"]) for r in rows}
    want = {str(photos / f"p{i}.png"): _torch_completeness(net, photos / f"p{i}.png", 16) for i in range(3)}
    for name, value in got.items():   # float32 onnxruntime against float64 torch
        assert value == pytest.approx(want[name], rel=0.01, abs=1e-6), (name, value, want[name])
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("integrated-gradients completeness"))
    assert "over 3 image(s) (steps 16)" in line and f"{100 * max(got.values()):.3g}%" in line
    # more path points, a smaller error: per image, against torch at each step count
    errors = []
    for steps in (4, 64):
        explain_files([photos], out=str(tmp_path / f"s{steps}"), model=str(model), method="integrated-gradients",
                      target=TARGET, options={"ig_steps": steps})
        errors.append({r["file"]: float(r["ig_completeness"]) for r in _rows(tmp_path / f"s{steps}")})
    for name in got:
        assert errors[0][name] > got[name] > errors[1][name], (name, errors[0][name], got[name], errors[1][name])
        want64 = _torch_completeness(net, name, 64)
        assert errors[1][name] == pytest.approx(want64, rel=0.01, abs=1e-6)
    # a grid with another method: the column is there, empty on the other method's rows
    res = explain_files([photos / "p0.png"], out=str(tmp_path / "grid"), model=str(model),
                        method="gradcam,integrated-gradients", options={"ig_steps": 4})
    rows = _rows(tmp_path / "grid")
    assert [bool(r["ig_completeness"]) for r in rows] == [False, True] and len(res.completeness) == 1
    explain_files([photos / "p0.png"], out=str(tmp_path / "plain"), model=str(model), method="gradcam")
    assert "ig_completeness" not in _rows(tmp_path / "plain")[0]


def test_seed_draws_smoothgrad_noise_and_rise_masks(ig_model, tmp_path):
    from explicam.runtime.explainer import Explainer
    from explicam.runtime.images import read_image

    _, model, photos = ig_model
    args = ["explain", photos / "p0.png", "--model", model, "--method", "smoothgrad,rise", "--smoothgrad-samples", 4,
            "--rise-masks", 16, "--rise-cells", 3, "--heatmap", "npy", "--batch-size", 1]
    maps = {}
    for name, seed in (("default", []), ("s0", ["--seed", 0]), ("s5", ["--seed", 5])):
        out = run_cli(*args, "--out", tmp_path / name, *seed)
        assert out.returncode == 0, out.stderr[-2000:]
        maps[name] = {m: np.load(tmp_path / name / f"p0_{m}_heatmap.npy") for m in ("smoothgrad", "rise")}
    for m in ("smoothgrad", "rise"):
        np.testing.assert_array_equal(maps["default"][m], maps["s0"][m])   # the default seed is 0: repeatable
        assert np.abs(maps["s5"][m] - maps["s0"][m]).max() > 1e-3, m       # another seed, other draws
    ex = Explainer(model, warmup=False, batch_size=1)
    photo = read_image(photos / "p0.png")
    sg = ex.explain([photo], "smoothgrad", smoothgrad_samples=4, smoothgrad_seed=5).heatmaps[0]
    rise = ex.explain([photo], "rise", rise_masks=16, rise_cells=3, rise_seed=5).heatmaps[0]
    np.testing.assert_allclose(maps["s5"]["smoothgrad"], sg, atol=1e-6)
    np.testing.assert_allclose(maps["s5"]["rise"], rise, atol=1e-6)
