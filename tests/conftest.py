"""Shared fixtures: one tiny built-in dataset, one tiny trained model per head and
their ONNX exports, made once per test session (training is the slow part)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
SIZE = 64          # tiny images keep the suite fast; the network is the seed's
NUM_CLASSES = 4


def quiet(*_args, **_kw):
    pass


def run_cli(*args, cwd=None, timeout=600, env=None):
    """Run `python cli.py ...` in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def cli_in_process(*args):
    """`python cli.py ARGS` run in this process, for the calls that need no process of their
    own (an early one-line error, an export, a resume that no signal interrupts): no second
    Python and TensorFlow start (8-10 s a call on a 2-core CI). The result reads as
    run_cli's (returncode, stdout, stderr); an exception the command does not turn into its
    one-line error is raised into the test rather than printed as a traceback."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from explicam.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return SimpleNamespace(returncode=res.exit_code, stdout=res.stdout, stderr=res.stderr)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from explicam.train import synth

    out = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(out, n_train=200, n_val=60, size=SIZE, num_classes=NUM_CLASSES, seed=1)
    return out


def _train(data, run_dir, head, epochs):
    from explicam.train.fit import TrainConfig, train

    cfg = TrainConfig(data=str(data), kernel=4, image_size=SIZE, head=head, batch_size=16,
                      max_epochs=epochs, patience=epochs, seed=0)
    return train(cfg, run_dir=str(run_dir), verbose=0, log=quiet)


@pytest.fixture(scope="session")
def trained_run(synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "k4"
    return run, _train(synth_dir, run, "flatten", 10)


@pytest.fixture(scope="session")
def trained_gap_run(synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "k4_gap"
    return run, _train(synth_dir, run, "gap", 4)


@pytest.fixture(scope="session")
def onnx_model(trained_run):
    from explicam.export.run import export_model

    run, _ = trained_run
    return Path(export_model(run_dir=str(run), samples=4, log=quiet)["onnx"])


@pytest.fixture(scope="session")
def onnx_gap_model(trained_gap_run):
    from explicam.export.run import export_model

    run, _ = trained_gap_run
    return Path(export_model(run_dir=str(run), samples=4, log=quiet)["onnx"])


@pytest.fixture(scope="session")
def val_images(synth_dir):
    """A few real validation images (RGB uint8, original size) with their class index."""
    from explicam.runtime.images import read_image
    from explicam.train.data import find_dataset

    ds = find_dataset(synth_dir)
    picks = [list(ds.val.labels).index(c) for c in range(NUM_CLASSES)] * 2
    return [read_image(ds.val.paths[i]) for i in picks], [int(ds.val.labels[i]) for i in picks]
