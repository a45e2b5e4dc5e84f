"""The metrics against hand-computed values on tiny synthetic cases (no model, no TensorFlow)."""
import math

import numpy as np
import pytest
from scipy import stats

from explicam.evaluate import metrics as M
from explicam.evaluate.inputs import _box_mask, balanced_order, first_per_class, read_boxes
from explicam.evaluate.report import receptive_field
from explicam.evaluate.sweep import conv_macs, parse_kernels


def square_mask(size=16, r0=4, r1=8, c0=4, c1=12):
    m = np.zeros((1, size, size), bool)
    m[0, r0:r1, c0:c1] = True
    return m


# ---------------------------------------------------------------- localisation
def test_heatmap_equal_to_mask_scores_one():
    mask = square_mask()
    heat = mask.astype(np.float32)
    assert M.pointing_game(heat, mask)[0] == 1.0
    assert M.energy_pointing_game(heat, mask)[0] == 1.0


def test_uniform_and_zero_maps_score_the_area_share():
    mask = square_mask()  # 4 x 8 = 32 of 256 pixels
    share = 32 / 256
    for heat in (np.ones((1, 16, 16), np.float32), np.zeros((1, 16, 16), np.float32)):
        assert M.energy_pointing_game(heat, mask)[0] == pytest.approx(share)
        assert M.pointing_game(heat, mask)[0] == pytest.approx(share)  # ties split: chance
    assert M.object_share(mask)[0] == pytest.approx(share)


def test_pointing_game_hit_miss_and_tolerance():
    mask = square_mask()
    heat = np.zeros((2, 16, 16), np.float32)
    heat[0, 5, 5] = 1.0          # on the object
    heat[1, 5, 14] = 1.0         # two pixels right of it (columns 4..11)
    masks = np.concatenate([mask, mask])
    assert M.pointing_game(heat, masks).tolist() == [1.0, 0.0]
    assert M.pointing_game(heat, masks, tolerance=3).tolist() == [1.0, 1.0]


def test_energy_is_the_share_inside():
    mask = square_mask()
    heat = np.zeros((1, 16, 16), np.float32)
    heat[0, 5, 5] = 3.0   # inside
    heat[0, 0, 0] = 1.0   # outside
    assert M.energy_pointing_game(heat, mask)[0] == pytest.approx(0.75)


def test_empty_mask_gives_nan_and_is_left_out_of_the_mean():
    masks = np.concatenate([square_mask(), np.zeros((1, 16, 16), bool)])
    heat = masks.astype(np.float32)
    heat[1, 0, 0] = 1.0
    e = M.energy_pointing_game(heat, masks)
    assert e[0] == 1.0 and math.isnan(e[1])
    assert math.isnan(M.pointing_game(heat, masks)[1])
    assert M.nanmean(e) == 1.0


# ---------------------------------------------------------------- faithfulness
def test_average_drop_and_increase_in_confidence_by_hand():
    p_orig, p_expl = np.array([0.8, 0.5, 0.2]), np.array([0.4, 0.6, 0.2])
    # drops: (0.8-0.4)/0.8 = 0.5, 0 (increase), 0 (equal) -> 100 * 0.5 / 3
    assert M.average_drop(p_orig, p_expl) == pytest.approx(100 * 0.5 / 3)
    assert M.increase_in_confidence(p_orig, p_expl) == pytest.approx(100 / 3)


class MeanModel:
    """Fake model: p(class 0) = weighted mean of the first channel; records batch sizes."""

    def __init__(self, weights=None):
        self.weights, self.calls = weights, []

    def probabilities(self, x, batch_size=64):
        self.calls.append(len(x))
        w = self.weights if self.weights is not None else np.ones(x.shape[1:3])
        p = (x[..., 0] * w).sum(axis=(1, 2)) / w.sum()
        return np.stack([p, 1 - p], axis=1)


def _curves(model, heat, steps, batch_size=64, n=1):
    size = heat.shape[-1]
    x = np.ones((n, size, size, 3), np.float32)
    base = np.zeros_like(x)
    targets = np.zeros(n, np.int64)
    ones, zeros = np.ones(n), np.zeros(n)
    return M.deletion_insertion_curves(model, x, np.repeat(heat[None], n, 0), targets, ones, (base, base),
                                       (zeros, zeros), steps, batch_size)


def test_deletion_auc_of_a_linear_model_is_the_analytic_integral():
    # p = share of pixels kept: deletion p(x) = 1 - x, insertion p(x) = x; both integrate to 1/2.
    heat = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    dele, ins = _curves(MeanModel(), heat, steps=16)
    assert np.allclose(dele[0], 1 - np.arange(17) / 16)
    assert M.auc(dele)[0] == pytest.approx(0.5) and M.auc(ins)[0] == pytest.approx(0.5)


def test_deletion_follows_the_heatmap_order():
    # The model weighs pixels exactly as the heatmap ranks them (weights 256..1): deleting the
    # most important first, p after k pixels = sum of the smallest 256-k weights / total.
    size, steps = 16, 8
    order = np.random.default_rng(1).permutation(size * size)
    weights = np.empty(size * size)
    weights[order] = np.arange(size * size, 0, -1)
    heat = (weights / weights.max()).reshape(size, size).astype(np.float32)
    dele, ins = _curves(MeanModel(weights.reshape(size, size)), heat, steps)
    total, p = weights.sum(), size * size
    k = np.arange(steps + 1) * p // steps
    expect_del = np.array([(p - kk) * (p - kk + 1) / 2 for kk in k]) / total
    expect_ins = 1 - expect_del
    assert np.allclose(dele[0], expect_del) and np.allclose(ins[0], expect_ins)
    expect_auc = (expect_del[:-1] + expect_del[1:]).sum() / (2 * steps)
    assert M.auc(dele)[0] == pytest.approx(expect_auc)
    assert M.auc(dele)[0] < 0.5 < M.auc(ins)[0]  # a faithful map beats the linear (random) 1/2


def test_perturbations_go_through_in_large_batches():
    model = MeanModel()
    heat = np.random.default_rng(2).random((8, 8)).astype(np.float32)
    _curves(model, heat, steps=16, batch_size=128, n=20)
    assert sum(model.calls) == 20 * 2 * 15
    assert max(model.calls) >= 128  # several images per onnxruntime call


def test_perturbed_series_changes_exactly_the_counted_pixels():
    size, steps = 10, 4
    x = np.ones((size, size, 3), np.float32)
    ranks = M.pixel_ranks(np.random.default_rng(3).random((size, size)), np.random.default_rng(0))
    series = M.perturbed_series(x, np.zeros_like(x), np.full_like(x, 0.5), ranks, steps)
    counts = M.step_counts(size * size, steps)[1:-1]
    assert series.shape == (2 * (steps - 1), size, size, 3)
    assert [(s[..., 0] == 0).sum() for s in series[:steps - 1]] == counts.tolist()
    assert [(s[..., 0] == 1).sum() for s in series[steps - 1:]] == counts.tolist()


def test_ties_are_broken_at_random_not_in_raster_order():
    ranks = M.pixel_ranks(np.zeros((32, 32)), np.random.default_rng(0))
    first = np.sort(ranks.reshape(32, 32)[:4].ravel())  # top rows would be 0..127 in raster order
    assert sorted(ranks.tolist()) == list(range(1024)) and first[-1] > 127


def test_explanation_map_is_image_times_heatmap_in_pixel_space():
    x = np.full((1, 4, 4, 3), 1.0, np.float32)            # white in a [-1, 1] value range
    heat = np.zeros((1, 4, 4), np.float32)
    heat[0, 0, 0] = 1.0
    e = M.explanation_maps(x, heat, (-1.0, 1.0))
    assert e[0, 0, 0, 0] == pytest.approx(1.0) and e[0, 1, 1, 0] == pytest.approx(-1.0)  # black = -1
    black = M.baseline_images(x, (-1.0, 1.0), "black")
    assert np.all(black == -1.0)
    with pytest.raises(ValueError, match="baseline"):
        M.baseline_images(x, (0, 1), "noise")


def test_blur_baseline_keeps_the_mean_and_removes_detail():
    rng = np.random.default_rng(4)
    x = rng.random((1, 64, 64, 3)).astype(np.float32)
    b = M.baseline_images(x, (0.0, 1.0), "blur")
    assert b.shape == x.shape and abs(b.mean() - x.mean()) < 0.01 and b.std() < x.std() / 3


# ---------------------------------------------------------------- rank correlation
@pytest.mark.parametrize("seed", range(4))
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, (12, 12)).astype(np.float32)  # many ties
    b = a + rng.integers(0, 4, (12, 12))
    assert M.spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert np.allclose(M.rankdata(a), stats.rankdata(a.ravel()))


def test_spearman_of_a_constant_map_is_nan_like_scipy():
    a, b = np.zeros((4, 4)), np.arange(16.0)
    assert math.isnan(M.spearman(a, b))


def test_random_heatmaps_are_seeded_cam_like_maps():
    a, b = M.random_heatmaps(3, (4, 4), 32, seed=1), M.random_heatmaps(3, (4, 4), 32, seed=1)
    assert a.shape == (3, 32, 32) and np.array_equal(a, b)
    assert a.min() == 0.0 and a.max() == 1.0
    assert not np.array_equal(a, M.random_heatmaps(3, (4, 4), 32, seed=2))


# ---------------------------------------------------------------- inputs, sweep arithmetic
def test_balanced_order_keeps_every_prefix_even():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 4)
    order = balanced_order(labels)
    assert sorted(order.tolist()) == list(range(12))
    assert np.bincount(labels[order[:6]]).tolist() == [2, 2, 2]
    assert balanced_order(labels, 4).tolist() == order[:4].tolist()
    assert first_per_class(labels[order]).tolist() == [0, 1, 2]


def test_boxes_csv_scaled_to_the_model_input(tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("image,x_min,y_min,x_max,y_max\na/1.jpg,0,0,50,100\na/1.jpg,150,0,200,10\n")
    boxes = read_boxes(str(csv))
    m = _box_mask(boxes["a/1.jpg"], (100, 200), 20)  # a 200 x 100 photo squeezed to 20 x 20
    assert m[:, :5].all() and not m[:, 5:15].any() and m[:2, 15:].all() and not m[2:, 15:].any()
    bad = tmp_path / "bad.csv"
    bad.write_text("file,x0\n")
    with pytest.raises(ValueError, match="missing column"):
        read_boxes(str(bad))


def test_receptive_field_of_conv4():
    assert [receptive_field(k) for k in (2, 4, 8, 16, 32)] == [47, 109, 233, 481, 977]
    assert all(receptive_field(k) == 31 * k - 15 for k in range(1, 40))
    assert receptive_field(3, convs=1) == 3  # one 3x3 convolution sees 3 pixels


def test_conv_macs_and_kernel_parsing():
    assert conv_macs(8, 224) == 4 * conv_macs(4, 224)
    assert parse_kernels("2, 4,8") == [2, 4, 8]
    for bad in ("2,x", "0", "4,4", ""):
        with pytest.raises(ValueError, match="--kernels"):
            parse_kernels(bad)


def test_default_methods_follow_the_head():
    from explicam.evaluate.evaluate import default_methods

    assert "cam" in default_methods("gap") and "saliency" not in default_methods("gap")
    assert "saliency" in default_methods("gap", input_grads=True)   # exports made with --input-grads
    assert "cam" not in default_methods("flatten") and "scorecam" in default_methods("flatten")


def test_mask_at_cam_resolution_is_a_ceiling_between_chance_and_one():
    masks = np.concatenate([square_mask(32, 8, 16, 8, 24), square_mask(32, 0, 32, 0, 32)])
    masks[1, 10:, :] = False  # a second, wide object
    ceiling = M.energy_pointing_game(M.mask_at_cam_resolution(masks, (4, 4)), masks)
    assert np.all(ceiling > M.object_share(masks)) and np.all(ceiling < 1)
