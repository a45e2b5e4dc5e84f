"""Benchmark of the streaming training data (not a test): epoch time against the old
in-memory path, and peak memory as the dataset grows.

    python -m explicam.train.streambench --epoch-data data/synth --rss-data d2k,d20k

--epoch-data: the seed-sized set; both paths train the same network in one process, taking
turns (in memory, streamed, in memory, streamed ...), and the median epoch after the first
of each is compared (the first includes tracing, and for the stream the decoding).
--rss-data: one `train` run per folder, each in its own process, for --rss-epochs epochs;
its peak resident memory (getrusage of the child) is printed beside the cache it chose.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _epoch_timer():
    import keras

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.t0)
    return Timer()


def epoch_times(data: str, size: int = 224, kernel: int = 4, batch: int = 128, rounds: int = 2, log=print) -> dict:
    """Seconds per epoch of the in-memory path (load_images + make_tf_dataset, as train did
    before) and of the streamed one (train/stream.py), the same model, taking turns."""
    import keras

    from explicam.train.data import find_dataset, load_images, make_augmenter, make_tf_dataset
    from explicam.train.fit import TrainConfig
    from explicam.train.model import build_model
    from explicam.train.stream import check_images, training_streams

    ds = find_dataset(data)
    t0 = time.perf_counter()
    x_tr, y_tr, _ = load_images(ds.train, size)
    x_va, y_va, _ = load_images(ds.val, size)
    load_s = time.perf_counter() - t0
    augment = make_augmenter(seed=0)
    t0 = time.perf_counter()
    (tr, _), (va, _) = check_images(ds.train), check_images(ds.val)
    check_s = time.perf_counter() - t0
    cfg = TrainConfig(data=data, kernel=kernel, image_size=size, batch_size=batch, seed=0)
    run_dir = tempfile.mkdtemp(prefix="streambench-")
    pipelines = {
        "in memory": (make_tf_dataset(x_tr, y_tr, batch, True, augment, 0), make_tf_dataset(x_va, y_va, batch, False)),
        "streamed": training_streams(tr, va, cfg, run_dir, augment, log=lambda m: log(f"  {m}")),
    }
    models = {}
    for name in pipelines:
        keras.utils.set_random_seed(0)
        models[name] = build_model(kernel, size, len(ds.class_names))
        models[name].compile(optimizer=keras.optimizers.RMSprop(1e-3), metrics=["accuracy"],
                             loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    times = {name: [] for name in pipelines}
    for r in range(rounds):
        for name, (train_ds, val_ds) in pipelines.items():
            timer = _epoch_timer()
            models[name].fit(train_ds, validation_data=val_ds, epochs=r + 1, initial_epoch=r, verbose=0,
                             callbacks=[timer])
            times[name] += timer.times
            log(f"  round {r + 1}: {name}: {timer.times[-1]:.1f}s")
    shutil.rmtree(run_dir, ignore_errors=True)
    later = {name: statistics.median(t[1:]) if len(t) > 1 else t[0] for name, t in times.items()}
    return {"train_images": len(y_tr), "val_images": len(y_va), "image_size": size, "kernel": kernel,
            "batch": batch, "epochs": times, "median_after_first": later,
            "ratio_streamed_to_memory": later["streamed"] / later["in memory"],
            "in_memory_load_s": load_s, "streamed_check_s": check_s}


def peak_rss_of_training(data: str, size: int, kernel: int, batch: int, epochs: int, cache: str = "auto") -> dict:
    """Run one `train` in a child process; its peak RSS (MB), wall time and cache choice."""
    run_dir = tempfile.mkdtemp(prefix="streambench-rss-")
    cmd = [sys.executable, "-m", "explicam.train.streambench", "--child", data, "--size", str(size),
           "--kernel", str(kernel), "--batch", str(batch), "--rss-epochs", str(epochs), "--cache", cache,
           "--run-dir", run_dir]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if status != 0:
        raise RuntimeError(f"training on {data} failed:\n{out[-2000:]}")
    lines = [ln for ln in out.splitlines() if "cached" in ln or ln.startswith("{")]
    summary = json.loads(lines[-1])
    return {"data": data, "train_images": summary["train_images"], "peak_rss_mb": usage.ru_maxrss / 1024,
            "seconds": time.perf_counter() - t0, "epoch_s": summary["wall_time_s"] / max(1, summary["epochs_run"]),
            "cache": [ln.strip() for ln in lines[:-1]]}


def _child(args) -> None:
    from explicam.train import quiet_tensorflow

    quiet_tensorflow()
    from explicam.train.fit import TrainConfig, train

    cfg = TrainConfig(data=args.child, kernel=args.kernel, image_size=args.size, batch_size=args.batch,
                      max_epochs=args.rss_epochs, patience=args.rss_epochs, seed=0, cache=args.cache)
    summary = train(cfg, run_dir=args.run_dir, verbose=0, log=print)
    print(json.dumps({k: summary[k] for k in ("train_images", "wall_time_s", "epochs_run")}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epoch-data", help="the seed-sized set (cli.py dataset synth defaults)")
    p.add_argument("--rss-data", help="comma-separated dataset folders, e.g. a 2,000 and a 20,000 image set")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--kernel", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="epochs of each path, taking turns")
    p.add_argument("--rss-epochs", type=int, default=1)
    p.add_argument("--rss-kernel", type=int, default=None, help="kernel of the memory runs [default: --kernel]")
    p.add_argument("--cache", default="auto")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if args.epoch_data:
        from explicam.train import quiet_tensorflow

        quiet_tensorflow()
        res = epoch_times(args.epoch_data, args.size, args.kernel, args.batch, args.rounds)
        print(json.dumps(res, indent=1), flush=True)
        med = res["median_after_first"]
        print(f"epoch time ({res['train_images']} + {res['val_images']} images, {args.size} px, kernel {args.kernel}):"
              f" in memory {med['in memory']:.1f}s, streamed {med['streamed']:.1f}s "
              f"(ratio {res['ratio_streamed_to_memory']:.3f}); loading up front {res['in_memory_load_s']:.1f}s "
              f"vs checking up front {res['streamed_check_s']:.1f}s", flush=True)
    for data in (args.rss_data or "").split(","):
        if data:
            r = peak_rss_of_training(data, args.size, args.rss_kernel or args.kernel, args.batch, args.rss_epochs,
                                     args.cache)
            print(json.dumps(r), flush=True)
            print(f"{r['train_images']} images: peak RSS {r['peak_rss_mb']:.0f} MB, {r['epoch_s']:.0f}s per epoch; "
                  f"{'; '.join(r['cache'])}", flush=True)


if __name__ == "__main__":
    main()
