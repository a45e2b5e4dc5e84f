"""`cli.py explain` on image files and folders: what is written must be what the explainer
computed, and every odd or broken input gets a result or one clear line, never a traceback."""
import csv
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from explicam.runtime import overlay as ov
from explicam.runtime.files import explain_files
from explicam.runtime.images import read_image
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def explainer(onnx_model):
    from explicam.runtime import Explainer
    return Explainer(onnx_model)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, val_images):
    """Four validation photos at 160x128 (not square, not the model's size): two at the top
    of a folder, two in a subfolder."""
    root = tmp_path_factory.mktemp("photos") / "album"
    (root / "sub").mkdir(parents=True)
    paths = []
    for i, img in enumerate(val_images[0][:4]):
        p = root / ("sub" if i % 2 else "") / f"p{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(cv2.resize(img, (160, 128)), cv2.COLOR_RGB2BGR))
        paths.append(p)
    return root, paths


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_overlays_csv_and_16bit_heatmaps_that_match_the_explainer(tmp_path, onnx_model, explainer, photos):
    root, paths = photos
    out = tmp_path / "out"
    single = tmp_path / "single.png"
    single.write_bytes(paths[0].read_bytes())
    res = run_cli("explain", root, single, "--model", onnx_model, "--out", out, "--heatmap", "png", "--top-k", "2",
                  "--batch-size", "2")  # three batches, read ahead on a second thread
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    rows = read_csv(out / "predictions.csv")
    assert [r["file"] for r in rows] == [str(root / "p0.png"), str(root / "p2.png"), str(root / "sub" / "p1.png"),
                                         str(root / "sub" / "p3.png"), str(single)]
    assert list(rows[0]) == ["file", "class_1", "prob_1", "class_2", "prob_2", "method", "target", "output"]
    for row in rows:
        photo = read_image(row["file"])
        exp = explainer.explain(photo, "gradcam")
        (c1, p1), (c2, p2) = exp.top_k(2)[0]
        assert (row["class_1"], row["class_2"], row["method"], row["target"]) == (c1, c2, "gradcam", c1)
        assert float(row["prob_1"]) == pytest.approx(p1, abs=1e-5)
        assert float(row["prob_2"]) == pytest.approx(p2, abs=1e-5)
        stem = out / row["output"].replace("_gradcam.png", "")
        heat16 = cv2.imread(f"{stem}_gradcam_heatmap.png", cv2.IMREAD_UNCHANGED)
        assert heat16.dtype == np.uint16 and heat16.shape == exp.heatmaps[0].shape
        np.testing.assert_allclose(heat16 / 65535.0, exp.heatmaps[0], atol=1e-4)
        written = cv2.cvtColor(cv2.imread(str(out / row["output"])), cv2.COLOR_BGR2RGB)
        expected = ov.overlay(photo, exp.heatmaps[0])
        assert written.shape == photo.shape
        np.testing.assert_array_equal(written[80:], expected[80:])   # below the labels: the very same pixels
        assert np.abs(written[:40, :60].astype(int) - expected[:40, :60]).mean() > 10  # the labels are there
    assert (out / "sub" / "p1_gradcam.png").exists()  # the folder's tree is mirrored


def test_overlay_without_labels_side_by_side_npy_and_target(tmp_path, explainer, photos):
    _, paths = photos
    res = explain_files([paths[0]], out=str(tmp_path / "a"), labels=False, heatmap="npy", explainer=explainer)
    photo = read_image(paths[0])
    exp = explainer.explain(photo)
    written = cv2.cvtColor(cv2.imread(res.written[0]), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(written, ov.overlay(photo, exp.heatmaps[0]))
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "p0_gradcam_heatmap.npy"), exp.heatmaps[0])

    res = explain_files([paths[0]], out=str(tmp_path / "b"), side_by_side=True, alpha=0.3, colormap="inferno",
                        explainer=explainer)
    pair = cv2.cvtColor(cv2.imread(res.written[0]), cv2.COLOR_BGR2RGB)
    assert pair.shape == (128, 160 * 2 + 4, 3)
    np.testing.assert_array_equal(pair[:, :160], photo)
    np.testing.assert_array_equal(pair[80:, 164:], ov.overlay(photo, exp.heatmaps[0], 0.3, "inferno")[80:])

    other = [c for c in explainer.class_names if c != exp.top_k(1)[0][0][0]][0]
    res = explain_files([paths[0]], out=str(tmp_path / "c"), target=other, heatmap="npy", explainer=explainer)
    assert read_csv(res.csv)[0]["target"] == other
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "p0_gradcam_heatmap.npy"),
                                  explainer.explain(photo, "gradcam", other).heatmaps[0])


def test_method_all_writes_one_grid_and_leaves_out_what_the_model_cannot_do(tmp_path, explainer, photos):
    _, paths = photos
    res = explain_files(paths[:2], out=str(tmp_path), method="all", explainer=explainer)
    assert "cam" not in res.methods and len(res.methods) == len(explainer.methods) - 1
    assert any("cam left out" in n and "global-average-pooling" in n for n in res.notes)
    assert sorted(os.listdir(tmp_path)) == ["p0_all.png", "p1_all.png", "predictions.csv"]
    grid = cv2.imread(str(tmp_path / "p0_all.png"))
    tiles = 1 + len(res.methods)  # the photo, then one overlay per method, five to a row
    lines = -(-tiles // 5)
    assert grid.shape[0] == lines * (128 + 22) + (lines - 1) * 4 and grid.shape[1] == 5 * 160 + 4 * 4
    rows = read_csv(tmp_path / "predictions.csv")
    assert [r["method"] for r in rows] == res.methods * 2 and tiles == 12


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory, val_images):
    """One file per case of the issue's robustness list, in one folder."""
    d = tmp_path_factory.mktemp("odd")
    rgb = cv2.resize(val_images[0][1], (96, 72))
    pil = Image.fromarray(rgb)
    pil.convert("L").save(d / "gray.png")
    pil.convert("RGBA").save(d / "rgba.png")
    pil.convert("P", palette=Image.ADAPTIVE).save(d / "palette.png")
    cv2.imwrite(str(d / "deep16.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    pil.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored lying down, with "rotate 90 degrees clockwise to view"
    pil.save(d / "exif_rotated.jpg", quality=95, exif=exif)
    Image.fromarray(rgb[20:28, 30:38]).save(d / "tiny8.png")
    (d / "zero.jpg").write_bytes(b"")
    good_jpeg = (d / "cmyk.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (d / "text.jpg").write_text("this is not a picture\n")
    return d


def test_odd_and_broken_files_in_a_folder(tmp_path, onnx_model, explainer, odd_files):
    out = tmp_path / "out"
    res = run_cli("explain", odd_files, "--model", onnx_model, "--out", out, "--heatmap", "npy")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    bad = {"zero.jpg": "empty", "truncated.jpg": "truncated", "text.jpg": "not a readable image"}
    for name, why in bad.items():
        lines = [line for line in res.stderr.splitlines() if name in line]
        assert len(lines) == 1 and why in lines[0], res.stderr
    rows = read_csv(out / "predictions.csv")
    good = ["cmyk.jpg", "deep16.png", "exif_rotated.jpg", "gray.png", "palette.png", "rgba.png", "tiny8.png"]
    assert [os.path.basename(r["file"]) for r in rows] == good
    assert "7 image(s)" in res.stdout and "3 skipped" in res.stdout
    # the EXIF photo is explained upright: the heatmap of its stored pixels turned by hand
    stored = np.asarray(Image.open(odd_files / "exif_rotated.jpg").convert("RGB"))  # PIL ignores the tag
    by_hand = explainer.explain(np.ascontiguousarray(np.rot90(stored, k=-1))).heatmaps[0]
    lying = explainer.explain(stored).heatmaps[0]
    written = np.load(out / "exif_rotated_gradcam_heatmap.npy")
    np.testing.assert_allclose(written, by_hand, atol=0.02)
    assert np.abs(written - lying).max() > 0.1  # the check can tell the two apart
    assert cv2.imread(str(out / "exif_rotated_gradcam.png")).shape[:2] == (192, 144)  # upright, enlarged 2x
    cmyk = read_image(odd_files / "cmyk.jpg")
    assert np.abs(cmyk.astype(int) - read_image(odd_files / "rgba.png")).mean() < 4  # CMYK colours come back
    # an 8x8 photo is enlarged 16x (nearest) so its labels fit; its heatmap is the model's own
    tiny = cv2.imread(str(out / "tiny8_gradcam.png"))
    assert tiny.shape == (128, 128, 3)
    np.testing.assert_allclose(np.load(out / "tiny8_gradcam_heatmap.npy"),
                               explainer.explain(read_image(odd_files / "tiny8.png")).heatmaps[0], atol=1e-6)
    gray = read_image(odd_files / "gray.png")
    assert (gray[..., 0] == gray[..., 1]).all()


def test_a_12000px_jpeg_is_explained_without_a_memory_blow_up(tmp_path, onnx_model):
    big = tmp_path / "big.jpg"
    img = np.full((12000, 12000, 3), 110, np.uint8)
    cv2.circle(img, (6000, 6000), 2500, (30, 30, 220), -1)
    assert cv2.imwrite(str(big), img, [cv2.IMWRITE_JPEG_QUALITY, 60])
    del img
    code = (
        "import resource, sys\n"
        "from explicam.runtime import Explainer\nfrom explicam.runtime.files import explain_files\n"
        f"ex = Explainer({str(onnx_model)!r})\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"r = explain_files([{str(big)!r}], out={str(tmp_path / 'out')!r}, explainer=ex)\n"
        "print(len(r.images), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    images, growth_mb = map(int, res.stdout.split())
    assert images == 1
    assert growth_mb < 200, f"peak memory grew by {growth_mb} MB (the decoded photo alone would be 412 MB)"
    assert cv2.imread(str(tmp_path / "out" / "big_gradcam.png")).shape == (1500, 1500, 3)


def test_nothing_to_do_is_one_line_and_a_non_zero_exit(tmp_path, onnx_model, photos):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    not_a_folder = tmp_path / "file_not_folder"
    not_a_folder.write_text("")
    cases = [
        ((tmp_path / "missing.jpg",), "missing.jpg: no such file"),
        ((empty,), "no images found"),
        ((photos[1][0], "--out", not_a_folder), "--out"),
    ]
    for args, expected in cases:
        t0 = time.perf_counter()
        res = run_cli("explain", *args, "--model", onnx_model)
        assert res.returncode == 1 and expected in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert time.perf_counter() - t0 < 30
    res = run_cli("explain", photos[1][0], "--model", onnx_model, "--method", "nope", "--out", tmp_path / "o")
    assert res.returncode == 1 and "--method" in res.stderr and "gradcam" in res.stderr


def test_default_model_is_the_newest_in_runs_and_outputs_are_not_reexplained(tmp_path, onnx_model, photos):
    old, new = tmp_path / "runs" / "old", tmp_path / "runs" / "new"
    old.mkdir(parents=True)
    new.mkdir()
    (old / "model.onnx").write_text("not a model")  # would fail if it were picked
    os.utime(old / "model.onnx", (time.time() - 100, time.time() - 100))
    for f in ("model.onnx", "model.head.onnx"):
        (new / f).write_bytes((onnx_model.parent / f).read_bytes())
    album = tmp_path / "album"
    album.mkdir()
    (album / "a.png").write_bytes(photos[1][0].read_bytes())
    for _ in range(2):  # the second run must not pick up the first run's overlays in album/out
        res = run_cli("explain", "album", "--out", "album/out", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert len(read_csv(album / "out" / "predictions.csv")) == 1
    res = run_cli("explain", album, "--out", tmp_path / "o", cwd=tmp_path / "runs")
    assert res.returncode == 1 and "no model found" in res.stderr
