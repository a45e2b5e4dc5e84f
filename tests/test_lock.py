"""One run folder, one writer: a second `train` or `sweep` on a held folder stops at once
(before TensorFlow loads) with one line naming the folder and the holder's PID; once the
holder is SIGKILLed, the folder is free."""
import os
import signal
import subprocess
import sys
import time

import pytest

from explicam.train.lock import LOCK_NAME, RunFolderBusy, remove_contents_but_lock, run_folder_lock
from tests.conftest import ROOT

HOLD = ("import sys, time\n"
        "from explicam.train.lock import run_folder_lock\n"
        "with run_folder_lock(sys.argv[1], 'train'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")


def hold(folder):
    """A process holding the folder's lock (as a training would), until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def no_tensorflow(tmp_path):
    """A `tensorflow` that records being imported, first on the path: proof of what loaded."""
    fake = tmp_path / "fake_tf"
    (fake / "tensorflow").mkdir(parents=True)
    marker = tmp_path / "tensorflow-was-imported"
    (fake / "tensorflow" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                                     "raise ImportError('fake tensorflow')\n")
    return {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"}, marker


def cli(*args, env=None):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
    return res, time.perf_counter() - t0


def test_a_second_writer_stops_at_once_and_a_killed_holder_frees_the_folder(tmp_path):
    run = tmp_path / "runs" / "k4"
    holder = hold(run)
    try:
        assert (run / LOCK_NAME).read_text().split()[0] == str(holder.pid)
        with pytest.raises(RunFolderBusy, match=rf"^{run}: in use by another explicam process \(PID {holder.pid}\)"):
            with run_folder_lock(str(run)):
                pass
        env, marker = no_tensorflow(tmp_path)
        res, seconds = cli("train", "--data", tmp_path, "--kernel", "4", "--run-dir", run, env=env)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip() == (f"Error: {run}: in use by another explicam process (PID {holder.pid}); "
                                      "wait for it to finish, or stop it, then run this again")
        assert not marker.exists() and seconds < 15  # stopped before TensorFlow was even imported
        res, _ = cli("sweep", "--data", tmp_path, "--kernels", "2,4", "--runs-dir", tmp_path / "runs", env=env)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert f"{run}: in use by another explicam process (PID {holder.pid})" in res.stderr
        assert not marker.exists() and not (tmp_path / "runs" / "k2").exists()  # all or none: k2 not left behind
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    t0 = time.perf_counter()
    with run_folder_lock(str(run)):  # the kernel dropped the dead holder's lock: no stale lock to clean
        assert (run / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert time.perf_counter() - t0 < 1
    res, _ = cli("train", "--data", tmp_path / "missing", "--run-dir", run)
    assert res.returncode == 1 and "in use" not in res.stderr and "missing" in res.stderr, res.stderr


def test_a_real_train_holds_its_folder_against_a_second_one(tmp_path, synth_dir):
    run = tmp_path / "k4"
    first = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", "--data", str(synth_dir), "--image-size",
                              "64", "--batch-size", "16", "--max-epochs", "50", "--run-dir", str(run)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (run / LOCK_NAME).exists() or not (run / LOCK_NAME).read_text().strip():
            assert time.time() < deadline and first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.1)
        res, seconds = cli("train", "--data", synth_dir, "--image-size", "64", "--batch-size", "16",
                           "--max-epochs", "50", "--run-dir", run)
        assert res.returncode == 1 and f"(PID {first.pid})" in res.stderr and str(run) in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and seconds < 15
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    with run_folder_lock(str(run)):
        pass


def test_the_lock_is_reentrant_and_fresh_keeps_it(tmp_path):
    run = tmp_path / "runs" / "k4"
    with run_folder_lock(str(run)):
        with run_folder_lock(str(run)):  # the CLI holds it, then train() takes it again
            (run / "model.keras").write_text("x")
            (run / "backup").mkdir()
            remove_contents_but_lock(str(run))  # --fresh
            assert os.listdir(run) == [LOCK_NAME]
        proc = subprocess.run([sys.executable, "-c", "import sys\nfrom explicam.train.lock import run_folder_lock\n"
                               "with run_folder_lock(sys.argv[1]): pass", str(run)], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 1 and f"PID {os.getpid()}" in proc.stderr  # still held after the inner exit
    assert not (tmp_path / "runs").exists()  # nothing was written: the folders it created are gone again
