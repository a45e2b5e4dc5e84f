"""What an evaluation runs on: the validation split, its object masks or boxes.

Masks: the built-in dataset writes DIR/masks/<split>/<class>/<stem>.png (255 = object);
a user dataset may pass --masks ROOT with the same layout. Boxes: a CSV with a header
`image,x_min,y_min,x_max,y_max` in the image's own pixel coordinates (several rows per
image are united); `image` is the path relative to the data folder, to the validation
folder, or the bare file name when that is unique. Everything is brought to the model's
input size S the way the model sees the photo (the whole photo squeezed to S x S).
"""
from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from explicam.runtime.images import ImageError, read_image, resize_rgb
from explicam.train.data import find_dataset

BOX_COLUMNS = ("image", "x_min", "y_min", "x_max", "y_max")


@dataclass
class EvalSet:
    paths: list             # image files, in evaluation order
    images: np.ndarray      # (N, S, S, 3) uint8, resized as the model sees them
    labels: np.ndarray      # (N,) int64 dataset label
    masks: np.ndarray | None  # (N, S, S) bool object masks, or None when there are none
    mask_source: str        # "dataset masks", "--masks DIR", "--boxes CSV" or "none"
    skipped: list           # one-line messages for unreadable images
    class_names: list
    root: str
    val_folder: str | None


def balanced_order(labels: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Indices in round-robin over classes (the i-th image of every class before the
    (i+1)-th of any): any prefix is class-balanced, so --limit keeps the classes even."""
    labels = np.asarray(labels)
    seen: dict = {}
    keyed = []
    for idx, label in enumerate(labels.tolist()):
        seen[label] = seen.get(label, -1) + 1
        keyed.append((seen[label], label, idx))
    order = np.array([i for _, _, i in sorted(keyed)], np.int64)
    return order[:limit] if limit else order


def first_per_class(labels: np.ndarray) -> np.ndarray:
    """Position of the first image of each class in `labels` (class order)."""
    labels = np.asarray(labels)
    return np.array([int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)], np.int64)


def _read_mask(path: str, size) -> np.ndarray:
    m = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ImageError(f"{path}: not a readable mask image")
    h, w = (size, size) if np.ndim(size) == 0 else size
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return m > 127


def read_boxes(csv_path: str) -> dict:
    """{image key: [(x0, y0, x1, y1), ...]} from a boxes CSV (see the module docstring)."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"--boxes: no such file {csv_path}")
    boxes: dict = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"--boxes {csv_path}: missing column(s) {', '.join(missing)}; "
                             f"expected a header {','.join(BOX_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                box = tuple(float(row[c]) for c in BOX_COLUMNS[1:])
            except (TypeError, ValueError):
                raise ValueError(f"--boxes {csv_path} line {line}: coordinates must be numbers") from None
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"--boxes {csv_path} line {line}: need x_max > x_min and y_max > y_min")
            boxes.setdefault(row["image"].strip().replace("\\", "/"), []).append(box)
    return boxes


def _box_mask(boxes, orig_hw, size) -> np.ndarray:
    h, w = orig_hw
    sh, sw = (size, size) if np.ndim(size) == 0 else size
    m = np.zeros((sh, sw), bool)
    for x0, y0, x1, y1 in boxes:
        c0, c1 = int(np.floor(x0 * sw / w)), int(np.ceil(x1 * sw / w))
        r0, r1 = int(np.floor(y0 * sh / h)), int(np.ceil(y1 * sh / h))
        m[max(r0, 0):min(r1, sh), max(c0, 0):min(c1, sw)] = True
    return m


def _box_lookup(boxes: dict, path: str, root: str, val_folder: str | None):
    rel_root = os.path.relpath(path, root).replace(os.sep, "/")
    keys = [rel_root, os.path.basename(path)]
    if val_folder:
        keys.insert(1, os.path.relpath(path, val_folder).replace(os.sep, "/"))
    for key in keys:
        if key in boxes:
            return boxes[key]
    return None


def load_eval_set(data: str, size, limit: int | None = None, masks_dir: str | None = None,
                  boxes_csv: str | None = None, workers: int = 2, fit=None) -> EvalSet:
    """The validation split (class-balanced prefix of `limit` images), resized to `size`,
    with object masks from the dataset, --masks or --boxes when there are any.
    size: S for a square input squeezed whole; otherwise pass `fit` (OnnxModel.fit: the
    model's own resize, non-square or shorter-side crop): masks are then made at the
    photo's resolution and fitted like the photo, so a mask stays on its object."""
    if masks_dir and boxes_csv:
        raise ValueError("give either --masks or --boxes, not both")
    if masks_dir and not os.path.isdir(masks_dir):
        raise FileNotFoundError(f"--masks: no such folder {masks_dir}")
    ds = find_dataset(data)
    order = balanced_order(ds.val.labels, limit)
    paths = [ds.val.paths[i] for i in order]
    boxes = read_boxes(boxes_csv) if boxes_csv else None
    val_folder = ds.split_dirs.get("validation")

    def load(path):
        try:
            img = read_image(path, min_side=size if fit is None else 0)
        except ImageError as exc:
            return None, None, str(exc)
        at = size if fit is None else img.shape[:2]  # the mask's resolution before fitting
        mask = None
        if boxes is not None:
            found = _box_lookup(boxes, path, ds.root, val_folder)
            mask = _box_mask(found, img.shape[:2], at) if found else None
        else:
            mpath = ds.mask_path(path, masks_dir)
            mask = _read_mask(mpath, at) if mpath else None
        if fit is None:
            return resize_rgb(img, size), mask, None
        fitted = None if mask is None else fit(np.repeat(mask[..., None] * np.uint8(255), 3, axis=2))[..., 0] > 127
        return fit(img), fitted, None

    with ThreadPoolExecutor(workers) as pool:
        loaded = list(pool.map(load, paths))
    keep = [i for i, (img, _, err) in enumerate(loaded) if err is None]
    skipped = [err for _, _, err in loaded if err]
    if not keep:
        raise ValueError(f"no readable validation images in {data}")
    images = np.stack([loaded[i][0] for i in keep])
    masks = None
    if any(loaded[i][1] is not None for i in keep):
        masks = np.stack([loaded[i][1] if loaded[i][1] is not None else np.zeros(images.shape[1:3], bool)
                          for i in keep])
    source = "none" if masks is None else ("--boxes CSV" if boxes is not None else
                                           "--masks DIR" if masks_dir else "dataset masks")
    return EvalSet([paths[i] for i in keep], images, ds.val.labels[order][keep].astype(np.int64), masks, source,
                   skipped, list(ds.class_names), ds.root, val_folder)


def habitat_groups(eval_set: EvalSet) -> dict | None:
    """For the built-in dataset made with --habitat-bias: which images have the background
    style tied to their class (the spurious cue). {"bias": p, "tied": bool (N,)} or None."""
    path = os.path.join(eval_set.root, "dataset.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    bias = float(meta.get("habitat_bias") or 0.0)
    if bias <= 0:
        return None
    style = {os.path.normpath(os.path.join(eval_set.root, r["file"])): (r.get("background_style"), r.get("label"))
             for r in meta.get("images", [])}
    tied = np.array([style.get(os.path.normpath(p), (None, -1))[0] == style.get(os.path.normpath(p), (None, -1))[1]
                     for p in eval_set.paths])
    return {"bias": bias, "tied": tied}
