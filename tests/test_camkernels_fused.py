"""The kernels that fuse steps of the explainer (one call after onnxruntime instead of several):
each against what it replaces, bit for bit, and against a loop from the method's definition."""
import numpy as np
import pytest
from test_camkernels import BACKENDS, NPY, close, small_case

from explicam import camkernels as ck


# --- the fused kernels: what they replace, bit for bit, and the paper's formulas -------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_heatmap_and_relu_sum_equal_their_parts(backend):
    ns = ck.get(backend)
    rng = np.random.default_rng(8)
    maps = np.concatenate([rng.standard_normal((3, 7, 7)), np.full((1, 7, 7), 2.5),   # a constant map: zeros
                           rng.standard_normal((1, 7, 7)) * 1e-20]).astype(np.float32)
    for geo in [(32.0, 15.5, 32.0, 15.5), (16.0, 23.0, 16.0, 23.0), (32.0, 31.0, 32.0, 31.0)]:
        want = ns.normalize_minmax(ns.upsample_placed(maps, 224, 224, *geo))
        got = ns.heatmap_placed(maps, 224, 224, *geo)
        assert got.dtype == np.float32 and np.array_equal(got, want)
        assert (got[3:] == 0).all() and all(g.min() == 0 and g.max() == 1 for g in got[:3])
    assert np.array_equal(ns.heatmap_placed(maps[:, :5, :3], 40, 30, 8.0, 3.5, 10.0, 4.5),
                          NPY.heatmap_placed(maps[:, :5, :3], 40, 30, 8.0, 3.5, 10.0, 4.5))
    a, g = small_case(3, (3, 5, 4, 37))
    w = ns.channel_mean(g)
    fused = ns.weighted_sum(a - 0.5, w, relu=True)
    assert np.array_equal(fused, ns.relu(ns.weighted_sum(a - 0.5, w)))
    assert (fused == 0).any() and (fused > 0).any()   # both sides of the ReLU were exercised
    close(fused, np.maximum(np.einsum("nhwc,nc->nhw", (a - 0.5).astype(np.float64), w.astype(np.float64)), 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_max_abs_against_loop(backend):
    ns = ck.get(backend)
    rng = np.random.default_rng(9)
    g = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
    g[0, 0, 0] = [-7.0, 2.0, 3.0]                     # the largest magnitude is a negative value
    g[1, 2, 3] = [0.0, -0.0, 0.0]
    got = ns.channel_max_abs(g)
    want = [[[max(abs(v) for v in px) for px in row] for row in img] for img in g.tolist()]
    assert got.dtype == np.float32 and np.array_equal(got, np.array(want, np.float32))
    assert got[0, 0, 0] == 7.0
    g[1, 0, 0, 1] = np.nan                              # NaN propagates, as np.maximum
    assert np.isnan(ns.channel_max_abs(g)[1, 0, 0]) and np.isnan(NPY.channel_max_abs(g)[1, 0, 0])
    assert np.array_equal(ns.channel_max_abs(g[..., :1]), np.abs(g[..., 0]))   # one channel (grayscale)
    with pytest.raises(ValueError):
        ns.channel_max_abs(g[0])


def finer_seed_loop(logits, target, k, alpha):
    """Finer-CAM's comparison (Zhang et al. 2025), one image, from the definition."""
    order = sorted((abs(float(np.float32(logits[j] - logits[target]))), j) for j in range(len(logits)) if j != target)
    refs = [j for _, j in order[:k]]
    p = np.exp(np.float64(logits) - np.float64(logits).max())
    p /= p.sum()
    w = p[refs] / (p[refs].sum() + 1e-9)
    return [target] + refs, w, [w.sum()] + list(-alpha * w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finer_seed_against_loop(backend):
    ns = ck.get(backend)
    rng = np.random.default_rng(10)
    logits = rng.standard_normal((4, 12)).astype(np.float32)
    logits[3] = [0, 1, 1, 2, 3, 5, 5, 5, 0, -1, 1, 2]   # ties: the lower index first, as a stable sort
    targets = np.array([0, 11, 5, 2])
    for k, alpha in ((1, 1.0), (3, 0.6), (11, 1.0)):
        classes, w, weights = ns.finer_seed(logits, targets, k, alpha)
        assert classes.dtype == np.int64 and classes.shape == (4, k + 1) and weights.shape == (4, k + 1)
        for i in range(4):
            want_c, want_w, want_weights = finer_seed_loop(logits[i], targets[i], k, alpha)
            assert classes[i].tolist() == want_c
            np.testing.assert_allclose(w[i], want_w, rtol=1e-12)
            np.testing.assert_allclose(weights[i], want_weights, rtol=1e-12)
    assert ns.finer_seed(logits, targets, 3)[0][3].tolist() == [2, 1, 10, 0]   # |1 - 1| twice, then |0 - 1|
    nan = logits[:1].copy()
    nan[0, 1] = np.nan                                # a NaN distance sorts last, as numpy's argsort puts it
    assert ns.finer_seed(nan, targets[:1], 11)[0][0, -1] == 1
    with pytest.raises(ValueError):
        ns.finer_seed(logits, targets, 12)
    with pytest.raises(ValueError):
        ns.finer_seed(logits, np.array([0, 1, 2, 12]), 2)


def test_path_accumulate_numba_equals_numpy_and_the_plain_sum_call_by_call():
    """Integrated Gradients' sum_k w_k g_k added into a float64 accumulator a call's points at
    a time: both twins in point order, so calls of 2, 3 and 4 points give what one pass over
    all 9 gives bit for bit; against einsum of the float64 values."""
    from explicam import camkernels

    rng = np.random.default_rng(1)
    g, w = rng.standard_normal((9, 11, 13, 3), dtype=np.float32), rng.random(9)
    want = np.einsum("k,khwc->hwc", w, g.astype(np.float64))
    whole = {b: camkernels.get(b).path_accumulate(np.zeros((11, 13, 3)), g, w) for b in ("numba", "numpy")}
    np.testing.assert_array_equal(whole["numba"], whole["numpy"])
    np.testing.assert_allclose(whole["numba"], want, rtol=1e-12, atol=1e-12)
    for b in ("numba", "numpy"):
        for step in (2, 3, 4):
            acc = np.zeros((11, 13, 3))
            for s in range(0, 9, step):
                out = camkernels.get(b).path_accumulate(acc, g[s:s + step], w[s:s + step])
            assert out is acc
            np.testing.assert_array_equal(acc, whole[b])
    with pytest.raises(ValueError, match="do not match"):
        camkernels.path_accumulate(np.zeros((11, 13, 3)), g, w[:3])
    with pytest.raises(ValueError, match="float64"):
        camkernels.path_accumulate(np.zeros((11, 13, 3), np.float32), g, w)


def test_minmax_chains_find_the_extremes_at_every_position_and_length():
    """normalize_minmax's numba min and max run in 8 chains plus a tail: the extremes in
    every chain and in the tail, rows of 1 to 20 values, in place (heatmap_placed) and not."""
    nb, np_ = ck.get("numba"), NPY
    for n in range(1, 21):
        for at in range(n):
            row = np.linspace(0.25, 0.75, n, dtype=np.float32)[None]
            rows = np.concatenate([row, row, row])
            rows[0, at], rows[1, at], rows[2, at] = -3.0, 9.0, 0.5   # the min, the max, neither
            want = np_.normalize_minmax(rows)
            assert np.array_equal(nb.normalize_minmax(rows), want), (n, at)
            if n > 1:
                assert want[0, at] == 0 and want[1, at] == 1
    maps = np.random.default_rng(3).standard_normal((2, 5, 3)).astype(np.float32)
    assert np.array_equal(nb.heatmap_placed(maps, 23, 17, 4.0, 1.5, 5.0, 2.0),
                          np_.heatmap_placed(maps, 23, 17, 4.0, 1.5, 5.0, 2.0))


def test_a_kernel_file_change_drops_the_numba_cache(tmp_path):
    """numba checks a cached kernel against its own file only; camkernels drops the whole
    cache when any kernel file changes (a callee in another file would stay stale)."""
    (tmp_path / "a.py").write_text("x = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / "a.f-1.py311.nbi").write_text("old")
    ck._drop_stale_cache(str(tmp_path))          # no stamp yet: dropped, stamp written
    assert not (cache / "a.f-1.py311.nbi").exists() and (cache / "numba-sources.sha1").exists()
    (cache / "a.f-1.py311.nbi").write_text("new")
    (cache / "a.f-1.py311.1.nbc").write_text("new")
    ck._drop_stale_cache(str(tmp_path))          # sources unchanged: kept
    assert (cache / "a.f-1.py311.nbi").exists() and (cache / "a.f-1.py311.1.nbc").exists()
    (tmp_path / "a.py").write_text("x = 2\n")
    ck._drop_stale_cache(str(tmp_path))          # a source changed: dropped
    assert not (cache / "a.f-1.py311.nbi").exists() and not (cache / "a.f-1.py311.1.nbc").exists()
    assert (cache / "numba-sources.sha1").exists()
