"""The sweep with every run as a Ray task (cluster/sweep.py) equals the sweep without Ray,
and a second sweep on Ray reuses what is finished."""
import json

import pytest

from tests.conftest import quiet
from tests.ray_cluster import ray_address  # noqa: F401 - the session fixture

pytest.importorskip("ray", reason="the Ray tests need the cluster extra: pip install '.[cluster]'")
pytest.importorskip("tensorflow", reason="the sweep trains: it needs the train extra (TensorFlow)")


def _sweep(synth_dir, runs, out, scheduler=None):
    from explicam.evaluate.evaluate import EvalConfig
    from explicam.evaluate.sweep import run_sweep
    from explicam.train.fit import TrainConfig

    make = lambda k, **over: TrainConfig(**{"data": str(synth_dir), "kernel": k, "image_size": 32,  # noqa: E731
                                            "batch_size": 32, "max_epochs": 2, "patience": 2, "seed": 0, **over})
    cfg = EvalConfig(methods=["gradcam"], limit=8, sanity_images=0, effective_images=0, steps=4)
    return run_sweep(str(synth_dir), [2, 4], make, cfg, runs_dir=str(runs), out=str(out), log=quiet,
                     command="test", scheduler=scheduler)


def test_a_sweep_on_ray_equals_the_sweep_without_it(ray_address, synth_dir, tmp_path):  # noqa: F811
    from explicam.cluster.sweep import ray_scheduler

    plain = _sweep(synth_dir, tmp_path / "a", tmp_path / "ra")
    lines = []
    on_ray = _sweep(synth_dir, tmp_path / "b", tmp_path / "rb", ray_scheduler(ray_address, 1, log=lines.append))
    assert plain.endswith("index.html") and on_ray.endswith("index.html")
    assert any("2 run(s) as Ray tasks of 1 CPU" in ln for ln in lines), lines
    for k in (2, 4):
        a = json.loads((tmp_path / "a" / f"k{k}" / "summary.json").read_text())
        b = json.loads((tmp_path / "b" / f"k{k}" / "summary.json").read_text())
        assert a["epochs_run"] == b["epochs_run"] == 2 and a["params"] == b["params"]
        assert b["final_val_accuracy"] == pytest.approx(a["final_val_accuracy"], abs=0.05)
        assert b["best_monitor_value"] == pytest.approx(a["best_monitor_value"], rel=0.05)
        ma = json.loads((tmp_path / "a" / f"k{k}" / "eval" / "metrics.json").read_text())
        mb = json.loads((tmp_path / "b" / f"k{k}" / "eval" / "metrics.json").read_text())
        assert ma["settings"] == mb["settings"]
    report_a = (tmp_path / "ra" / "report.md").read_text()
    report_b = (tmp_path / "rb" / "report.md").read_text()
    assert report_a.count("| 2 |") == report_b.count("| 2 |") and "kernel" in report_b

    # the same sweep again on Ray: every run is finished, nothing is retrained
    mtime = (tmp_path / "b" / "k2" / "model.keras").stat().st_mtime
    _sweep(synth_dir, tmp_path / "b", tmp_path / "rb", ray_scheduler(ray_address, 1, log=quiet))
    assert (tmp_path / "b" / "k2" / "model.keras").stat().st_mtime == mtime
