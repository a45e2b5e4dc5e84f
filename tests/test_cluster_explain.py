"""Bulk explanations on Ray Data (cluster/explain.py), on a local Ray of 2 CPUs: the same
results as the one-machine explain image by image, bad files as error rows, a re-run that
skips, and a killed actor that costs neither a row nor a duplicate."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.ray_cluster import descendants_named, ray_address  # noqa: F401 - the session fixture

pytest.importorskip("ray", reason="the Ray tests need the cluster extra: pip install '.[cluster]'")


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(synth_dir, tmp_path_factory):
    """A couple hundred generated images (the session's built-in training split)."""
    return synth_dir / "training"


def test_bulk_explanation_equals_the_one_machine_path(ray_address, onnx_model, corpus, tmp_path):  # noqa: F811
    import pyarrow.parquet as pq

    from explicam.cluster.explain import RayConfig, explain_on_ray
    from explicam.runtime.explainer import Explainer
    from explicam.runtime.files import FilesConfig, explain_files
    from explicam.runtime.images import read_image

    cfg = FilesConfig(model=str(onnx_model), heatmap="npy", batch_size=16)
    one = explain_files([corpus], cfg, out=str(tmp_path / "one"))
    res = explain_on_ray([corpus], FilesConfig(**{**cfg.__dict__, "out": str(tmp_path / "ray")}),
                         RayConfig(ray_address, concurrency=2))
    assert len(one.images) >= 200 and res.explained == len(one.images) and res.errors == 0
    a, b = _csv(tmp_path / "one" / "predictions.csv"), _csv(tmp_path / "ray" / "predictions.csv")
    assert [r["file"] for r in a] == [r["file"] for r in b]  # same images, same order
    for ra, rb in zip(a, b):
        assert [ra[f"class_{i}"] for i in (1, 2, 3)] == [rb[f"class_{i}"] for i in (1, 2, 3)], ra["file"]
        for i in (1, 2, 3):
            assert abs(float(ra[f"prob_{i}"]) - float(rb[f"prob_{i}"])) <= 2e-6, ra["file"]
        assert (ra["target"], ra["output"]) == (rb["target"], rb["output"])
    for rel in [r["output"] for r in a]:
        heat = rel.replace("_gradcam.png", "_gradcam_heatmap.npy")
        np.testing.assert_allclose(np.load(tmp_path / "ray" / heat), np.load(tmp_path / "one" / heat), atol=1e-6)
        assert (tmp_path / "ray" / rel).is_file()
    # the Parquet rows: the heatmap at feature resolution is the explainer's map, min-max normalised
    table = pq.read_table(tmp_path / "ray" / "results").to_pandas()
    assert len(table) == len(one.images) and table["error"].isna().all()
    ex = Explainer(str(onnx_model), warmup=False)
    some = table.sort_values("path").iloc[:8]
    cams = ex.k.normalize_minmax(ex.explain([read_image(p) for p in some["path"]], "gradcam").cams)
    got = np.stack([np.asarray(h, np.float32).reshape(hh, ww) for h, hh, ww in
                    zip(some["heatmap"], some["heatmap_h"], some["heatmap_w"])])
    np.testing.assert_allclose(got, cams, atol=1e-6)
    assert list(some["classes"].iloc[0])[0] == some["target"].iloc[0]


def test_broken_files_become_error_rows_and_a_rerun_skips(ray_address, onnx_model, corpus, tmp_path):  # noqa: F811
    import pandas as pd

    from explicam.cluster.explain import RayConfig, bad_rows, explain_on_ray
    from explicam.runtime.files import FilesConfig

    folder = tmp_path / "in"
    goods = sorted(corpus.rglob("*.jpg"))[:12]
    for i, p in enumerate(goods):
        (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / p.parent.name / f"{i}.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "cut.jpg").write_bytes(goods[0].read_bytes()[:300])
    table = tmp_path / "list.csv"  # a table source too, with a file that does not exist
    pd.DataFrame({"image": [str(goods[0]), str(tmp_path / "gone.jpg")]}).to_csv(table, index=False)

    cfg = FilesConfig(model=str(onnx_model), out=str(tmp_path / "out"), method="gradcam,layercam", batch_size=4)
    rcfg = RayConfig(ray_address, concurrency=2, path_column="image")
    res = explain_on_ray([folder, table], cfg, rcfg)
    assert (res.explained, res.errors, res.total) == (13, 4, 17)
    errors = bad_rows(res.results)
    for name in ("empty.jpg", "text.png", "cut.jpg", "gone.jpg"):
        assert sum(name in e for e in errors) == 1, (name, errors)
    rows = pd.read_parquet(res.results)
    assert len(rows) == 17 * 2 and not rows.duplicated(["path", "method"]).any()
    assert len(_csv(res.csv)) == 13 * 2  # predictions.csv: the explained images, one row per method

    again = explain_on_ray([folder, table], cfg, rcfg)  # nothing new: no Ray work at all
    assert (again.explained, again.already_done) == (0, 17)
    shutil.copy(goods[1], folder / "new.jpg")
    more = explain_on_ray([folder, table], cfg, rcfg)
    assert (more.explained, more.already_done) == (1, 17)
    assert len(pd.read_parquet(res.results)) == 18 * 2


def test_a_killed_actor_costs_no_row_and_no_duplicate(ray_address, onnx_model, synth_dir, tmp_path):  # noqa: F811
    import pandas as pd

    # the 60 validation images: Score-CAM's masked passes (one per conv4 channel, 256) keep
    # the run going well after the first 8 are written (the 200 training images took 40 s)
    corpus, out = synth_dir / "validation", tmp_path / "out"
    args = [sys.executable, str(ROOT / "cli.py"), "explain", str(corpus), "--model", str(onnx_model),
            "--method", "scorecam", "--batch-size", "4", "--out", str(out), "--ray", ray_address,
            "--concurrency", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, deadline = None, time.time() + 240
    while killed is None and time.time() < deadline and proc.poll() is None:
        actors = descendants_named("MapWorker")
        done = len(list(out.rglob("*_scorecam.png"))) if out.exists() else 0
        if actors and done >= 8:  # mid-run: some batches written, most still to come
            os.kill(actors[0], signal.SIGKILL)
            killed = actors[0]
        time.sleep(0.1)
    output = proc.communicate(timeout=300)[0]
    assert killed is not None, "no actor to kill before the run ended:\n" + output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    n = len(list(corpus.rglob("*.jpg")))
    done = len(list(out.rglob("*_scorecam.png")))
    rows = pd.read_parquet(out / "results")
    assert len(rows) == n and rows["path"].nunique() == n and rows["error"].isna().all(), output[-2000:]
    assert len(_csv(out / "predictions.csv")) == n
    assert done == n
