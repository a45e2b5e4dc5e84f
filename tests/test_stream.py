"""Training data that streams (train/stream.py): bad files found up front, the cache in
memory or on disk, and the same images as the in-memory loader."""
import hashlib
import os

import numpy as np
import pytest

from explicam.train.data import Split, find_dataset, load_images
from explicam.train.stream import (CachePlan, PipelineSpec, check_images, plan_cache, prepare_disk_cache,
                                   stream_dataset)
from tests.conftest import quiet

pytest.importorskip("tensorflow", reason="streaming training data needs the train extra (TensorFlow)")

SIZE = 32


def _epoch(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def _as_set(x, y):
    """Images with their labels as a sorted list of digests: the same multiset, any order."""
    return sorted(hashlib.sha1(np.round(img * 255).astype(np.uint8).tobytes() + bytes([int(lab)])).hexdigest()
                  for img, lab in zip(x, y))


@pytest.fixture(scope="module")
def split(synth_dir):
    ds = find_dataset(synth_dir)
    pick = np.arange(0, len(ds.train.paths), 4)  # 50 images of every class
    return Split([ds.train.paths[i] for i in pick], ds.train.labels[pick])


def test_plan_is_memory_within_the_budget_and_disk_over_it(tmp_path, split):
    nbytes = len(split.paths) * SIZE * SIZE * 3
    assert plan_cache(split.paths, SIZE, str(tmp_path), "training", "auto", nbytes).mode == "memory"
    disk = plan_cache(split.paths, SIZE, str(tmp_path), "training", "auto", nbytes - 1)
    assert disk.mode == "disk" and disk.path.startswith(str(tmp_path / "training-"))
    other = plan_cache(split.paths[::-1], SIZE, str(tmp_path), "training", "auto", 0)
    assert other.path != disk.path  # another order (or size) is another cache file
    with pytest.raises(ValueError, match="--cache"):
        plan_cache(split.paths, SIZE, str(tmp_path), "training", "ram")


def test_streamed_epoch_holds_the_same_images_as_the_in_memory_loader(tmp_path, split):
    x_mem, y_mem, _ = load_images(split, SIZE)
    want = _as_set(x_mem / 255.0, y_mem)
    for plan in (CachePlan("memory", None, 0, 0), plan_cache(split.paths, SIZE, str(tmp_path), "t", "disk")):
        ds = stream_dataset(split, PipelineSpec(SIZE, 16, shuffle=True, seed=1, cache=plan))
        first, second = _epoch(ds), _epoch(ds)
        assert first[0].dtype == np.float32 and first[0].shape == (len(split.paths), SIZE, SIZE, 3)
        assert _as_set(*first) == want, plan.mode
        assert _as_set(*second) == want, plan.mode
        assert not np.array_equal(first[1], second[1]), "reshuffled each epoch"
    plain = _epoch(stream_dataset(split, PipelineSpec(SIZE, 16)))  # no shuffle: the loader's order exactly
    np.testing.assert_array_equal(np.round(plain[0] * 255).astype(np.uint8), x_mem)
    np.testing.assert_array_equal(plain[1], y_mem)


def test_disk_cache_is_written_once_read_back_and_a_stale_lock_is_cleared(tmp_path, split):
    plan = plan_cache(split.paths, SIZE, str(tmp_path / "cache"), "training", "auto", 0)
    prepare_disk_cache(plan.path)
    stale = plan.path + "_0.lockfile"  # what a killed run leaves: tf.data would refuse to start
    open(stale, "w").close()
    spec = PipelineSpec(SIZE, 16, cache=plan)
    first = _epoch(stream_dataset(split, spec))
    assert os.path.exists(plan.path + ".index") and not os.path.exists(stale)
    mtime = os.path.getmtime(plan.path + ".index")
    second = _epoch(stream_dataset(split, spec))  # a resumed run: the finished cache is reused
    assert os.path.getmtime(plan.path + ".index") == mtime
    np.testing.assert_array_equal(first[0], second[0])


def test_unreadable_files_are_found_up_front_and_listed(tmp_path, split):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    good = open(split.paths[0], "rb").read()
    (bad / "cut.jpg").write_bytes(good[: len(good) // 2])
    names = [str(bad / n) for n in ("empty.jpg", "text.jpg", "cut.jpg")]
    mixed = Split(split.paths[:5] + names, np.concatenate([split.labels[:5], [0, 0, 0]]))
    kept, skipped = check_images(mixed)
    assert kept.paths == split.paths[:5] and list(kept.labels) == list(split.labels[:5])
    assert len(skipped) == 3 and all(any(n in s for s in skipped) for n in ("empty.jpg", "text.jpg", "cut.jpg"))


def test_training_over_the_budget_streams_from_disk_and_lists_bad_files(synth_dir, tmp_path):
    import shutil

    from explicam.train.fit import TrainConfig, train

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    (data / "training" / "circle" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    lines = []
    cfg = TrainConfig(data=str(data), kernel=2, image_size=SIZE, batch_size=32, max_epochs=2, seed=0,
                      cache_budget_mb=0.1)
    summary = train(cfg, run_dir=str(tmp_path / "run"), verbose=0, log=lines.append)
    assert any("training images cached on disk" in ln for ln in lines), lines
    assert len(summary["skipped_images"]) == 1 and "broken.jpg" in summary["skipped_images"][0]
    assert summary["train_images"] == 200 and summary["epochs_run"] == 2
    assert not (tmp_path / "run" / "cache").exists()  # removed once the run is complete
    # the cache settings are not part of the run's identity: the same run in memory is "already complete"
    again = train(TrainConfig(**{**cfg.__dict__, "cache_budget_mb": None}), run_dir=str(tmp_path / "run"),
                  verbose=0, log=quiet)
    assert again["epochs_run"] == 2
