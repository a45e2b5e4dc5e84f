"""Training data that streams from the files: tf.data, never the whole split in memory.

    files -> check (up front: unreadable files skipped and listed, nothing kept)
          -> tf.data: path -> OpenCV decode + resize (tf.numpy_function, parallel) -> uint8
          -> cache: in memory when the split fits the budget, else a file in the run folder
          -> shuffle -> batch -> float32 in [0, 1] -> augmentation (training only) -> prefetch

The decoder is the project's own (runtime/images.py), so training sees exactly the pixels
`explain` and `evaluate` see (EXIF rotation, CMYK, 16-bit, palette files alike). On this
machine it decodes as fast as tf.io.decode_image + tf.image.resize (both ~1700 images/s of
224 px JPEGs on 2 cores), so nothing is lost by keeping one decoder.

The decoded order is shuffled once (seeded), so a bounded shuffle buffer over a disk cache
still mixes the classes; in memory the buffer holds the whole split, as before. Memory then
grows with the cache budget, never with the dataset: a split over the budget costs its
shuffle buffer (SHUFFLE_BYTES) and prefetched batches, and the rest stays on disk.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from explicam.runtime.images import ImageError, read_image, resize_rgb
from explicam.train.data import Split

DEFAULT_BUDGET = 2 << 30      # bytes of decoded images kept in memory at most, unless RAM is smaller
SHUFFLE_BYTES = 128 << 20     # the shuffle buffer over a disk cache (~850 images at 224 px)
CACHE_MODES = ("auto", "memory", "disk")


@dataclass
class CachePlan:
    mode: str            # "memory" or "disk"
    path: str | None     # disk: the tf.data cache file prefix
    nbytes: int          # decoded size of the split
    budget: int

    def describe(self) -> str:
        size = f"{self.nbytes / 2**20:.0f} MB decoded"
        if self.mode == "memory":
            return f"cached in memory ({size}, budget {self.budget / 2**20:.0f} MB)"
        return f"cached on disk in {os.path.dirname(self.path)} ({size}, over the {self.budget / 2**20:.0f} MB budget)"


@dataclass
class PipelineSpec:
    """How one split becomes batches (train.fit makes one per split)."""
    size: int
    batch_size: int
    shuffle: bool = False
    augment: object = None       # a Keras layer applied to float batches, or None
    seed: int | None = None
    cache: CachePlan | None = None


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_budget() -> int:
    """2 GiB, or a quarter of the memory available now when that is less."""
    avail = available_memory()
    return min(DEFAULT_BUDGET, avail // 4) if avail else DEFAULT_BUDGET


def decoded_bytes(n_images: int, size: int) -> int:
    return int(n_images) * int(size) * int(size) * 3


def cache_key(paths, size: int) -> str:
    h = hashlib.sha1(str(size).encode())
    for p in paths:
        h.update(p.encode(errors="replace") + b"\0")
    return h.hexdigest()[:12]


def plan_cache(paths, size: int, cache_dir: str, name: str, mode: str = "auto",
               budget: int | None = None) -> CachePlan:
    """Memory when the decoded split fits `budget` (default: default_budget()), else a disk file
    cache_dir/<name>-<key> keyed by the ordered paths and the size (another order or size is
    another file)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    budget = default_budget() if budget is None else int(budget)
    nbytes = decoded_bytes(len(paths), size)
    if mode == "memory" or (mode == "auto" and nbytes <= budget):
        return CachePlan("memory", None, nbytes, budget)
    return CachePlan("disk", os.path.join(cache_dir, f"{name}-{cache_key(paths, size)}"), nbytes, budget)


def prepare_disk_cache(prefix: str) -> None:
    """Keep a finished cache (its .index file); remove what a killed run left half-written
    (tf.data refuses to start beside a stale lockfile). The run folder lock keeps others out."""
    folder, base = os.path.split(prefix)
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(prefix + ".index"):
        return
    for f in os.listdir(folder):
        if f.startswith(base):
            os.remove(os.path.join(folder, f))


def remove_caches(cache_dir: str) -> None:
    shutil.rmtree(cache_dir, ignore_errors=True)


def _check_one(path: str) -> str | None:
    try:
        read_image(path, min_side=1)  # JPEGs decode at 1/8 scale: every byte parsed, little work
        return None
    except ImageError as exc:
        return str(exc)


def check_images(split: Split, workers: int = 2, progress=None) -> tuple[Split, list]:
    """The readable part of a split and one message per unreadable file (empty, truncated,
    not an image): found up front, before any epoch, and nothing decoded is kept."""
    keep, skipped = [], []
    with ThreadPoolExecutor(workers) as pool:  # OpenCV releases the GIL while decoding
        for i, err in enumerate(pool.map(_check_one, split.paths, chunksize=64)):
            (skipped.append(err) if err else keep.append(i))
            if progress:
                progress(1)
    return Split([split.paths[i] for i in keep], split.labels[keep]), skipped


def shuffled_once(split: Split, seed: int | None) -> Split:
    """The split in one seeded random order (what the cache holds)."""
    order = np.random.default_rng(0 if seed is None else seed).permutation(len(split.paths))
    return Split([split.paths[i] for i in order], split.labels[order])


def _decoder(size: int):
    def load(path):
        path = path.decode() if isinstance(path, bytes) else str(path)
        return resize_rgb(read_image(path, min_side=size), size)
    return load


def stream_dataset(split: Split, spec: PipelineSpec):
    """A tf.data pipeline over the files of `split` (already checked) as `spec` says."""
    import tensorflow as tf

    size, load = spec.size, _decoder(spec.size)

    def decode(path, label):
        img = tf.numpy_function(load, [path], tf.uint8, stateful=False)
        img.set_shape((size, size, 3))
        return img, label

    ds = tf.data.Dataset.from_tensor_slices((list(split.paths), split.labels.astype(np.int32)))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    plan = spec.cache
    if plan is not None and plan.mode == "disk":
        prepare_disk_cache(plan.path)
        ds = ds.cache(plan.path)
    elif plan is not None:
        ds = ds.cache()
    if spec.shuffle:
        buffer = len(split.paths)
        if plan is not None and plan.mode == "disk":
            buffer = max(1, min(buffer, SHUFFLE_BYTES // decoded_bytes(1, size)))
        ds = ds.shuffle(buffer, seed=spec.seed, reshuffle_each_iteration=True)
    ds = ds.batch(spec.batch_size).map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b),
                                       num_parallel_calls=tf.data.AUTOTUNE)
    if spec.augment is not None:
        augment = spec.augment
        ds = ds.map(lambda a, b: (augment(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def training_streams(train: Split, val: Split, cfg, run_dir: str, augment, log=print):
    """(training, validation) pipelines for a run of `cfg` (train.fit.TrainConfig): each split
    cached in memory while the budget lasts (training first), else in RUN_DIR/cache/."""
    budget = default_budget() if cfg.cache_budget_mb is None else int(cfg.cache_budget_mb * 2**20)
    cache_dir = os.path.join(run_dir, "cache")
    order = shuffled_once(train, cfg.seed)
    plans = [plan_cache(order.paths, cfg.image_size, cache_dir, "training", cfg.cache, budget)]
    left = budget - (plans[0].nbytes if plans[0].mode == "memory" else 0)
    plans.append(plan_cache(val.paths, cfg.image_size, cache_dir, "validation", cfg.cache, max(0, left)))
    for name, plan in zip(("training", "validation"), plans):
        log(f"{name} images {plan.describe()}")
    return (stream_dataset(order, PipelineSpec(cfg.image_size, cfg.batch_size, True, augment, cfg.seed, plans[0])),
            stream_dataset(val, PipelineSpec(cfg.image_size, cfg.batch_size, cache=plans[1])))
