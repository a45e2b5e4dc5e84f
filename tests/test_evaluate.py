"""`cli.py evaluate` on the session's tiny trained model: files, chance row, sanity, masks and boxes."""
import csv
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import NUM_CLASSES, ROOT, SIZE, cli_in_process, quiet, run_cli
from tests.test_isolation import BLOCK

METHODS = "gradcam,gradcam++,ablationcam"


@pytest.fixture(scope="module")
def evaluated(onnx_model, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    res = run_cli("evaluate", "--model", onnx_model, "--data", synth_dir, "--methods", METHODS,
                  "--sanity-images", 4, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def _rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def test_files_written_and_read_back(evaluated):
    out, stdout = evaluated
    rows = _rows(out)
    assert list(rows) == METHODS.split(",") + ["random"]
    data = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in data["rows"]] == list(rows)
    assert data["images"] == 60 and data["mask_source"] == "dataset masks"
    for key in ("explain", "drop_increase", "deletion_insertion", "localisation", "sanity"):
        assert key in data["timing_s"]
    for r in data["rows"]:
        for k in ("avg_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "pointing_game",
                  "energy_pointing_game"):
            assert math.isfinite(r[k]), (r["method"], k)
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["energy_pointing_game"] <= 1
        assert len(r["deletion_curve"]) == 17
        assert float(rows[r["method"]]["avg_drop"]) == pytest.approx(r["avg_drop"], rel=1e-5)
    assert 0 < data["chance"]["object_share"] < 0.5
    with open(out / "per_image.csv", newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 60 * 4
    ex = np.load(out / "examples.npz")
    assert ex["images"].shape == (NUM_CLASSES, SIZE, SIZE, 3) and ex["heat_gradcam"].shape == (NUM_CLASSES, SIZE, SIZE)
    assert "random" in stdout and "Energy" in stdout and "time per metric" in stdout


def test_trained_gradcam_beats_the_random_baseline(evaluated):
    rows = _rows(evaluated[0])
    g, r = rows["gradcam"], rows["random"]
    assert float(g["energy_pointing_game"]) > float(r["energy_pointing_game"])
    assert float(g["pointing_game"]) > float(r["pointing_game"])
    assert float(g["deletion_auc"]) < float(r["deletion_auc"])


def test_localisation_under_both_placements_side_by_side(evaluated, onnx_model):
    """Geometric by default; naive recomputed from the same maps; effective measured (TensorFlow)."""
    from explicam import camkernels as ck
    from explicam.evaluate import metrics as M

    out, stdout = evaluated
    data = json.loads((out / "metrics.json").read_text())
    assert data["placement"] == "geometric" and data["geometry"]["offset"] == [23.0, 23.0]
    for r in data["rows"]:
        assert r["pointing_game"] == r["pointing_geometric"] and r["energy_pointing_game"] == r["energy_geometric"]
        assert 0 <= r["energy_naive"] <= 1 and 0 <= r["energy_effective"] <= 1
    assert len(data["effective"]["stride"]) == 2 and data["effective"]["images"] == 8
    ex = np.load(out / "examples.npz")  # the example maps redrawn naively score as the naive heatmap would
    naive = ck.normalize_minmax(ck.upsample_bilinear(ex["cam_gradcam"], SIZE, SIZE))
    assert not np.allclose(naive, ex["heat_gradcam"].astype(np.float32), atol=1e-2)
    assert np.isfinite(M.energy_pointing_game(naive, ex["masks"])).all()
    assert "Point naive" in stdout and "Energy naive" in stdout and "receptive-field centre" in stdout
    assert "pointing_naive" in (out / "metrics.csv").read_text().splitlines()[0]


def test_sanity_cascade_ran(evaluated):
    data = json.loads((evaluated[0] / "metrics.json").read_text())
    s = data["sanity"]
    assert s["stages"] == ["logits", "conv4", "conv3", "conv2", "conv1", "conv0"]
    for m in METHODS.split(","):
        assert len(s["methods"][m]["rho"]) == 6 and all(-1 <= v <= 1 for v in s["methods"][m]["rho"])
        assert isinstance(s["methods"][m]["flagged"], bool)
    assert "chance_rho" in s["methods"]["random"]
    rows = _rows(evaluated[0])
    assert rows["gradcam"]["sanity_flag"] in ("ok", "FLAGGED")


def test_sanity_skipped_without_model_keras(onnx_model, synth_dir, tmp_path):
    from explicam.evaluate.evaluate import EvalConfig, run_evaluation

    for f in (onnx_model, onnx_model.with_name("model.head.onnx")):
        shutil.copy(f, tmp_path / f.name)
    res = run_evaluation(str(tmp_path / "model.onnx"), str(synth_dir),
                         EvalConfig(methods=["gradcam"], limit=8, sanity_images=2, steps=4), log=quiet)
    assert "model.keras" in res["sanity"]["skipped"]
    assert [r["method"] for r in res["rows"]] == ["gradcam", "random"]
    assert (tmp_path / "eval" / "metrics.csv").is_file()


def test_evaluate_runs_without_tensorflow(onnx_model, synth_dir, tmp_path):
    code = BLOCK + (
        "from explicam.evaluate.evaluate import EvalConfig, run_evaluation\n"
        "import explicam.evaluate.metrics, explicam.evaluate.inputs, explicam.evaluate.sanity, explicam.evaluate.report, explicam.evaluate.figures\n"
        f"r = run_evaluation({str(onnx_model)!r}, {str(synth_dir)!r}, EvalConfig(methods=['gradcam'], limit=8,"
        f" sanity_images=2, steps=4), out={str(tmp_path)!r}, log=lambda *a: None)\n"
        "assert 'TensorFlow' in r['sanity']['skipped'], r['sanity']\n"
        "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx') if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def test_boxes_csv_and_habitat_split(onnx_model, tmp_path):
    from explicam.evaluate.evaluate import EvalConfig, run_evaluation
    from explicam.train import synth

    data = tmp_path / "habitat"
    synth.generate(data, n_train=NUM_CLASSES, n_val=24, size=SIZE, num_classes=NUM_CLASSES, habitat_bias=0.7, seed=3)
    meta = json.loads((data / "dataset.json").read_text())
    boxes = tmp_path / "boxes.csv"
    lines = ["image,x_min,y_min,x_max,y_max"] + [f"{r['file']},{','.join(map(str, r['bbox']))}"
                                                  for r in meta["images"] if r["split"] == "validation"]
    boxes.write_text("\n".join(lines) + "\n")
    res = run_evaluation(str(onnx_model), str(data), EvalConfig(methods=["gradcam"], sanity_images=0, steps=4,
                                                                boxes=str(boxes)), log=quiet)
    assert res["mask_source"] == "--boxes CSV"
    box_share = res["chance"]["object_share"]
    masked = run_evaluation(str(onnx_model), str(data), EvalConfig(methods=["gradcam"], sanity_images=0, steps=4),
                            out=str(tmp_path / "m"), log=quiet)
    assert box_share > masked["chance"]["object_share"] > 0  # a box holds its object and more
    h = masked["habitat"]
    assert h["bias"] == 0.7 and h["tied_images"] + h["untied_images"] == 24 and h["tied_images"] > 0
    assert 0 <= h["methods"]["gradcam"]["object_energy"] <= 1
    assert "skipped" in masked["sanity"]


def test_clear_errors(onnx_model, synth_dir):
    res = cli_in_process("evaluate", "--model", onnx_model, "--data", synth_dir, "--methods", "cam", "--limit", 2,
                         "--sanity-images", 0)
    assert res.returncode != 0 and "gap" in res.stderr and "Traceback" not in res.stderr
    res = cli_in_process("evaluate", "--model", onnx_model, "--data", synth_dir, "--methods", "nope", "--sanity-images", 0)
    assert res.returncode != 0 and "unknown method" in res.stderr and "Traceback" not in res.stderr
