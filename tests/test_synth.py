"""Tests for train/synth.py: the built-in synthetic dataset with ground-truth masks."""
import json
import re
import os

import cv2
import numpy as np
import pytest

from explicam.train import synth

SIZE, N_TRAIN, N_VAL = 64, 40, 20


def _load(root, rel, flags=cv2.IMREAD_COLOR):
    img = cv2.imread(os.path.join(root, rel), flags)
    assert img is not None, rel
    return img


def _files(root):
    """Relative path -> bytes of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    calls = []
    summary = synth.generate(out, n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=3,
                             progress=lambda done, total: calls.append((done, total)))
    return str(out), summary, calls


def test_class_names_are_sorted_so_keras_labels_match():
    # image_dataset_from_directory numbers classes by sorted folder name.
    assert len(synth.CLASS_NAMES) == 10 == len(set(synth.CLASS_NAMES))
    assert synth.CLASS_NAMES == sorted(synth.CLASS_NAMES)


def test_layout_counts_and_summary(small):
    out, summary, calls = small
    assert summary["out_dir"] == out
    assert (summary["n_train"], summary["n_val"]) == (N_TRAIN, N_VAL)
    assert summary["classes"] == synth.CLASS_NAMES and summary["seconds"] >= 0
    for split, n in (("training", N_TRAIN), ("validation", N_VAL)):
        assert sorted(os.listdir(os.path.join(out, split))) == synth.CLASS_NAMES
        for name in synth.CLASS_NAMES:
            jpgs = sorted(os.listdir(os.path.join(out, split, name)))
            pngs = sorted(os.listdir(os.path.join(out, "masks", split, name)))
            assert len(jpgs) == n // 10 and all(f.endswith(".jpg") and len(f) == 10 for f in jpgs)
            assert pngs == [f[:-4] + ".png" for f in jpgs]
    meta = json.load(open(os.path.join(out, "dataset.json")))
    assert meta["generator"] == "explicam synth"
    assert (meta["seed"], meta["size"], meta["n_train"], meta["n_val"]) == (3, SIZE, N_TRAIN, N_VAL)
    assert meta["class_names"] == synth.CLASS_NAMES and meta["habitat_bias"] == 0.0
    assert meta["counts"]["training"] == {c: 4 for c in synth.CLASS_NAMES}
    assert len(meta["images"]) == N_TRAIN + N_VAL
    assert calls[-1] == (60, 60) and [d for d, _ in calls] == list(range(1, 61))
    assert not os.path.exists(out + ".partial")


def test_uneven_split_gives_remainder_to_first_classes(tmp_path):
    synth.generate(tmp_path / "d", n_train=13, n_val=5, size=32, num_classes=4)
    count = [len(os.listdir(tmp_path / "d" / "training" / c)) for c in synth.CLASS_NAMES[:4]]
    assert count == [4, 3, 3, 3]
    count = [len(os.listdir(tmp_path / "d" / "validation" / c)) for c in synth.CLASS_NAMES[:4]]
    assert count == [2, 1, 1, 1]
    assert sorted(os.listdir(tmp_path / "d" / "training")) == synth.CLASS_NAMES[:4]


def test_masks_are_binary_and_object_sized(small):
    out, _, _ = small
    for rec in json.load(open(os.path.join(out, "dataset.json")))["images"]:
        img = _load(out, rec["file"])
        mask = _load(out, rec["mask"], cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2 and mask.dtype == np.uint8
        assert mask.shape == img.shape[:2] == (SIZE, SIZE)
        assert set(np.unique(mask)) == {0, 255}
        ys, xs = np.nonzero(mask)
        extent = max(np.ptp(xs), np.ptp(ys)) + 1
        assert 0.10 * SIZE <= extent <= 0.50 * SIZE, (rec["file"], extent)
        assert rec["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_mask_marks_the_visible_object(small):
    # Mean colour inside the mask must differ from a ring just outside it; a mask
    # that was misplaced would straddle the object and blur that difference.
    out, _, _ = small
    gaps, shifted_gaps = [], []
    for rec in json.load(open(os.path.join(out, "dataset.json")))["images"]:
        img = _load(out, rec["file"]).astype(np.float64)
        mask = _load(out, rec["mask"], cv2.IMREAD_GRAYSCALE) > 0
        for m, acc in ((mask, gaps), (np.roll(mask, (5, 5), (0, 1)), shifted_gaps)):
            ring = (cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0) & ~m
            acc.append(np.linalg.norm(img[m].mean(0) - img[ring].mean(0)))
    assert min(gaps) > 20 and np.median(gaps) > 50
    assert np.median(shifted_gaps) < np.median(gaps)


def test_saved_colours_are_rgb_not_bgr(tmp_path):
    # Class 0 (arrow) is red: read back as RGB, red must dominate inside the mask.
    synth.generate(tmp_path / "d", n_train=4, n_val=2, size=64, num_classes=2)
    for name in os.listdir(tmp_path / "d" / "training" / "arrow"):
        bgr = cv2.imread(str(tmp_path / "d" / "training" / "arrow" / name))
        mask = cv2.imread(str(tmp_path / "d" / "masks" / "training" / "arrow" /
                              name.replace(".jpg", ".png")), cv2.IMREAD_GRAYSCALE) > 0
        b, g, r = bgr[mask].mean(0)
        assert r > b + 40 and r > g + 40


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(n_train=20, n_val=10, size=48)
    synth.generate(tmp_path / "a", seed=7, **kw)
    synth.generate(tmp_path / "b", seed=7, **kw)
    synth.generate(tmp_path / "c", seed=8, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != c[k] for k in jpgs) == len(jpgs)


def test_habitat_bias_ties_background_to_class(tmp_path):
    kw = dict(n_train=40, n_val=20, size=32)
    synth.generate(tmp_path / "tied", habitat_bias=1.0, **kw)
    synth.generate(tmp_path / "free", habitat_bias=0.0, **kw)
    tied = json.load(open(tmp_path / "tied" / "dataset.json"))
    free = json.load(open(tmp_path / "free" / "dataset.json"))
    assert tied["habitat_bias"] == 1.0
    assert all(r["background_style"] == r["label"] for r in tied["images"])
    styles = [r["background_style"] for r in free["images"]]
    assert sum(s == r["label"] for s, r in zip(styles, free["images"])) < len(styles) / 2
    assert len(set(styles)) >= 6 and all(0 <= s < 10 for s in styles)


def test_existing_output_folder(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        synth.generate(out, n_train=10, n_val=10, size=32)
    assert (out / "old.txt").exists()
    synth.generate(out, n_train=10, n_val=10, size=32, force=True)
    assert not (out / "old.txt").exists() and (out / "dataset.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    synth.generate(empty, n_train=10, n_val=10, size=32)  # an empty folder is fine
    assert (empty / "dataset.json").exists()


def test_failure_leaves_no_partial_folder(tmp_path):
    def boom(done, total):
        if done == 5:
            raise RuntimeError("stop")
    with pytest.raises(RuntimeError):
        synth.generate(tmp_path / "d", n_train=10, n_val=10, size=32, progress=boom)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs, word", [
    (dict(habitat_bias=1.5), "habitat_bias"),
    (dict(habitat_bias=-0.1), "habitat_bias"),
    (dict(num_classes=1), "num_classes"),
    (dict(num_classes=11), "num_classes"),
    (dict(n_train=5), "n_train"),
    (dict(n_val=2.5), "n_val"),
    (dict(size=8), "size"),
    (dict(seed=-1), "seed"),
    (dict(quality=0), "quality"),
    (dict(progress="yes"), "progress"),
])
def test_bad_arguments(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        synth.generate(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_classes_carry_signal_without_deep_learning(tmp_path):
    # Nearest class mean on a hue histogram of saturated pixels, whole image, no mask.
    synth.generate(tmp_path / "d", n_train=100, n_val=50, size=64, seed=11)
    meta = json.load(open(tmp_path / "d" / "dataset.json"))
    feats = {"training": ([], []), "validation": ([], [])}
    for rec in meta["images"]:
        hsv = cv2.cvtColor(_load(tmp_path / "d", rec["file"]), cv2.COLOR_BGR2HSV)
        hue = hsv[..., 0][hsv[..., 1] > 150]
        hist = np.bincount(hue // 10, minlength=18)[:18].astype(np.float64)
        feats[rec["split"]][0].append(hist / max(1.0, hist.sum()))
        feats[rec["split"]][1].append(rec["label"])
    x, y = (np.array(a) for a in feats["training"])
    xv, yv = (np.array(a) for a in feats["validation"])
    centroids = np.stack([x[y == c].mean(0) for c in range(10)])
    pred = np.argmin(((xv[:, None] - centroids) ** 2).sum(-1), axis=1)
    assert (pred == yv).mean() >= 0.6


def test_force_never_deletes_a_folder_holding_the_current_one(tmp_path, monkeypatch):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "d" / "sub")
    with pytest.raises(ValueError, match="refusing"):
        synth.generate(tmp_path / "d", n_train=10, n_val=10, size=32, force=True)
    assert (tmp_path / "d" / "sub").is_dir()
