"""Dataset folders: finding the splits and classes, reading the images, feeding Keras.

Two layouts are read unchanged:
  Keras' image_dataset_from_directory convention: DIR/training/<class>/*.jpg and
  DIR/validation/<class>/*.jpg (or DIR/<class>/*.jpg with --val-split);
  Kaggle's "10 Monkey Species" (the seed study's data): DIR/training/training/n0..n9,
  DIR/validation/validation/n0..n9 and DIR/monkey_labels.txt, whose common names
  become the class names.
Discovery and reading need no TensorFlow (the evaluation reuses them on the edge
runtime); only `make_tf_dataset` imports it.
"""
from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from explicam.runtime.images import ImageError, list_images, read_image, resize_rgb

TRAIN_NAMES = ("training", "train")
VAL_NAMES = ("validation", "val")


class DataError(ValueError):
    """Bad dataset folder; str() is a one-line message for the user."""


@dataclass
class Split:
    paths: list[str]
    labels: np.ndarray  # int32 class index per path


@dataclass
class Dataset:
    root: str
    class_names: list[str]      # what users read (monkey common names when known)
    class_dirs: list[str]       # folder names, in label order
    train: Split
    val: Split
    layout: str                 # "keras", "monkeys" or "single"
    split_dirs: dict = field(default_factory=dict)  # "training"/"validation" -> folder

    def mask_path(self, image_path: str, masks_root: str | None = None) -> str | None:
        """Ground-truth mask for an image (the built-in dataset writes DIR/masks/<split>/<class>/<stem>.png)."""
        masks_root = masks_root or os.path.join(self.root, "masks")
        for split, folder in self.split_dirs.items():
            rel = os.path.relpath(image_path, folder)
            if not rel.startswith(".."):
                stem = os.path.splitext(rel)[0]
                path = os.path.join(masks_root, split, stem + ".png")
                return path if os.path.exists(path) else None
        return None


def _subdir(root: str, names) -> str | None:
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            # Kaggle nests each split in a folder of the same name: training/training/n0.
            nested = os.path.join(path, name)
            return nested if os.path.isdir(nested) else path
    return None


def _class_folders(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def _monkey_labels(root: str) -> dict[str, str]:
    """n0 -> mantled_howler, from Kaggle's monkey_labels.txt (comma-separated, padded)."""
    path = os.path.join(root, "monkey_labels.txt")
    if not os.path.isfile(path):
        return {}
    names = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.reader(f):
            cells = [c.strip() for c in row]
            if len(cells) >= 3 and cells[0] and cells[0].lower() != "label":
                names[cells[0]] = cells[2].replace(" ", "_")
    return names


def _scan(folder: str, class_dirs: list[str], split_name: str) -> Split:
    paths, labels = [], []
    for label, cls in enumerate(class_dirs):
        files = list_images(os.path.join(folder, cls))
        if not files:
            raise DataError(f"class '{cls}' has no images in {os.path.join(folder, cls)} ({split_name} split)")
        paths += files
        labels += [label] * len(files)
    return Split(paths, np.asarray(labels, np.int32))


def _split_off_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified, deterministic hold-out: the same files go to validation on every run."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--val-split must be between 0 and 1 (no validation folder found), got {fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        val_idx += idx[:n_val].tolist()
        train_idx += idx[n_val:].tolist()
    pick = lambda ids: Split([split.paths[i] for i in sorted(ids)], split.labels[sorted(ids)])  # noqa: E731
    return pick(train_idx), pick(val_idx)


def find_dataset(data_dir, val_split: float = 0.2, seed: int = 0) -> Dataset:
    """Find splits and classes under `data_dir`; raises DataError with a clear message."""
    root = os.path.abspath(os.fspath(data_dir))
    if not os.path.exists(root):
        raise DataError(f"data folder not found: {data_dir}")
    if not os.path.isdir(root):
        raise DataError(f"--data must be a folder of class subfolders, got a file: {data_dir}")
    train_dir, val_dir = _subdir(root, TRAIN_NAMES), _subdir(root, VAL_NAMES)
    layout = "keras"
    if train_dir is None:
        train_dir, layout = root, "single"
    class_dirs = _class_folders(train_dir)
    if not class_dirs:
        raise DataError(f"no class folders in {train_dir}: expected one subfolder of images per class")
    if len(class_dirs) < 2:
        raise DataError(f"need at least two classes, found 1 ('{class_dirs[0]}') in {train_dir}")
    labels = _monkey_labels(root)
    if labels and all(c in labels for c in class_dirs):
        layout = "monkeys"
    class_names = [labels.get(c, c) for c in class_dirs]

    train = _scan(train_dir, class_dirs, "training")
    if val_dir is not None:
        val_classes = _class_folders(val_dir)
        if val_classes != class_dirs:
            missing = sorted(set(class_dirs) ^ set(val_classes))
            raise DataError(f"validation classes in {val_dir} differ from training classes: {', '.join(missing)}")
        val = _scan(val_dir, class_dirs, "validation")
        split_dirs = {"training": train_dir, "validation": val_dir}
    else:
        train, val = _split_off_validation(train, val_split, seed)
        split_dirs = {"training": train_dir}
    return Dataset(root, class_names, class_dirs, train, val, layout, split_dirs)


def load_images(split: Split, size: int, progress=None, workers: int = 2):
    """Decode and resize every image of a split into memory.

    Returns (x uint8 (N, size, size, 3), y int32 (N,), skipped [one-line messages]).
    Unreadable or truncated files are skipped and reported, never fatal; grayscale,
    RGBA, 16-bit and CMYK files come out as 8-bit RGB (runtime/images.py).
    """
    def load(path):
        try:
            return resize_rgb(read_image(path, min_side=size), size), None
        except ImageError as exc:
            return None, str(exc)

    x = np.zeros((len(split.paths), size, size, 3), np.uint8)
    keep = np.zeros(len(split.paths), bool)
    skipped = []
    with ThreadPoolExecutor(workers) as pool:  # OpenCV releases the GIL while decoding
        for i, (img, err) in enumerate(pool.map(load, split.paths)):
            if err:
                skipped.append(err)
            else:
                x[i], keep[i] = img, True
            if progress:
                progress(1)
    return x[keep], split.labels[keep], skipped


def make_tf_dataset(x, y, batch_size: int, shuffle: bool, augment=None, seed=None):
    """A tf.data pipeline: uint8 -> float32 in [0, 1] (the value range the export records),
    shuffled and augmented on the training split only."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b), num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        ds = ds.map(lambda a, b: (augment(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_augmenter(flip=True, rotation=0.05, zoom=0.1, translation=0.1, contrast=0.1, seed=None):
    """The seed's data augmentation as Keras preprocessing layers; None when all are off."""
    import keras
    from keras import layers

    steps = []
    if flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if rotation:
        steps.append(layers.RandomRotation(rotation, fill_mode="reflect", seed=seed))
    if zoom:
        steps.append(layers.RandomZoom(zoom, fill_mode="reflect", seed=seed))
    if translation:
        steps.append(layers.RandomTranslation(translation, translation, fill_mode="reflect", seed=seed))
    if contrast:
        steps.append(layers.RandomContrast(contrast, value_range=(0, 1), seed=seed))
    return keras.Sequential(steps, name="augment") if steps else None
