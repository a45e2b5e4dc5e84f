"""Recipro-CAM, RISE and Finer-CAM against independent references: slow loops written from
the papers (Keras as the network) for Recipro-CAM and RISE (a fixed mask set), two and
more tf.GradientTape gradients for Finer-CAM; RISE on an ONNX classifier explicam never
exported (torch-made) against onnxruntime on the file with numpy preprocessing; batch
against one by one, numba against numpy; evaluate, files and bench taking the new methods."""
import cv2
import numpy as np
import onnxruntime as ort
import pytest

from explicam.runtime import Explainer
from explicam.runtime.methods import METHODS, MethodError
from explicam.runtime.methods_perturb import GAUSSIAN, RiseMasks, reciprocam_maps
from tests.conftest import SIZE, run_cli
from tests.test_methods import _inputs, _keras, _norm, _relu, _tape

NEW = ["reciprocam", "rise", "finercam"]
FAST = {"rise_masks": 24}  # RISE with few masks where only the plumbing is tested


@pytest.fixture(scope="module")
def explainer(onnx_model):
    return Explainer(onnx_model)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _keras_head(model):
    """The layers after conv4, applied one by one (Keras, independent of model.head.onnx)."""
    names = [layer.name for layer in model.layers]
    layers = model.layers[names.index("conv4") + 1:]

    def head(features):
        h = np.asarray(features, np.float32)
        for layer in layers:
            h = layer(h, training=False)
        return h.numpy()
    return head


# --- Recipro-CAM ---------------------------------------------------------------------------
def recipro_reference(head, a, mask):
    """Byun & Lee 2022 as loops: for each position, the masked map through the head, softmax.
    (h, w, C) features -> (classes, h, w)."""
    h, w, _ = a.shape
    maps = []
    for i in range(h):
        for j in range(w):
            m = np.zeros_like(a)
            if mask == "onehot":
                m[i, j] = a[i, j]
            else:  # the authors' Gaussian variant: the position's vector over its 3x3 neighbourhood
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        if 0 <= i + di < h and 0 <= j + dj < w:
                            m[i + di, j + dj] = GAUSSIAN[di + 1, dj + 1] * a[i, j]
            maps.append(m)
    probs = _softmax(head(np.stack(maps)))  # (h*w, classes)
    return probs.T.reshape(-1, h, w)


@pytest.mark.parametrize("mask", ["onehot", "gaussian"])
def test_reciprocam_matches_a_slow_loop_from_the_paper(mask, trained_run, explainer, val_images):
    model = _keras(trained_run[0])
    images = _inputs(val_images)[:3]
    targets = [0, 2, None]
    res = explainer.explain(images, "reciprocam", target=targets, reciprocam_mask=mask)
    a, _, _ = _tape(model, images.astype(np.float32) / 255, res.targets)
    head = _keras_head(model)
    out = explainer.model.run(explainer.model.preprocess(images), res.targets)
    every = reciprocam_maps(explainer.model, out["features"], mask)
    for i in range(len(images)):
        ref = recipro_reference(head, a[i].astype(np.float32), mask)
        np.testing.assert_allclose(res.cams[i], ref[res.targets[i]], atol=2e-5, err_msg=f"{mask} image {i}")
        np.testing.assert_allclose(every[i], ref, atol=2e-5)  # every class at once
        assert res.cams[i].max() <= 1 and ref.std() > 1e-4  # softmax scores, not yet normalised; not flat


def test_reciprocam_head_calls_in_chunks_give_the_same_maps(explainer, val_images):
    images = _inputs(val_images)[:2]
    whole = explainer.explain(images, "reciprocam").cams
    for batch in (0, 1, 3, 7):
        np.testing.assert_array_equal(explainer.explain(images, "reciprocam", reciprocam_batch=batch).cams, whole)


def test_reciprocam_without_a_head_file_is_a_clear_method_error(onnx_model, tmp_path, val_images):
    import shutil

    shutil.copy(onnx_model, tmp_path / "model.onnx")  # copied alone: no model.head.onnx beside it
    alone = Explainer(tmp_path / "model.onnx", warmup=False)
    with pytest.raises(MethodError, match="reciprocam.*model.head.onnx"):
        alone.explain(val_images[0][0], "reciprocam")
    alone.model.meta["head_file"] = ""  # an export whose head also reads the image writes none
    with pytest.raises(MethodError, match="has none"):
        alone.explain(val_images[0][0], "reciprocam")


# --- RISE ----------------------------------------------------------------------------------
def test_rise_matches_a_slow_loop_from_the_paper_with_a_fixed_mask_set(trained_run, explainer, val_images):
    model = _keras(trained_run[0])
    images = _inputs(val_images)[:2]
    rng = np.random.default_rng(5)
    masks = cv2.resize(rng.random((SIZE // 8, SIZE // 8, 40), dtype=np.float32), (SIZE, SIZE)).transpose(2, 0, 1)
    p = 0.4
    res = explainer.explain(images, "rise", target=[1, None], rise_mask_set=masks, rise_p=p)
    assert res.cams.shape == (2, SIZE, SIZE)  # at the input's resolution
    x = images.astype(np.float32) / 255
    for i, t in enumerate(res.targets):
        sal = np.zeros((SIZE, SIZE))
        for m in masks:  # Petsiuk et al. 2018, eq. 6 as a sum over the masks
            prob = _softmax(model(x[i][None] * m[None, :, :, None], training=False).numpy())[0, t]
            sal += prob * m
        sal /= len(masks) * p
        np.testing.assert_allclose(res.cams[i], sal, rtol=1e-4, atol=1e-5 * sal.max())
        assert sal.std() > 1e-3 * sal.mean()


def test_rise_masks_are_drawn_as_the_authors_code_draws_them(explainer):
    n, s, p, seed, hw = 30, 5, 0.5, 3, (SIZE, SIZE - 8)
    masks = RiseMasks(n, s, p, seed, hw, explainer.k)
    rng = np.random.default_rng(seed)
    grids = (rng.random((n, s, s)) < p).astype(np.float32)
    cell = [int(np.ceil(d / s)) for d in hw]
    shifts = np.stack([rng.integers(0, c, n) for c in cell], axis=1)
    np.testing.assert_array_equal(masks.grids, grids)
    np.testing.assert_array_equal(masks.shifts, shifts)
    for i in range(n):  # upsample the grid to (s + 1) * cell, crop at the random shift
        up = cv2.resize(grids[i], ((s + 1) * cell[1], (s + 1) * cell[0]), interpolation=cv2.INTER_LINEAR)
        want = up[shifts[i, 0]:shifts[i, 0] + hw[0], shifts[i, 1]:shifts[i, 1] + hw[1]]
        np.testing.assert_allclose(masks.chunk(i, i + 1)[0], want, atol=1e-6)
    assert abs(masks.full.mean() - p) < 0.1
    chunked = RiseMasks(n, s, p, seed, hw, explainer.k, cache_bytes=0)  # too big to keep: made chunk by chunk
    assert chunked.full is None
    np.testing.assert_array_equal(np.concatenate([chunked.chunk(i, i + 7) for i in range(0, n, 7)]), masks.full)


def test_rise_masks_are_made_once_and_the_map_is_drawn_as_it_is(onnx_model, val_images):
    ex = Explainer(onnx_model, warmup=False)
    first = ex.explain(val_images[0][:2], "rise", **FAST)
    keys = [k for k in ex.cache if k[0] == "rise"]
    assert len(keys) == 1
    kept = ex.cache[keys[0]]
    again = ex.explain(val_images[0][:2], "rise", **FAST)
    assert ex.cache[keys[0]] is kept and [k for k in ex.cache if k[0] == "rise"] == keys
    np.testing.assert_array_equal(first.cams, again.cams)
    other = ex.explain(val_images[0][:2], "rise", rise_seed=1, **FAST)
    assert len([k for k in ex.cache if k[0] == "rise"]) == 2 and not np.array_equal(other.cams, first.cams)
    want = ex.k.normalize_minmax(first.cams)  # no upsampling, no placement: the map is at the input's size
    np.testing.assert_array_equal(first.heatmaps, want)
    np.testing.assert_array_equal(ex.heatmaps(first.cams, "naive"), want)
    if ex.geometry is not None:
        np.testing.assert_array_equal(ex.heatmaps(first.cams, "geometric"), want)
    with pytest.raises(ValueError, match="rise_masks >= 1"):
        ex.explain(val_images[0][0], "rise", rise_masks=0)


# --- Finer-CAM -----------------------------------------------------------------------------
@pytest.mark.parametrize("k,alpha", [(1, 1.0), (3, 0.6)])
def test_finercam_matches_gradienttape_gradients(k, alpha, trained_run, explainer, val_images):
    model = _keras(trained_run[0])
    images = _inputs(val_images)[:4]
    res = explainer.explain(images, "finercam", target=[0, 1, None, 3], finercam_k=k, finercam_alpha=alpha)
    x = images.astype(np.float32) / 255
    a, g_target, logits = _tape(model, x, res.targets)
    for i, t in enumerate(res.targets):
        dist = np.abs(logits[i] - logits[i, t])
        dist[t] = np.inf
        refs = np.argsort(dist, kind="stable")[:k]  # the k classes nearest the target by logit
        p = _softmax(logits[i])[refs]
        w = p / (p.sum() + 1e-9)
        grad = w.sum() * g_target[i]
        for d, wd in zip(refs, w):  # one more tape per reference class
            _, g_ref, _ = _tape(model, x[i:i + 1], np.array([d]))
            grad = grad - alpha * wd * g_ref[0]
        ref = _relu((a[i] * grad.mean(axis=(0, 1))).sum(-1))
        np.testing.assert_allclose(_norm(res.cams[i]), _norm(ref), atol=1e-4, err_msg=f"image {i}")


def test_finercam_alpha_0_is_gradcam_and_k_is_capped(explainer, val_images):
    images = _inputs(val_images)[:3]
    grad = explainer.explain(images, "gradcam").cams
    np.testing.assert_allclose(explainer.explain(images, "finercam", finercam_alpha=0.0).cams, grad,
                               rtol=1e-5, atol=1e-6 * grad.max())
    wide = explainer.explain(images, "finercam", finercam_k=99).cams  # 4 classes: 3 references at most
    np.testing.assert_array_equal(wide, explainer.explain(images, "finercam", finercam_k=3).cams)


# --- all three: batch, kernels, errors -----------------------------------------------------
@pytest.mark.parametrize("method", NEW)
def test_batch_equals_one_by_one(method, explainer, val_images):
    images = val_images[0][:4]
    targets = [0, 1, None, 3]
    together = explainer.explain(images, method, target=targets, **FAST)
    for i, img in enumerate(images):
        alone = explainer.explain(img, method, target=targets[i], **FAST)
        np.testing.assert_allclose(together.cams[i], alone.cams[0], rtol=1e-4, atol=1e-5 * max(1, alone.cams.max()))
        assert together.targets[i] == alone.targets[0]


def test_numba_and_numpy_agree(onnx_model, val_images):
    a, b = Explainer(onnx_model, kernels="numba"), Explainer(onnx_model, kernels="numpy")
    for method in NEW:
        ra, rb = a.explain(val_images[0][:3], method, **FAST), b.explain(val_images[0][:3], method, **FAST)
        np.testing.assert_allclose(ra.heatmaps, rb.heatmaps, atol=1e-5, err_msg=method)


def test_all_grids_offer_the_new_methods():
    from explicam.runtime.files import parse_methods

    names = parse_methods("all", list(METHODS))
    assert set(NEW) <= set(names)


def test_explain_files_writes_the_new_methods(onnx_model, val_images, tmp_path):
    from explicam.runtime.files import explain_files

    photo = tmp_path / "in" / "a.png"
    photo.parent.mkdir()
    cv2.imwrite(str(photo), val_images[0][0][..., ::-1])
    res = explain_files([photo], model=str(onnx_model), out=str(tmp_path / "out"), method=",".join(NEW),
                        options=FAST)
    assert res.methods == NEW and res.written == [str(tmp_path / "out" / "a_all.png")]


# --- evaluate and bench --------------------------------------------------------------------
def test_evaluate_takes_the_new_methods(onnx_model, synth_dir, tmp_path):
    from explicam.evaluate.evaluate import EvalConfig, run_evaluation

    res = run_evaluation(str(onnx_model), str(synth_dir),
                         EvalConfig(methods=NEW, limit=8, steps=4, sanity_images=0, effective_images=0,
                                    method_options=FAST), out=str(tmp_path / "eval"), log=lambda *_: None)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(NEW) <= set(rows)
    for m in NEW:
        assert np.isfinite(rows[m]["deletion_auc"]) and np.isfinite(rows[m]["insertion_auc"]), m
    # a map at the input's resolution is not moved by a placement
    assert rows["rise"]["pointing_naive"] == rows["rise"].get("pointing_geometric", rows["rise"]["pointing_naive"])


def test_evaluate_command_line_passes_method_options(onnx_model, synth_dir, tmp_path):
    res = run_cli("evaluate", "--model", onnx_model, "--data", synth_dir, "--methods", "rise", "--limit", 4,
                  "--steps", 3, "--sanity-images", 0, "--effective-images", 0, "--rise-masks", 8, "--rise-cells", 3,
                  "--rise-p", 0.3, "--out", tmp_path / "eval")
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    settings = json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]
    assert settings["method_options"] == {"rise_masks": 8, "rise_cells": 3, "rise_p": 0.3}


def test_bench_rows_for_the_new_methods(onnx_model):
    from explicam.runtime.bench import RISE_MASKS, SLOW, run_bench

    assert "rise" in SLOW
    res = run_bench(str(onnx_model), methods=NEW, batches=(1,), min_seconds=0.01, log=lambda *_: None)
    names = {(r["name"], r["kernels"]) for r in res["rows"]}
    for kernels in ("numba", "numpy"):
        assert {("reciprocam", kernels), ("finercam", kernels), (f"rise ({RISE_MASKS} masks)", kernels),
                ("rise, per mask", kernels)} <= names
    assert all(r["ratio"] > 0 for r in res["rows"])


# --- RISE on an ONNX classifier explicam never exported --------------------------------------
torch_only = pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is None,
                                reason="torch is needed to make an ONNX classifier the PyTorch way (pip install torch)")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory):
    """A small torch CNN exported by torch alone: NCHW, batch fixed to 1, softmax at the end."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5), nn.Softmax(dim=1)).eval()
    path = tmp_path_factory.mktemp("plain") / "tiny.onnx"
    torch.onnx.export(net, torch.rand(1, 3, 40, 56), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["prob"])
    return path


def _by_hand(path, x01):
    """onnxruntime on the file, the preprocessing written out in numpy, one image at a time."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = ((x01 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(0, 3, 1, 2)
    return np.concatenate([s.run(None, {"input": feed[i:i + 1].astype(np.float32)})[0] for i in range(len(feed))])


def _plain(path, **kw):
    from explicam.runtime.plain import PlainExplainer
    from explicam.runtime.preprocess import Preprocess

    return PlainExplainer(path, preprocess=Preprocess(mean=list(MEAN), std=list(STD)), **kw)


@torch_only
def test_plain_classifier_scores_equal_onnxruntime_with_numpy_preprocessing(plain_onnx, monkeypatch):
    ex = _plain(plain_onnx)
    m = ex.model
    assert m.input_hw == (40, 56) and m.layout == "nchw" and m.max_batch == 1 and m.score_kind == "probabilities"
    x = np.random.default_rng(0).random((5, 40, 56, 3), dtype=np.float32)
    np.testing.assert_allclose(m.probabilities(x), _by_hand(plain_onnx, x), atol=1e-6)
    photo = (np.random.default_rng(1).random((80, 112, 3)) * 255).astype(np.uint8)
    res = ex.explain(photo, "rise", **FAST)
    np.testing.assert_allclose(res.probabilities, _by_hand(plain_onnx, m.preprocess(photo)), atol=1e-6)
    assert res.cams.shape == (1, 40, 56) and res.heatmaps.shape == (1, 40, 56)
    import explicam.runtime.plain as plain

    monkeypatch.setattr(plain, "_final_op", lambda *_: None)  # no onnx package: the values tell
    assert plain.PlainModel(plain_onnx).score_kind == "probabilities"


@torch_only
def test_rise_on_a_plain_classifier_matches_the_slow_loop(plain_onnx):
    ex = _plain(plain_onnx)
    x = np.random.default_rng(2).random((2, 40, 56, 3), dtype=np.float32)
    masks = np.random.default_rng(3).random((12, 40, 56), dtype=np.float32)
    res = ex.explain(x, "rise", target=[4, None], rise_mask_set=masks, rise_p=0.5)
    for i, t in enumerate(res.targets):
        probs = _by_hand(plain_onnx, x[i][None] * masks[..., None])[:, t]
        want = (probs[:, None, None] * masks).sum(0) / (len(masks) * 0.5)
        np.testing.assert_allclose(res.cams[i], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(MethodError, match="plain classifier.*export it first: python cli.py export --model"):
        ex.explain(x, "gradcam")
    assert ex.methods == ["rise"]


@torch_only
def test_explain_command_line_runs_rise_on_a_plain_classifier(plain_onnx, tmp_path, val_images):
    photo = tmp_path / "a.png"
    cv2.imwrite(str(photo), val_images[0][0][..., ::-1])
    pre = ["--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
    res = run_cli("explain", photo, "--model", plain_onnx, "--method", "all", "--rise-masks", 16, "--seed", 2,
                  *pre, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out" / "a_rise.png").exists() and "with rise in" in res.stdout
    res = run_cli("explain", photo, "--model", plain_onnx, "--method", "gradcam", *pre, "--out", tmp_path / "o2")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "export it first" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_preprocessing_options_are_refused_for_an_explicam_export(onnx_model, tmp_path, val_images):
    photo = tmp_path / "a.png"
    cv2.imwrite(str(photo), val_images[0][0][..., ::-1])
    res = run_cli("explain", photo, "--model", onnx_model, "--mean", "0.5", "--out", tmp_path / "out")
    assert res.returncode != 0 and "Traceback" not in res.stderr and "preprocessing is in its metadata" in res.stderr


@torch_only
def test_a_dynamic_input_needs_its_size(tmp_path):
    import torch

    from explicam.runtime.model import ModelError
    from explicam.runtime.plain import PlainModel

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(net, torch.rand(1, 3, 32, 32), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(ModelError, match="--input-size"):
        PlainModel(path)
    m = PlainModel(path, input_hw=(24, 30))
    assert m.input_hw == (24, 30) and m.max_batch is None and m.score_kind == "logits"
    x = np.random.default_rng(0).random((3, 24, 30, 3), dtype=np.float32)
    np.testing.assert_allclose(m.probabilities(x).sum(1), 1, atol=1e-6)


def test_the_plain_path_imports_nothing_of_the_export():
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys\nimport explicam.runtime.plain, explicam.runtime.methods_perturb\n"
            "bad = [m for m in sys.modules if m.startswith('explicam.export') or m in ('tensorflow', 'torch')]\n"
            "assert not bad, bad\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_mask_weighted_sum_kernel_numba_equals_numpy_and_the_plain_sum():
    from explicam import camkernels

    rng = np.random.default_rng(0)
    masks, w = rng.random((37, 23, 31), dtype=np.float32), rng.random(37, dtype=np.float32)
    want = np.einsum("k,khw->hw", w.astype(np.float64), masks.astype(np.float64))
    nb, npy = (camkernels.get(b).mask_weighted_sum(masks, w) for b in ("numba", "numpy"))
    assert nb.dtype == np.float32 and nb.shape == (23, 31)
    np.testing.assert_array_equal(nb, npy)  # same order, same float64 accumulation
    np.testing.assert_allclose(nb, want, rtol=1e-6)
    with pytest.raises(ValueError, match="3 weights for 37 masks"):
        camkernels.mask_weighted_sum(masks, w[:3])
