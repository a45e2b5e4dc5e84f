"""Dataset folders: both layouts, the validation split, bad data and image conversions."""
import numpy as np
import pytest
from PIL import Image

from explicam.runtime.images import ImageError, read_image
from explicam.train.data import DataError, find_dataset, load_images
from tests.conftest import cli_in_process


def _jpg(path, colour=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = colour
    Image.fromarray(img).save(path)
    return path


def _keras_layout(root, classes=("cat", "dog", "owl"), n=3):
    for split in ("training", "validation"):
        for ci, cls in enumerate(classes):
            for i in range(n):
                _jpg(root / split / cls / f"{i}.jpg", colour=(60 * ci, 100, 30))
    return root


def test_keras_layout(tmp_path):
    ds = find_dataset(_keras_layout(tmp_path))
    assert ds.layout == "keras" and ds.class_names == ["cat", "dog", "owl"]
    assert len(ds.train.paths) == 9 and len(ds.val.paths) == 9
    assert list(ds.train.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_kaggle_monkey_layout_uses_common_names(tmp_path):
    for split in ("training", "validation"):
        for cls in ("n0", "n1", "n2"):
            _jpg(tmp_path / split / split / cls / "a.jpg")
            _jpg(tmp_path / split / split / cls / "b.jpg")
    (tmp_path / "monkey_labels.txt").write_text(
        "Label,  Latin Name           , Common Name                   , Train Images , Validation Images\n"
        "n0   , alouatta_palliata\t , mantled_howler                , 131          , 26\n"
        "n1   , erythrocebus_patas\t , patas_monkey                  , 139          , 28\n"
        "n2   , cacajao_calvus\t , bald_uakari                   , 137          , 27\n")
    ds = find_dataset(tmp_path)
    assert ds.layout == "monkeys"
    assert ds.class_dirs == ["n0", "n1", "n2"]
    assert ds.class_names == ["mantled_howler", "patas_monkey", "bald_uakari"]
    assert len(ds.train.paths) == 6 and all("/training/training/" in p for p in ds.train.paths)


def test_single_folder_takes_a_stratified_validation_split(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            _jpg(tmp_path / cls / f"{i}.jpg")
    ds = find_dataset(tmp_path, val_split=0.3, seed=0)
    assert ds.layout == "single"
    assert np.bincount(ds.val.labels).tolist() == [3, 3]
    assert not set(ds.train.paths) & set(ds.val.paths)
    assert find_dataset(tmp_path, val_split=0.3, seed=0).val.paths == ds.val.paths  # deterministic


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "data folder not found"),
    (lambda root: (root / "training").mkdir(parents=True), "no class folders"),
    (lambda root: (_jpg(root / "training" / "a" / "1.jpg"), (root / "training" / "b").mkdir()), "class 'b' has no images"),
    (lambda root: _jpg(root / "training" / "only" / "1.jpg"), "at least two classes"),
])
def test_bad_dataset_folders_get_clear_messages(tmp_path, setup, message):
    root = tmp_path / "data"
    if message != "data folder not found":
        root.mkdir()
    setup(root)
    with pytest.raises(DataError, match=message):
        find_dataset(root)


def test_cli_bad_data_is_one_line_without_traceback(tmp_path):
    res = cli_in_process("train", "--data", tmp_path / "nope", "--image-size", 64)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "data folder not found" in res.stderr


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    _keras_layout(tmp_path)
    cls = tmp_path / "training" / "cat"
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "text.jpg").write_text("this is not an image")
    good = (cls / "0.jpg").read_bytes()
    (cls / "truncated.jpg").write_bytes(good[: len(good) // 2])
    ds = find_dataset(tmp_path)
    x, y, skipped = load_images(ds.train, 32)
    assert len(x) == 9 and x.shape == (9, 32, 32, 3) and x.dtype == np.uint8
    assert len(skipped) == 3
    assert any("empty.jpg" in s for s in skipped) and any("truncated.jpg" in s for s in skipped)
    assert any("text.jpg" in s for s in skipped)


def test_odd_image_formats_are_converted_to_rgb(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (255, 0, 0)
    rgb[:, 15:] = (0, 0, 255)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "palette.png")
    import cv2
    cv2.imwrite(str(tmp_path / "deep.png"), (rgb[..., ::-1].astype(np.uint16) * 257))
    for name in ("cmyk.jpg", "rgba.png", "palette.png", "deep.png"):
        img = read_image(tmp_path / name)
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8, name
        assert img[10, 5, 0] > 200 and img[10, 5, 2] < 60, name    # left half red
        assert img[10, 25, 2] > 200 and img[10, 25, 0] < 60, name  # right half blue
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == (20, 30, 3) and (gray[..., 0] == gray[..., 1]).all()


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="zero.jpg: empty file"):
        read_image(tmp_path / "zero.jpg")
