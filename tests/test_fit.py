"""Training: the run folder, learning the built-in dataset, resume after SIGKILL, --seed."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import pytest

from tests.conftest import NUM_CLASSES, ROOT, SIZE, cli_in_process, quiet


def test_run_folder_holds_model_history_curves_summary(trained_run):
    run, summary = trained_run
    for name in ("model.keras", "history.csv", "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, summary["epochs_run"] + 1))
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    curves = cv2.imread(str(run / "curves.png"))
    assert curves is not None and curves.shape[0] > 100
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("epochs_run", "best_epoch", "wall_time_s", "final_val_accuracy", "best_val_accuracy", "params",
                "kernel", "image_size", "class_names"):
        assert key in on_disk, key
    assert on_disk["final_val_accuracy"] == pytest.approx(float(rows[-1]["val_accuracy"]))
    assert on_disk["best_val_accuracy"] == pytest.approx(max(float(r["val_accuracy"]) for r in rows))
    assert 1 <= on_disk["best_epoch"] <= on_disk["epochs_run"]
    best_row = rows[on_disk["best_epoch"] - 1]
    assert float(best_row["val_loss"]) == pytest.approx(min(float(r["val_loss"]) for r in rows))


def test_short_training_learns_the_builtin_dataset(trained_run):
    _, summary = trained_run
    chance = 1.0 / NUM_CLASSES
    assert summary["best_val_accuracy"] > chance + 0.3, summary["best_val_accuracy"]
    assert summary["model_val_accuracy"] == pytest.approx(summary["best_val_accuracy"], abs=0.35)


def test_best_model_on_disk_is_the_best_epoch(trained_run):
    import keras

    from explicam.train.data import find_dataset, load_images

    run, summary = trained_run
    model = keras.models.load_model(run / "model.keras")
    ds = find_dataset(summary["data"])
    x, y, _ = load_images(ds.val, SIZE)
    acc = float((model.predict(x / 255.0, verbose=0).argmax(1) == y).mean())
    assert acc == pytest.approx(summary["model_val_accuracy"], abs=1e-6)


def _state(run):
    try:
        return json.loads((run / "backup" / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def test_sigkill_then_same_command_resumes(synth_dir, tmp_path):
    run = tmp_path / "k4"
    args = ["train", "--data", synth_dir, "--kernel", 4, "--image-size", 32, "--batch-size", 16,
            "--max-epochs", 6, "--patience", 10, "--seed", 3, "--run-dir", run]
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((_state(run) or {}).get("epoch", 0) >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _state(run)["epoch"]
    assert 2 <= killed_at < 6
    assert not (run / "summary.json").exists()

    res = cli_in_process(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming {run} after epoch {killed_at}" in res.stdout
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 6
    assert not [p for p in os.listdir(run) if "partial" in p]

    again = cli_in_process(*args)  # a finished run is recognised, not retrained
    assert again.returncode == 0 and "already complete" in again.stdout


def test_seed_makes_a_run_repeatable(synth_dir, tmp_path):
    from explicam.train.fit import TrainConfig, train

    def once(name):
        cfg = TrainConfig(data=str(synth_dir), kernel=2, image_size=32, batch_size=32, max_epochs=2, seed=7)
        train(cfg, run_dir=str(tmp_path / name), verbose=0, log=quiet)
        return list(csv.DictReader(open(tmp_path / name / "history.csv")))

    a, b = once("a"), once("b")
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "val_accuracy"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-5, abs=1e-6), key


def test_other_settings_in_an_existing_run_folder_are_refused(trained_run):
    run, summary = trained_run
    res = cli_in_process("train", "--data", summary["data"], "--kernel", 8, "--image-size", SIZE, "--run-dir", run)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "other settings" in res.stderr or "finished run" in res.stderr
