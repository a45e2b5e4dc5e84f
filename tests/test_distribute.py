"""`train --distribute mirrored`: MirroredStrategy over two logical CPU devices learns what
one device learns, with the global batch size and the run folder rules unchanged."""
import json
import subprocess
import sys

import pytest

from tests.conftest import NUM_CLASSES, ROOT

pytest.importorskip("tensorflow", reason="training needs the train extra (TensorFlow)")

SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from explicam.train.fit import TrainConfig, train
lines, out = [], {}
for kind in ("none", "mirrored"):
    cfg = TrainConfig(data=sys.argv[1], kernel=4, image_size=64, batch_size=16, max_epochs=5, patience=5, seed=0,
                      flip=False, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0, distribute=kind)
    out[kind] = train(cfg, run_dir=sys.argv[2] + "/" + kind, verbose=0, log=lines.append)
# a second call resumes by the usual rules: the finished mirrored run is recognised
again = train(TrainConfig(**{**cfg.__dict__, "max_epochs": 5}), run_dir=sys.argv[2] + "/mirrored", verbose=0,
              log=lines.append)
print(json.dumps({"lines": lines, "runs": out, "again": again["epochs_run"]}))
"""


def test_mirrored_over_two_cpu_devices_learns_like_one_device(synth_dir, tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(synth_dir), str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={"TF_CPP_MIN_LOG_LEVEL": "2",
                                                                           **__import__("os").environ})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert any("MirroredStrategy over 2 device(s)" in ln for ln in got["lines"]), got["lines"]
    one, two = got["runs"]["none"], got["runs"]["mirrored"]
    chance = 1.0 / NUM_CLASSES
    assert two["epochs_run"] == one["epochs_run"] == 5 and got["again"] == 5
    assert one["best_val_accuracy"] > chance + 0.2 and two["best_val_accuracy"] > chance + 0.2, (one, two)
    assert abs(one["best_val_accuracy"] - two["best_val_accuracy"]) <= 0.15, (one, two)
    assert json.loads((tmp_path / "mirrored" / "summary.json").read_text())["config"]["distribute"] == "mirrored"
