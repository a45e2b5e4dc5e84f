"""`sweep --seeds N --image-sizes A,B` on tiny data: one folder per (kernel, seed, size),
restart reuses them, the report has the repeats and the size grid."""
import re

import pytest

from tests.conftest import cli_in_process, run_cli


def _sweep(synth_dir, root, run=run_cli):
    res = run("sweep", "--data", synth_dir, "--kernels", "2", "--seeds", 2, "--image-sizes", "32,64",
                  "--max-epochs", 1, "--batch-size", 32, "--methods", "gradcam", "--limit", 8, "--steps", 2,
                  "--sanity-images", 0, "--effective-images", 0, "--runs-dir", root / "runs",
                  "--out", root / "report")
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def swept(synth_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    return root, _sweep(synth_dir, root), _sweep(synth_dir, root, cli_in_process)   # the second reuses all


def test_one_folder_per_seed_and_size(swept):
    root, first, second = swept
    names = sorted(p.name for p in (root / "runs").iterdir())
    assert names == ["k2_s0_32", "k2_s0_64", "k2_s1_32", "k2_s1_64"]
    for name in names:
        assert (root / "runs" / name / "eval" / "metrics.json").is_file()
    assert "kernel 2 (4/4)" in first and second.count("training complete, reused") == 4
    import json
    seeds = {n: json.load(open(root / "runs" / n / "summary.json"))["config"]["seed"] for n in names}
    assert seeds == {"k2_s0_32": 0, "k2_s0_64": 0, "k2_s1_32": 1, "k2_s1_64": 1}


def test_report_has_repeats_and_size_grid(swept):
    report = swept[0] / "report"
    md = (report / "report.md").read_text()
    assert "## Repeats: mean and spread over seeds" in md and "## Kernel size against image size" in md
    assert re.search(r"\| 32 px \| 2x2 \| 2 \(0, 1\) \|", md) and re.search(r"\| 64 px \| 2x2 \| 2 \(0, 1\) \|", md)
    assert re.search(r"\d+\.\d% ± \d+\.\d%", md)  # mean ± std of the final validation accuracy
    assert "| 1.47 |" in md and "| 0.73 |" in md  # receptive field 47 px over 32 and 64 px
    for fig in ("rf_ratio_accuracy.svg", "rf_ratio_energy.svg", "heatmaps_k2.png"):
        assert (report / "figures" / fig).is_file(), fig
    html = (report / "index.html").read_text()
    assert "Kernel size against image size" in html and "k2_s0_64" in html


def test_run_folder_names():
    from explicam.evaluate.grid import SweepGrid, parse_datas, parse_sizes, plan_points

    def names(grid, head="flatten", kernels=(2, 4)):
        return [p.run_dir for p in plan_points("runs", list(kernels), grid, head, 128, "data/x")]
    assert names(SweepGrid()) == ["runs/k2", "runs/k4"]  # one seed, one size: the folders as they always were
    assert names(SweepGrid(seeds=2, base_seed=5), kernels=(4,)) == ["runs/k4_s5_128", "runs/k4_s6_128"]
    assert names(SweepGrid(image_sizes=(32, 64)), "gap", (8,)) == ["runs/k8_gap_s0_32", "runs/k8_gap_s0_64"]
    assert names(SweepGrid(datas=parse_datas("d/b0,d/b1")), kernels=(2,)) == ["runs/b0/k2_s0_128",
                                                                             "runs/b1/k2_s0_128"]
    for bad, call in (("64,100", parse_sizes), ("a/x,b/x", parse_datas)):
        with pytest.raises(ValueError):
            call(bad)
    with pytest.raises(ValueError, match="--seeds"):
        SweepGrid(seeds=0)
