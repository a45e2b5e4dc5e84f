"""The built-in dataset's counterfactual validation sets and its colour cue (train/synth.py):
the same objects on other backgrounds, or removed; colour drawn apart from the class."""
import json
import os

import cv2
import numpy as np
import pytest

from explicam.train import synth

SIZE = 48


def _read(root, rel, flags=cv2.IMREAD_COLOR):
    img = cv2.imread(os.path.join(root, rel), flags)
    assert img is not None, rel
    return img


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    out = tmp_path_factory.mktemp("cf") / "data"
    synth.generate(out, n_train=8, n_val=12, size=SIZE, num_classes=4, habitat_bias=1.0, seed=2)
    return str(out), json.load(open(out / "dataset.json"))


def test_three_sets_mirror_the_validation_split(biased):
    root, meta = biased
    val = sorted(r["file"].split("/", 1)[1] for r in meta["images"] if r["split"] == "validation")
    assert meta["counterfactual"]["sets"] == ["neutral", "swapped", "background-only"]
    for which in synth.COUNTERFACTUAL_SETS:
        files = sorted(os.path.relpath(os.path.join(d, f), os.path.join(root, "counterfactual", which))
                       for d, _, fs in os.walk(os.path.join(root, "counterfactual", which)) for f in fs)
        assert files == val, which
    # the commands that read training/ and validation/ see the same dataset as before
    from explicam.train.data import find_dataset
    ds = find_dataset(root)
    assert len(ds.train.paths) == 8 and len(ds.val.paths) == 12 and ds.class_dirs == synth.CLASS_NAMES[:4]


def test_objects_stay_where_they_were_backgrounds_change(biased):
    root, meta = biased
    recs = {(r["set"], r["source"]): r for r in meta["counterfactual"]["images"]}
    for v in (r for r in meta["images"] if r["split"] == "validation"):
        img, mask = _read(root, v["file"]).astype(float), _read(root, v["mask"], cv2.IMREAD_GRAYSCALE) > 0
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # JPEG blurs the outline
        outer = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
        for which in ("neutral", "swapped"):
            r = recs[(which, v["file"])]
            cf = _read(root, r["file"]).astype(float)
            cf_mask = _read(root, r["mask"], cv2.IMREAD_GRAYSCALE) > 0
            assert np.array_equal(cf_mask, mask), (which, v["file"])  # the very object, in the very place
            assert r["bbox"] == v["bbox"] and r["object"] and r["label"] == v["label"]
            assert np.abs(cf[inner] - img[inner]).mean() < 8, which  # same pixels, up to JPEG
            assert np.abs(cf[outer] - img[outer]).mean() > 10, which  # another background
        assert recs[("neutral", v["file"])]["background_style"] == synth.NEUTRAL_INDEX
        swapped = recs[("swapped", v["file"])]
        assert swapped["habitat_class"] != v["label"] and 0 <= swapped["habitat_class"] < 4
        assert v["background_style"] == v["label"]  # bias 1: every validation image sits in its habitat


def test_background_only_removes_the_object_and_keeps_the_habitat(biased):
    root, meta = biased
    recs = {r["source"]: r for r in meta["counterfactual"]["images"] if r["set"] == "background-only"}
    for v in (r for r in meta["images"] if r["split"] == "validation"):
        r = recs[v["file"]]
        img, mask = _read(root, v["file"]).astype(float), _read(root, v["mask"], cv2.IMREAD_GRAYSCALE) > 0
        bg = _read(root, r["file"]).astype(float)
        assert not _read(root, r["mask"], cv2.IMREAD_GRAYSCALE).any() and not r["object"]  # absent
        outer = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
        assert np.abs(bg[outer] - img[outer]).mean() < 6  # the habitat kept
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert np.abs(bg[inner] - img[inner]).mean() > 20  # where the object was, it is gone
        assert r["background_style"] == v["background_style"] and r["habitat_class"] == v["label"]


def test_counterfactuals_only_when_asked(tmp_path):
    synth.generate(tmp_path / "plain", n_train=4, n_val=4, size=32, num_classes=2)
    assert not (tmp_path / "plain" / "counterfactual").exists()
    assert "counterfactual" not in json.load(open(tmp_path / "plain" / "dataset.json"))
    info = synth.generate(tmp_path / "asked", n_train=4, n_val=4, size=32, num_classes=2, counterfactuals=True)
    assert info["counterfactual"] == list(synth.COUNTERFACTUAL_SETS)
    assert len(os.listdir(tmp_path / "asked" / "counterfactual" / "swapped" / "arrow")) == 2


def _hues(root, meta, split="validation"):
    out = []
    for r in meta["images"]:
        if r["split"] == split:
            hsv = cv2.cvtColor(_read(root, r["file"]), cv2.COLOR_BGR2HSV)
            m = _read(root, r["mask"], cv2.IMREAD_GRAYSCALE) > 0
            out.append((r["label"], float(np.median(hsv[..., 0][m])) * 2))  # OpenCV hue is degrees / 2
    return out


def test_colour_cue_zero_frees_the_colour_and_keeps_the_pose(tmp_path):
    kw = dict(n_train=10, n_val=60, size=48, num_classes=3, seed=9)
    synth.generate(tmp_path / "default", **kw)
    synth.generate(tmp_path / "one", colour_cue=1.0, **kw)
    synth.generate(tmp_path / "zero", colour_cue=0.0, **kw)
    # the default draws today's dataset, byte for byte (colour_cue 1 draws nothing extra)
    a, b = (open(tmp_path / d / "validation" / "arrow" / "000000.jpg", "rb").read() for d in ("default", "one"))
    assert a == b
    metas = {d: json.load(open(tmp_path / d / "dataset.json")) for d in ("one", "zero")}
    assert metas["zero"]["colour_cue"] == 0.0
    for r1, r0 in zip(metas["one"]["images"], metas["zero"]["images"]):
        assert r1["bbox"] == r0["bbox"] and r1["background_style"] == r0["background_style"]
        m1 = _read(tmp_path / "one", r1["mask"], cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(m1, _read(tmp_path / "zero", r0["mask"], cv2.IMREAD_GRAYSCALE))
    # with the cue every class keeps to its own hue; without it hues spread round the wheel
    # (circular concentration |mean exp(i hue)|: 1 for one hue, about 1/sqrt(n) for random ones)
    for d, lo, hi in (("one", 0.9, 1.0), ("zero", 0.0, 0.6)):
        per_class = {}
        for label, hue in _hues(tmp_path / d, metas[d]):
            per_class.setdefault(label, []).append(np.radians(hue))
        conc = [abs(np.exp(1j * np.array(h)).mean()) for h in per_class.values()]
        assert all(lo <= c <= hi for c in conc), (d, conc)
