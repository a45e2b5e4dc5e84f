"""The study's statistics and report sections over many runs (evaluate/stats.py,
evaluate/study.py, evaluate/reliance.py), on runs described by hand: no training."""
import math
import os

import numpy as np
import pytest

from explicam.evaluate import reliance, stats, study


def test_mean_std_and_spearman_against_hand_values():
    assert stats.mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02), 2))
    m, s, n = stats.mean_std([0.5, None, float("nan")])
    assert (m, n) == (0.5, 1) and math.isnan(s)
    assert stats.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert stats.spearman([1, 1, 2, 3], [4, 3, 2, 1]) == pytest.approx(-0.9486833)  # scipy, ties averaged
    assert math.isnan(stats.spearman([1, 2], [2, 1])) and math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))


def test_bootstrap_interval_separates_real_differences_only():
    far = stats.bootstrap_diff([0.90, 0.92, 0.91], [0.50, 0.55, 0.60])
    assert far["excludes_zero"] and 0.3 < far["low"] < far["diff"] < far["high"] < 0.42
    near = stats.bootstrap_diff([0.80, 0.70, 0.75], [0.78, 0.72, 0.74])
    assert not near["excludes_zero"] and near["low"] < 0 < near["high"]
    assert stats.bootstrap_diff([0.8, 0.7], [0.6, 0.5], seed=3) == stats.bootstrap_diff([0.8, 0.7], [0.6, 0.5], seed=3)
    one = stats.bootstrap_diff([0.8], [0.6, 0.5])
    assert one["diff"] == pytest.approx(0.25) and math.isnan(one["low"]) and not one["excludes_zero"]


def _entry(kernel, seed, size, acc, energy, cf=None, data="d"):
    rows = [{"method": m, "energy_pointing_game": energy - 0.01 * i, "pointing_game": energy}
            for i, m in enumerate(("gradcam", "layercam"))]
    return {"kernel": kernel, "seed": seed, "size": size, "data": data,
            "run_dir": f"runs/{data}/k{kernel}_s{seed}_{size}",
            "summary": {"final_val_accuracy": acc, "best_val_accuracy": acc + 0.01, "epochs_run": 10,
                        "wall_time_s": 30.0, "image_size": size},
            "results": {"methods": ["gradcam", "layercam"], "rows": rows, "input_size": size, "counterfactual": cf}}


@pytest.fixture
def grid():
    """3 kernels x 3 seeds x 2 sizes; accuracy falls as the receptive field outgrows the image."""
    from explicam.evaluate.report import receptive_field

    out = []
    for size in (64, 128):
        for k in (2, 4, 8):
            for s in range(3):
                ratio = receptive_field(k) / size
                out.append(_entry(k, s, size, 0.95 - 0.1 * ratio + 0.01 * s, 0.5 - 0.04 * ratio))
    return out


def test_repeats_table_has_mean_and_std_per_kernel(grid):
    table = study.repeats_table(grid)
    assert table[0] == "table" and len(table[2]) == 6  # one row per (size, kernel)
    row = table[2][0]  # 64 px, kernel 2: accuracy 0.95 - 0.1 * 47/64 + (0, .01, .02)
    mean = 0.95 - 0.1 * 47 / 64 + 0.01
    assert row[:3] == ["64 px", "2x2", "3 (0, 1, 2)"] and row[5] == f"{mean:.1%} ± {0.01:.1%}"
    assert row[7:9] == ["47 px", f"{47 / 64:.2f}"]


def test_kernel_differences_and_findings(grid):
    diffs = study.kernel_differences(grid)
    assert len(diffs) == 6  # 3 pairs at each of 2 sizes
    at64 = {(d["a"], d["b"]): d for d in diffs if d["size"] == 64}
    assert at64[(2, 8)]["accuracy"]["excludes_zero"] and at64[(2, 8)]["accuracy"]["diff"] > 0
    lines = study.repeats_findings(grid, diffs)
    assert any("kernel 2 reaches the best mean" in ln and "runs/d/k2_s0_64" in ln for ln in lines)
    assert any("Kernel 2 vs kernel 8 (d, 64 px)" in ln and "more than the seed-to-seed spread" in ln for ln in lines)


def test_size_grid_correlations_and_figures(grid, tmp_path):
    c = study.ratio_correlations(grid)
    assert c["runs"] == 18 and c["sizes"] == [64, 128]
    assert c["ratio_accuracy"] < -0.9 and abs(c["ratio_accuracy"]) > abs(c["kernel_accuracy"])
    ctx = study.extend_context(grid, {"image_size": 64}, str(tmp_path))
    assert ctx["image_size"] == 128  # the per-kernel sections show the largest size
    titles = [b[1] for b in ctx["study_blocks"] if b[0] == "h2"]
    assert titles == ["Repeats: mean and spread over seeds", "Kernel size against image size"]
    assert any("ranks validation accuracy with Spearman" in ln and "better than the kernel size alone" in ln
               for ln in ctx["findings"])
    svg = (tmp_path / "rf_ratio_accuracy.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") == 18 + 3  # every run, and the legend
    reps = study.representatives(grid)
    assert [(e["kernel"], e["size"], e["seed"]) for e in reps] == [(2, 128, 0), (4, 128, 0), (8, 128, 0)]


def test_one_run_per_kernel_adds_nothing(tmp_path):
    entries = [_entry(k, 0, 64, 0.8, 0.3) for k in (2, 4)]
    ctx = study.extend_context(entries, {"image_size": 64}, str(tmp_path))
    assert ctx["study_blocks"] == [] and ctx["findings"] == [] and not os.listdir(tmp_path)


def _cf(bias, drop, background):
    return {"bias": bias, "colour_cue": 0.5, "chance": 0.25, "drop_swapped": drop,
            "background_above_chance": background,
            "sets": {"swapped": {"accuracy": 0.9 - drop, "validation_accuracy": 0.9, "follows_habitat": drop},
                     "neutral": {"accuracy": 0.85}, "background-only": {"accuracy": 0.25 + background}}}


def test_reliance_correlation_across_runs(tmp_path):
    runs = []
    for bias, drop in ((0.0, 0.0), (0.5, 0.2), (1.0, 0.5)):
        for k, extra in ((2, 0.0), (4, 0.05)):
            runs.append(_entry(k, 0, 64, 0.9, 0.5 - drop / 2 - extra, cf=_cf(bias, drop + extra, drop / 2),
                               data=f"b{bias}"))
    corr = reliance.correlations(runs)
    assert corr["gradcam"]["runs"] == 6 and corr["gradcam"]["drop"] == pytest.approx(1.0)
    blocks, lines = reliance.blocks_and_findings(runs, str(tmp_path))
    assert blocks[0] == ("h2", "Habitat reliance, measured and explained")
    assert (tmp_path / "reliance.svg").is_file()
    assert any("bias 1" in ln and "runs/b1.0/k4_s0_64" in ln for ln in lines)
    assert any(ln.startswith("Habitat, explained (gradcam)") and "ρ = +1.00" in ln and "agree" in ln
               for ln in lines)
    assert np.isfinite(corr["layercam"]["background"])
