"""`dataset fashion-mnist` on a few records the test writes in the idx format (gzipped, as
Debian's package ships them, and plain)."""
import gzip
import json
import os

import cv2
import numpy as np
import pytest

from explicam.train import fashion_mnist as fm
from tests.conftest import run_cli


def _idx(path, array, gz=True):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.tobytes())


def _records(n_per_class, seed):
    """Bright squares of a class-dependent size on black, labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10), n_per_class)
    images = np.zeros((len(labels), 28, 28), np.uint8)
    for i, c in enumerate(labels):
        half = 3 + int(c)  # class c: a square of side 2 * (3 + c)
        images[i, 14 - half:14 + half, 14 - half:14 + half] = rng.integers(120, 255)
    return images, labels


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("fmnist")
    for split, n, seed, gz in (("train", 4, 0, True), ("t10k", 2, 1, False)):
        images, labels = _records(n, seed)
        _idx(src / f"{split}-images-idx3-ubyte{'.gz' if gz else ''}", images, gz)
        _idx(src / f"{split}-labels-idx1-ubyte{'.gz' if gz else ''}", labels, gz)
    return src


def test_read_idx_round_trip(source):
    images = fm.read_idx(str(source / "train-images-idx3-ubyte.gz"))
    labels = fm.read_idx(str(source / "t10k-labels-idx1-ubyte"))
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == list(range(10)) * 2


def test_converts_to_the_folder_layout(source, tmp_path):
    out = tmp_path / "fm"
    info = fm.convert(fm.FashionConfig(out=str(out), size=32, limit=3, source=str(source)))
    assert (info["n_train"], info["n_val"]) == (30, 10)  # --limit 3 per class; validation 3 // 6 -> 1
    folders = sorted(fm.folder_name(n) for n in fm.CLASS_NAMES)
    assert sorted(os.listdir(out / "training")) == sorted(os.listdir(out / "validation")) == folders
    assert "T-shirt_top" in folders and "Ankle_boot" in folders
    meta = json.load(open(out / "dataset.json"))
    assert meta["class_names"][0] == "T-shirt/top" and meta["class_names"][9] == "Ankle boot"
    # file names keep the record's index in the idx file: the first three of each class
    assert sorted(os.listdir(out / "training" / "Trouser")) == ["00001.png", "00011.png", "00021.png"]
    img = cv2.imread(str(out / "training" / "Ankle_boot" / "00009.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (32, 32, 3) and np.array_equal(img[..., 0], img[..., 2])  # grey copied to RGB
    mask = cv2.imread(str(out / "masks" / "training" / "Ankle_boot" / "00009.png"), cv2.IMREAD_GRAYSCALE)
    side = 2 * (3 + 9) * 32 / 28  # the class-9 square, resized
    assert abs(np.sqrt((mask > 0).sum()) - side) < 2.5 and mask[0, 0] == 0
    from explicam.train.data import find_dataset
    ds = find_dataset(out)  # what train / evaluate / sweep read
    assert len(ds.train.paths) == 30 and len(ds.val.paths) == 10 and ds.mask_path(ds.val.paths[0])


def test_missing_package_says_how_to_get_it(tmp_path):
    res = run_cli("dataset", "fashion-mnist", "--out", tmp_path / "x", "--source", tmp_path / "nothing")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    line = [ln for ln in res.stderr.splitlines() if ln.strip()][-1]
    assert "apt-get install dataset-fashion-mnist" in line
    assert not (tmp_path / "x").exists()


def test_bad_file_is_one_clear_error(source, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(source):
        (bad / name).write_bytes((source / name).read_bytes())
    (bad / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        fm.convert(fm.FashionConfig(out=str(tmp_path / "o"), source=str(bad)))
