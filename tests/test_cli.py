"""The command line as a user meets it: the console script, the dataset command, help."""
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, cli_in_process, run_cli


def test_console_script_is_the_same_click_group():
    script = Path(sys.executable).parent / "explicam"
    assert script.exists(), "pip install -e . should have created the explicam console script"
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    via_cli = run_cli("--help")
    assert via_script.returncode == 0 and via_cli.returncode == 0
    assert via_script.stdout.replace("Usage: explicam", "Usage: X") == via_cli.stdout.replace("Usage: cli.py", "Usage: X")
    for verb in ("dataset", "train", "export", "bench", "demo"):
        assert verb in via_cli.stdout


def test_dataset_synth_command_writes_the_layout(tmp_path):
    out = tmp_path / "synth"
    res = run_cli("dataset", "synth", "--out", out, "--train", 12, "--val", 6, "--size", 32, "--classes", 3)
    assert res.returncode == 0, res.stderr
    assert "wrote 12 training and 6 validation images of 3 classes" in res.stdout
    classes = sorted(os.listdir(out / "training"))
    assert len(classes) == 3 and sorted(os.listdir(out / "validation")) == classes
    for cls in classes:
        stems = {p.stem for p in (out / "training" / cls).iterdir()}
        assert stems == {p.stem for p in (out / "masks" / "training" / cls).iterdir()}
    again = run_cli("dataset", "synth", "--out", out, "--train", 12, "--val", 6, "--size", 32, "--classes", 3)
    assert again.returncode != 0 and "Traceback" not in again.stderr and str(out) in again.stderr
    forced = run_cli("dataset", "synth", "--out", out, "--train", 12, "--val", 6, "--size", 32, "--classes", 3,
                     "--force")
    assert forced.returncode == 0, forced.stderr


def test_bad_option_values_are_one_line_errors(tmp_path):
    res = run_cli("dataset", "synth", "--out", tmp_path / "x", "--habitat-bias", 1.5)
    assert res.returncode != 0 and "Traceback" not in res.stderr and "habitat_bias" in res.stderr
    res = cli_in_process("train", "--data", tmp_path, "--image-size", 100)
    assert res.returncode != 0 and "Traceback" not in res.stderr
