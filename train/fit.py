"""One training run of the seed network, into a run folder a person can open:

    runs/k4/model.keras     the best model (by --monitor), written atomically
    runs/k4/history.csv     one row per epoch
    runs/k4/curves.png      loss and accuracy, training and validation
    runs/k4/summary.json    the seed's result figures (epochs, best epoch, wall time, accuracy...)
    runs/k4/backup/         resume state: the last epoch's model with its optimizer

Keras' own ModelCheckpoint / EarlyStopping / BackupAndRestore lose their state
(best value, patience counter) when the process dies and are not atomic, so one small
callback (RunKeeper) does all three and writes every file via a temporary name and
os.replace: killed at any moment, the same command resumes and loses at most the epoch
that was in progress.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

from explicam.train.data import find_dataset, make_augmenter
from explicam.train.distribute import distribution_scope
from explicam.train.lock import remove_contents_but_lock, run_folder_lock
from explicam.train.stream import check_images, remove_caches, training_streams

NOT_FINGERPRINTED = ("cache", "cache_budget_mb", "distribute")
SUMMARY_FIGURES = ("epochs_run", "best_epoch", "wall_time_s", "final_val_accuracy", "best_val_accuracy", "params")


@dataclass
class TrainConfig:
    data: str
    kernel: int = 4
    image_size: int = 224
    head: str = "flatten"
    batch_size: int = 128
    max_epochs: int = 100
    patience: int = 20
    learning_rate: float = 1e-3
    monitor: str = "val_loss"
    dropout: float = 0.2
    val_split: float = 0.2
    seed: int | None = None
    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    translation: float = 0.1
    contrast: float = 0.1
    cache: str = "auto"                 # decoded images: auto (memory within the budget, else disk), memory, disk
    cache_budget_mb: float | None = None  # [default: train/stream.py's default_budget()]
    distribute: str = "none"            # none, mirrored (MirroredStrategy) or ray (cluster/train.py)

    def fingerprint(self) -> str:
        """What must match for a run folder to be resumed (max_epochs and patience may grow;
        where the images are cached and how many devices train change nothing learnt)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("max_epochs", "patience") + NOT_FINGERPRINTED}
        keep["data"] = os.path.abspath(keep["data"])
        return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def default_run_dir(kernel: int, head: str = "flatten") -> str:
    return os.path.join("runs", f"k{kernel}" if head == "flatten" else f"k{kernel}_{head}")


def format_duration(seconds: float) -> str:
    """The seed's style: '19min 25s'."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}min {s}s" if m else f"{s}s"


def result_line(summary: dict) -> str:
    return (f"Max Epoch {summary['epochs_run']}/{summary['max_epochs']} | "
            f"Wall time: {format_duration(summary['wall_time_s'])} | "
            f"Final validation accuracy: {summary['final_val_accuracy']:.2%} | "
            f"kept model: epoch {summary['best_epoch']} (best {summary['monitor']}), "
            f"{summary['model_val_accuracy']:.2%}")


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _save_model_atomic(model, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), ".partial-" + os.path.basename(path))  # Keras wants *.keras
    model.save(tmp)
    os.replace(tmp, path)


def _write_history(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    os.replace(tmp, path)


def plot_curves(rows: list[dict], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r[key] for r in rows], label=f"training {key}")
        ax.plot(epochs, [r["val_" + key] for r in rows], label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _make_keeper(run_dir: str, cfg: TrainConfig, state: dict, log):
    import keras

    backup_dir = os.path.join(run_dir, "backup")
    mode_min = cfg.monitor.endswith("loss")

    class RunKeeper(keras.callbacks.Callback):
        """ModelCheckpoint(save_best_only) + EarlyStopping(restore_best_weights) + resume, atomically."""

        def on_train_begin(self, logs=None):
            self.t0 = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            value = logs.get(cfg.monitor)
            if value is None:
                raise ValueError(f"--monitor {cfg.monitor} is not a training metric; use one of {', '.join(logs)}")
            best = state["best"]
            if best is None or (value < best if mode_min else value > best):
                state.update(best=float(value), best_epoch=epoch + 1, wait=0)
                _save_model_atomic(self.model, os.path.join(run_dir, "model.keras"))
            else:
                state["wait"] += 1
            state["wall_time_s"] += time.time() - self.t0
            self.t0 = time.time()
            state["history"].append({"epoch": epoch + 1, **{k: float(v) for k, v in sorted(logs.items())}})
            _write_history(os.path.join(run_dir, "history.csv"), state["history"])
            # The backup file is named by epoch and state.json, written last, points at it:
            # a kill between the two writes leaves the previous, consistent pair.
            os.makedirs(backup_dir, exist_ok=True)
            name = f"epoch{epoch + 1:04d}.keras"
            _save_model_atomic(self.model, os.path.join(backup_dir, name))
            old, state["backup"], state["epoch"] = state.get("backup"), name, epoch + 1
            write_json_atomic(os.path.join(backup_dir, "state.json"), state)
            if old and old != name and os.path.exists(os.path.join(backup_dir, old)):
                os.remove(os.path.join(backup_dir, old))
            if state["wait"] >= cfg.patience:
                log(f"early stopping: no {cfg.monitor} improvement for {cfg.patience} epochs")
                self.model.stop_training = True

    return RunKeeper()


def _load_resume_state(run_dir: str, cfg: TrainConfig, fresh: bool, log) -> dict | None:
    """Returns the saved state to resume from, None to start fresh; raises on a mismatch."""
    state_path = os.path.join(run_dir, "backup", "state.json")
    summary_path = os.path.join(run_dir, "summary.json")
    if fresh and os.path.isdir(run_dir):
        remove_contents_but_lock(run_dir)  # the lock file stays: this process holds it
        return None
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state.get("fingerprint") != cfg.fingerprint():
            raise ValueError(f"{run_dir} holds a run with other settings ({state.get('config_text', '?')}); "
                             "pass --run-dir for a new folder or --fresh to overwrite it")
        return state
    if os.path.exists(summary_path):
        raise ValueError(f"{run_dir} holds a finished run without resume state; pass --fresh to overwrite it")
    return None


def train(cfg: TrainConfig, run_dir: str | None = None, fresh: bool = False, verbose="auto", log=print) -> dict:
    """Train (or resume, or recognise as already complete) one run; returns its summary.
    The run folder is locked for the whole run: a second process stops at once (lock.py)."""
    run_dir = run_dir or default_run_dir(cfg.kernel, cfg.head)
    with run_folder_lock(run_dir, "train"):
        return _train(cfg, run_dir, fresh, verbose, log)


def _train(cfg: TrainConfig, run_dir: str, fresh: bool, verbose, log, out_dir: str | None = None) -> dict:
    """out_dir: where this process writes [default: run_dir]. A Ray Train worker other than
    the chief resumes from run_dir like the chief but writes to a folder of its own (every
    worker saves what the chief saves, so the two stay in step), and returns {}."""
    import keras

    from explicam.train.model import build_model

    ds = find_dataset(cfg.data, cfg.val_split, cfg.seed or 0)  # bad data first: the likelier mistake
    state = _load_resume_state(run_dir, cfg, fresh, log)
    if state and state.get("complete"):
        log(f"{run_dir}: already complete ({state['epoch']} epochs); pass --fresh to train again")
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)

    build_model(cfg.kernel, cfg.image_size, len(ds.class_names), cfg.head, cfg.dropout)  # validate early
    log(f"data: {cfg.data} ({ds.layout} layout), {len(ds.class_names)} classes, "
        f"{len(ds.train.paths)} training / {len(ds.val.paths)} validation images")
    (tr, bad_tr), (va, bad_va) = check_images(ds.train), check_images(ds.val)  # found up front, nothing kept
    y_tr, y_va = tr.labels, va.labels
    bad = bad_tr + bad_va
    if bad:
        log(f"skipped {len(bad)} unreadable image(s):")
        for msg in bad:
            log(f"  {msg}")
    for name, y in (("training", y_tr), ("validation", y_va)):
        missing = sorted(set(range(len(ds.class_names))) - set(y.tolist()))
        if missing:
            raise ValueError(f"{name} split has no readable images for class "
                             f"{', '.join(ds.class_names[i] for i in missing)}")

    if cfg.seed is not None:  # --seed: same weights, same batches, same augmentation, same result
        import tensorflow as tf

        keras.utils.set_random_seed(cfg.seed)
        tf.config.experimental.enable_op_determinism()
    out = out_dir or run_dir
    os.makedirs(out, exist_ok=True)
    with distribution_scope(cfg.distribute, log):  # --distribute mirrored: variables on every replica
        if state:
            model = keras.models.load_model(os.path.join(run_dir, "backup", state["backup"]))
            log(f"resuming {run_dir} after epoch {state['epoch']} (best {cfg.monitor} {state['best']:.4f} "
                f"at epoch {state['best_epoch']})")
        else:
            model = build_model(cfg.kernel, cfg.image_size, len(ds.class_names), cfg.head, cfg.dropout)
            model.compile(optimizer=keras.optimizers.RMSprop(cfg.learning_rate),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    if not state:
        state = {"fingerprint": cfg.fingerprint(), "config_text": f"kernel {cfg.kernel}, size {cfg.image_size}, "
                 f"head {cfg.head}", "epoch": 0, "best": None, "best_epoch": 0, "wait": 0,
                 "wall_time_s": 0.0, "history": []}

    augment = make_augmenter(cfg.flip, cfg.rotation, cfg.zoom, cfg.translation, cfg.contrast, seed=cfg.seed)
    train_ds, val_ds = training_streams(tr, va, cfg, out, augment, log)  # streamed from the files
    keeper = _make_keeper(out, cfg, state, log)
    if state["epoch"] < cfg.max_epochs and state["wait"] < cfg.patience:
        model.fit(train_ds, validation_data=val_ds, epochs=cfg.max_epochs, initial_epoch=state["epoch"],
                  callbacks=[keeper], verbose=verbose)
    if out != run_dir:
        return {}

    # restore_best_weights: the best model is the one on disk; evaluate it for the summary.
    best = keras.models.load_model(os.path.join(run_dir, "model.keras"))
    _, best_model_acc = best.evaluate(val_ds, verbose=0)
    hist = state["history"]
    summary = {
        "kernel": cfg.kernel, "image_size": cfg.image_size, "head": cfg.head,
        "epochs_run": state["epoch"], "max_epochs": cfg.max_epochs, "best_epoch": state["best_epoch"],
        "wall_time_s": round(state["wall_time_s"], 2), "wall_time": format_duration(state["wall_time_s"]),
        "final_val_accuracy": float(hist[-1]["val_accuracy"]),
        "best_val_accuracy": float(max(r["val_accuracy"] for r in hist)),
        "model_val_accuracy": float(best_model_acc),
        "monitor": cfg.monitor, "best_monitor_value": state["best"],
        "params": int(best.count_params()), "class_names": ds.class_names, "num_classes": len(ds.class_names),
        "train_images": int(len(y_tr)), "val_images": int(len(y_va)), "skipped_images": bad,
        "data": os.path.abspath(cfg.data), "config": asdict(cfg),
    }
    plot_curves(hist, os.path.join(run_dir, "curves.png"), f"kernel {cfg.kernel} ({cfg.head} head)")
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    state["complete"] = True
    write_json_atomic(os.path.join(run_dir, "backup", "state.json"), state)
    remove_caches(os.path.join(run_dir, "cache"))  # a finished run needs no decoded copy of its data
    return summary
