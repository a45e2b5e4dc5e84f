"""`cli.py sweep` on tiny data: two kernels, one epoch; restart skips what is done; the report
is self-contained and renders in headless Chromium."""
import json
import os
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from tests.conftest import cli_in_process, run_cli

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def _sweep(synth_dir, root, kernels, run=run_cli):
    res = run("sweep", "--data", synth_dir, "--kernels", kernels, "--image-size", 64, "--max-epochs", 1,
                  "--batch-size", 32, "--seed", 0, "--methods", "gradcam,gradcam++", "--limit", 12,
                  "--steps", 4, "--sanity-images", 0, "--runs-dir", root / "runs", "--out", root / "report")
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def swept(synth_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    first = _sweep(synth_dir, root, "2")       # a sweep stopped after its first kernel ...
    second = _sweep(synth_dir, root, "2,4")    # ... and started again with both
    return root, first, second


def test_restart_skips_finished_kernels(swept):
    root, first, second = swept
    assert "kernel 2 (1/1) in" in first and "training complete, reused" not in first
    assert re.search(r"kernel 2 \(1/2\) in \S+: training complete, reused", second)
    assert "evaluation up to date, reused" in second
    assert re.search(r"kernel 4 \(2/2\) in \S+: training;", second)
    for k in (2, 4):
        run = root / "runs" / f"k{k}"
        for name in ("model.keras", "summary.json", "model.onnx", "eval/metrics.json", "eval/examples.npz"):
            assert (run / name).is_file(), (k, name)
    assert "time left" in second


def test_third_run_does_no_work(swept, synth_dir):
    root = swept[0]
    stamp = {k: os.path.getmtime(root / "runs" / f"k{k}" / "model.keras") for k in (2, 4)}
    out = _sweep(synth_dir, root, "2,4", cli_in_process)   # nothing to train: no second TensorFlow start
    assert out.count("training complete, reused") == 2 and out.count("evaluation up to date, reused") == 2
    assert stamp == {k: os.path.getmtime(root / "runs" / f"k{k}" / "model.keras") for k in (2, 4)}


def test_report_contents(swept):
    report = swept[0] / "report"
    html = (report / "index.html").read_text()
    md = (report / "report.md").read_text()
    for text in ("receptive field", "Explanation metrics", "random", "Heatmaps", "Time per metric", "Findings"):
        assert text.lower() in html.lower() and text.lower() in md.lower(), text
    assert "47 px" in html and "109 px" in html  # conv4 receptive fields of kernels 2 and 4
    srcs = re.findall(r'src="([^"]+)"', html)
    assert len(srcs) >= 6 and all((report / s).is_file() for s in srcs)
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "<script" not in html  # no CDN, no JS
    for k in (2, 4):
        assert (report / "figures" / f"heatmaps_k{k}.png").is_file()
        assert (report / "figures" / f"curves_k{k}.png").is_file()
    grid = cv2.imread(str(report / "figures" / "heatmaps_k4.png"))
    assert grid.shape[0] > 4 * 100 and grid.std() > 20  # 4 classes, one row each
    assert (report / "figures" / "by_kernel.png").is_file()


def test_mismatched_run_folder_is_refused_before_any_work(swept, synth_dir):
    root = swept[0]
    res = cli_in_process("sweep", "--data", synth_dir, "--kernels", "4", "--image-size", 96, "--max-epochs", 1,
                  "--runs-dir", root / "runs", "--out", root / "other", "--sanity-images", 0)
    assert res.returncode != 0 and "--runs-dir" in res.stderr and "Traceback" not in res.stderr
    assert not (root / "other").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (/usr/bin/chromium) is not installed")
def test_report_renders_in_headless_chromium(swept, tmp_path):
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
           (swept[0] / "report" / "index.html").as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    img = cv2.imread(str(shot))
    assert img is not None, "Chromium wrote no screenshot"
    assert img.shape[:2] == (900, 1200)
    dark = (img.mean(axis=2) < 128).mean()
    assert img.std() > 10 and 0.005 < dark < 0.9  # text and tables drawn, not a blank page


def test_habitat_section_in_report(swept, tmp_path):
    from explicam.evaluate.report import write_report
    from explicam.evaluate.sweep import report_entry

    run = swept[0] / "runs" / "k4"
    results = json.loads((run / "eval" / "metrics.json").read_text())
    results["out"] = str(run / "eval")
    results["habitat"] = {"bias": 0.8, "tied_images": 9, "untied_images": 3, "accuracy_tied": 0.9,
                          "accuracy_untied": 0.4, "methods": {"gradcam": {
                              "object_energy": 0.3, "background_energy": 0.7, "object_energy_tied": 0.2,
                              "object_energy_untied": 0.5}}}
    path = write_report(str(tmp_path), [report_entry(4, str(run), results)], {"data": "d", "image_size": 64})
    html = open(path).read()
    assert "Object or habitat?" in html and "0.700" in html and "habitat-bias 0.8" in html
    assert np.isfinite(results["chance"]["object_share"])
