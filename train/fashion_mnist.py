"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) as an explicam dataset folder.

Debian's package `dataset-fashion-mnist` installs Zalando's four files, gzipped idx
(the MNIST format: a big-endian header, magic 0x0000 0803 for images / 0801 for labels,
then one int32 per dimension, then the bytes), under /usr/share/datasets/fashion-mnist/:
train-images-idx3-ubyte.gz (60,000 28x28 grey images), train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz (10,000), t10k-labels-idx1-ubyte.gz. The converter writes
the layout every command reads:

    OUT/training/<class>/00012.png     the 60,000 training images (or the first N per class)
    OUT/validation/<class>/00045.png   the 10,000 test images (Zalando's test split)
    OUT/masks/<split>/<class>/*.png    the garment: pixels above 10/255 with holes filled
    OUT/dataset.json                   source, size, class names (the dataset's own), counts

Images are resized to --size (a multiple of 32 for the seed network) and written as RGB
(the grey copied to three channels), as the loaders feed the network. The objects lie on
a black field, so the mask is the object itself and the report can score how much of a
heatmap falls on the garment, as on the built-in dataset.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from dataclasses import dataclass

import cv2
import numpy as np

from explicam.train.dataset_files import prepare_target, publish, remove_path, write_rgb

SOURCE = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = ("Fashion-MNIST is not installed: run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
                f"files under {SOURCE}/) or pass --source DIR holding Zalando's four *-idx*-ubyte(.gz) files")
# Labels 0..9 as in the dataset's README ("Labels" table).
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
FILES = {"training": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "validation": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MASK_THRESHOLD = 10
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class SourceMissing(FileNotFoundError):
    """The dataset's files are not there; str() says how to get them."""


@dataclass
class FashionConfig:
    out: str
    size: int = 32
    limit: int | None = None       # training images per class (the first ones in file order)
    val_limit: int | None = None   # validation images per class [default: limit / 6, the dataset's ratio]
    source: str = SOURCE
    masks: bool = True
    force: bool = False


def folder_name(name: str) -> str:
    """'T-shirt/top' -> 'T-shirt_top', 'Ankle boot' -> 'Ankle_boot' (a folder cannot hold '/')."""
    return name.replace("/", "_").replace(" ", "_")


def read_idx(path: str) -> np.ndarray:
    """An idx file (gzipped or not) as an array of its own shape and type."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[data[2]])
    count, offset = int(np.prod(dims)), 4 + 4 * ndim
    if len(data) < offset + count * dtype.itemsize:
        raise ValueError(f"{path}: truncated ({len(data)} bytes for shape {dims})")
    return np.frombuffer(data, dtype, count, offset).reshape(dims)


def find_file(source: str, base: str) -> str:
    for name in (base + ".gz", base):
        path = os.path.join(source, name)
        if os.path.isfile(path):
            return path
    raise SourceMissing(INSTALL_HINT if source == SOURCE else f"{source}: no {base}.gz or {base}; " + INSTALL_HINT)


def pick_per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first `limit` images of every class, in file order (all when None)."""
    if limit is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:limit] for c in np.unique(labels)])
    return np.sort(keep)


def object_mask(grey: np.ndarray) -> np.ndarray:
    """The garment: pixels above MASK_THRESHOLD, the holes inside its outline filled (uint8 0/255)."""
    mask = np.zeros_like(grey, np.uint8)
    contours, _ = cv2.findContours((grey > MASK_THRESHOLD).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(mask, contours, -1, 255, -1)
    return mask


def _resize(grey: np.ndarray, size: int) -> np.ndarray:
    if grey.shape == (size, size):
        return grey
    shrink = size < grey.shape[0]
    return cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _check(cfg: FashionConfig) -> None:
    if not isinstance(cfg.size, int) or cfg.size < 8 or cfg.size > 1024:
        raise ValueError(f"--size must be an integer in [8, 1024], got {cfg.size!r}")
    for name, v in (("--limit", cfg.limit), ("--val-limit", cfg.val_limit)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be at least 1, got {v}")


def _write_split(root, split, picked, cfg: FashionConfig, tick) -> dict:
    """Images and masks of one split, named by their index in the idx file."""
    images, labels, index = picked
    counts = {}
    for c, name in enumerate(CLASS_NAMES):
        os.makedirs(os.path.join(root, split, folder_name(name)))
        if cfg.masks:
            os.makedirs(os.path.join(root, "masks", split, folder_name(name)))
    for i, grey, label in zip(index, images, labels):
        folder = folder_name(CLASS_NAMES[int(label)])
        small = _resize(np.ascontiguousarray(grey), cfg.size)
        rel = f"{folder}/{i:05d}.png"
        write_rgb(root, f"{split}/{rel}", np.repeat(small[..., None], 3, axis=2))
        if cfg.masks:
            write_rgb(root, f"masks/{split}/{rel}", object_mask(small))
        counts[folder] = counts.get(folder, 0) + 1
        tick()
    return counts


def load_split(source: str, split: str, limit: int | None):
    """(images (N, 28, 28) uint8, labels (N,), index in the file) of one split, the first `limit` per class."""
    images = read_idx(find_file(source, FILES[split][0]))
    labels = read_idx(find_file(source, FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{source}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"{source}: {split} labels outside 0..{len(CLASS_NAMES) - 1}")
    keep = pick_per_class(labels, limit)
    return images[keep], labels[keep], keep


def convert(cfg: FashionConfig, progress=None) -> dict:
    """Write the dataset folder (see the module docstring); returns counts and seconds."""
    _check(cfg)
    start = time.perf_counter()
    val_limit = cfg.val_limit if cfg.val_limit is not None else (
        None if cfg.limit is None else max(1, cfg.limit // 6))
    splits = {"training": load_split(cfg.source, "training", cfg.limit),
              "validation": load_split(cfg.source, "validation", val_limit)}
    missing = [f"{s}: {CLASS_NAMES[c]}" for s, (_, y, _) in splits.items() for c in range(10) if not (y == c).any()]
    if missing:
        raise ValueError(f"{cfg.source}: no images of {', '.join(missing)}; every class needs some in both splits")
    out = os.path.abspath(cfg.out)
    prepare_target(out, cfg.force)
    partial = out + ".partial"
    remove_path(partial)
    total, done = sum(len(p[1]) for p in splits.values()), 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
    try:
        counts = {s: _write_split(partial, s, picked, cfg, tick) for s, picked in splits.items()}
        meta = {"generator": "explicam fashion-mnist", "source": os.path.abspath(cfg.source), "size": cfg.size,
                "class_names": CLASS_NAMES, "class_folders": [folder_name(n) for n in CLASS_NAMES],
                "limit_per_class": {"training": cfg.limit, "validation": val_limit}, "counts": counts,
                "masks": f"pixels above {MASK_THRESHOLD}/255, holes filled" if cfg.masks else None,
                "citation": "Xiao, Rasul, Vollgraf, Fashion-MNIST: a Novel Image Dataset for Benchmarking "
                            "Machine Learning Algorithms, arXiv:1708.07747, 2017"}
        with open(os.path.join(partial, "dataset.json"), "w") as f:
            json.dump(meta, f, indent=1)
        publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"out_dir": out, "n_train": len(splits["training"][1]), "n_val": len(splits["validation"][1]),
            "seconds": round(time.perf_counter() - start, 2)}
