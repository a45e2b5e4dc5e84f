"""Per-pixel CAM kernels. Every numba kernel (`*_nb`) sits next to its numpy twin (`*_np`).

Both twins take C-contiguous float32 arrays (the wrappers in camkernels/__init__.py coerce
and validate; nothing here does) and return float32. They compute in the same precision so
they agree to float32 rounding:
  * reductions (sums over pixels or channels) accumulate in float64 and round once at the end
    (the one exception is the numpy `weighted_sum`, a float32 BLAS matmul: ~1e-7 relative;
    the numba channel dot products are summed in an order of the compiler's: see _jit_dot);
  * element-wise work (relu, min-max, bilinear, masking) is plain float32, in the same
    operation order in both twins, so those agree bit for bit.
Layouts: acts/grads (N, h, w, C) NHWC, channel weights (N, C), maps (N, h, w).
The numba loops run C innermost (contiguous in NHWC).

The kernels are serial on purpose (no parallel=True/prange). The only exact split is over
images (never inside a reduction), and a frame is batch 1, so there is nothing to split;
on the 2-core machine with one other busy process (as onnxruntime's thread pool or a
training job would be), prange over images made batch-1 medians 0.1-8 ms instead of
5-70 us (the OpenMP barrier waits out a time slice), and at batch 32 it won on 2 of 7
kernels and lost on the other 5 and on the 256-mask Score-CAM batch.
Serial kernels release the GIL (nogil=True), so a pipeline can overlap them with
inference in another Python thread instead.
"""
from __future__ import annotations

import math

import numpy as np

try:
    import numba
    NUMBA_ERROR = None
    if numba.config.DISABLE_JIT:  # njit would run the loops as pure Python: far too slow
        NUMBA_ERROR = "NUMBA_DISABLE_JIT is set"
except Exception as exc:  # ImportError; a broken llvmlite can also raise OSError on odd boards
    numba = None
    NUMBA_ERROR = f"{type(exc).__name__}: {exc}".strip()

if numba is not None:
    # error_model="numpy": x/0 gives inf/nan like numpy instead of raising ZeroDivisionError.
    _jit = numba.njit(cache=True, fastmath=False, error_model="numpy", nogil=True)
    # A dot product over channels (one float64 sum per pixel): LLVM vectorises a sum only when
    # it may reorder it (reassoc; contract lets it fuse the multiply-add). Partial sums in a
    # lane array, the way to SIMD without fastmath, stayed scalar here (numba 0.68): 18.5 us on
    # EfficientNet-Lite0's 7x7x1280 map against 3.3 now. The order is still fixed by the
    # compiled code (the same inputs give the same bits), and after the float64 sum is rounded
    # to float32 the results matched the lane order's bit for bit on the maps we tried.
    _jit_dot = numba.njit(cache=True, fastmath={"reassoc", "contract"}, error_model="numpy", nogil=True)
else:
    def _jit(f):
        return f  # never called: get("numba") refuses without numba
    _jit_dot = _jit


# --- Grad-CAM weights: mean of the gradients over pixels (Selvaraju 2017) -------------------
@_jit
def channel_mean_nb(g):
    n_img, h, w, c = g.shape
    out = np.empty((n_img, c), np.float32)
    for n in range(n_img):
        acc = np.zeros(c, np.float64)
        for i in range(h):
            for j in range(w):
                for k in range(c):
                    acc[k] += g[n, i, j, k]
        for k in range(c):
            out[n, k] = acc[k] / (h * w)
    return out


def channel_mean_np(g):
    return g.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)


# --- CAM from channel weights: sum_k w[n, k] * A[n, :, :, k] ------------------------------
@_jit_dot
def weighted_sum_nb(a, wts, relu=False):
    n_img, h, w, c = a.shape
    out = np.empty((n_img, h, w), np.float32)
    for n in range(n_img):
        wn = wts[n].astype(np.float64)
        for i in range(h):
            for j in range(w):
                row, s = a[n, i, j], 0.0
                for k in range(c):
                    s += wn[k] * row[k]
                v = np.float32(s)
                out[n, i, j] = np.float32(0) if relu and v < 0 else v   # NaN stays NaN, as relu_nb
    return out


def weighted_sum_np(a, wts, relu=False):
    n_img, h, w, c = a.shape
    out = np.matmul(a.reshape(n_img, h * w, c), wts[:, :, None]).reshape(n_img, h, w)
    return relu_np(out) if relu else out


# --- Grad-CAM++ weights (Chattopadhay 2018, eq. 19, exponential-score trick) ---------------
# alpha = g^2 / (2 g^2 + sum_ij(A) g^3 [+ eps]), alpha = 0 where that is 0;
# weight_k = sum_ij alpha * relu(g). Pixels with g <= 0 add nothing, so the loop skips them.
@_jit
def gradcampp_weights_nb(a, g, eps):
    n_img, h, w, c = a.shape
    out = np.empty((n_img, c), np.float32)
    for n in range(n_img):
        sum_a = np.zeros(c, np.float64)
        for i in range(h):
            for j in range(w):
                for k in range(c):
                    sum_a[k] += a[n, i, j, k]
        acc = np.zeros(c, np.float64)
        for i in range(h):
            for j in range(w):
                for k in range(c):
                    gv = np.float64(g[n, i, j, k])
                    if gv > 0.0:
                        g2 = gv * gv
                        den = 2.0 * g2 + sum_a[k] * (g2 * gv) + eps
                        if den != 0.0:
                            acc[k] += (g2 / den) * gv
        for k in range(c):
            out[n, k] = acc[k]
    return out


def gradcampp_weights_np(a, g, eps):
    sum_a = a.sum(axis=(1, 2), dtype=np.float64)[:, None, None, :]
    gp = np.maximum(g, np.float32(0)).astype(np.float64)  # pixels with g <= 0 add nothing
    g2 = gp * gp
    den = g2 * gp  # den = 2 g^2 + sum_a g^3 + eps, built in place, same rounding as above
    den *= sum_a
    den += 2.0 * g2
    den += eps
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = g2 / den
    alpha[den == 0.0] = 0.0
    alpha *= gp
    return alpha.sum(axis=(1, 2)).astype(np.float32)


# --- XGrad-CAM weights (Fu 2020): sum_ij g*A / (sum_ij A + 1e-7) ---------------------------
@_jit
def xgradcam_weights_nb(a, g):
    n_img, h, w, c = a.shape
    out = np.empty((n_img, c), np.float32)
    for n in range(n_img):
        sum_a = np.zeros(c, np.float64)
        sum_ga = np.zeros(c, np.float64)
        for i in range(h):
            for j in range(w):
                for k in range(c):
                    av = np.float64(a[n, i, j, k])
                    sum_a[k] += av
                    sum_ga[k] += np.float64(g[n, i, j, k]) * av
        for k in range(c):
            out[n, k] = sum_ga[k] / (sum_a[k] + 1e-7)
    return out


def xgradcam_weights_np(a, g):
    sum_a = a.sum(axis=(1, 2), dtype=np.float64)
    sum_ga = np.einsum("nhwc,nhwc->nc", g, a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (sum_ga / (sum_a + 1e-7)).astype(np.float32)


# --- HiResCAM (sum_k g*A, Draelos 2020) / Layer-CAM (sum_k relu(g)*A, Jiang 2021) ----------
@_jit_dot
def grad_product_sum_nb(a, g, relu_grads):
    n_img, h, w, c = a.shape
    out = np.empty((n_img, h, w), np.float32)
    lo = 0.0 if relu_grads else -np.inf  # relu(g) = max(g, 0); max(g, -inf) = g
    for n in range(n_img):
        for i in range(h):
            for j in range(w):
                ga, aa, s = g[n, i, j], a[n, i, j], 0.0
                for k in range(c):
                    s += max(np.float64(ga[k]), lo) * aa[k]
                out[n, i, j] = s
    return out


def grad_product_sum_np(a, g, relu_grads):
    if relu_grads:
        g = np.maximum(g, np.float32(0))
    return np.einsum("nhwc,nhwc->nhw", g, a, dtype=np.float64).astype(np.float32)


# --- ReLU on any array (the wrapper flattens it) -------------------------------------------
@_jit
def relu_nb(x):
    out = np.empty_like(x)
    for p in range(x.size):
        v = x[p]
        out[p] = np.float32(0) if v < 0 else v  # NaN stays NaN, like np.maximum
    return out


def relu_np(x):
    return np.maximum(x, np.float32(0))


# --- Min-max normalisation of each row of an (N, P) array (the wrapper flattens maps) -------
# A constant row (max - min <= 1e-12 * max(1, |max|)) gives zeros. Inputs must be finite.
@_jit
def _row_min_max(r):
    """(min, max) of a 1-D float32 array in 8 independent chains: LLVM keeps the comparisons
    scalar (it will not vectorise a float min without fastmath), and one chain waits on each
    comparison's latency; 8 of them took a 224x224 map from 27 to 14 us. Exact, any order."""
    n = r.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = r[0]
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = r[0]
    end = n - n % 8
    for p in range(0, end, 8):
        v0, v1, v2, v3, v4, v5, v6, v7 = r[p], r[p + 1], r[p + 2], r[p + 3], r[p + 4], r[p + 5], r[p + 6], r[p + 7]
        a0, b0 = min(a0, v0), max(b0, v0)
        a1, b1 = min(a1, v1), max(b1, v1)
        a2, b2 = min(a2, v2), max(b2, v2)
        a3, b3 = min(a3, v3), max(b3, v3)
        a4, b4 = min(a4, v4), max(b4, v4)
        a5, b5 = min(a5, v5), max(b5, v5)
        a6, b6 = min(a6, v6), max(b6, v6)
        a7, b7 = min(a7, v7), max(b7, v7)
    mn = min(min(min(a0, a1), min(a2, a3)), min(min(a4, a5), min(a6, a7)))
    mx = max(max(max(b0, b1), max(b2, b3)), max(max(b4, b5), max(b6, b7)))
    for p in range(end, n):
        mn, mx = min(mn, r[p]), max(mx, r[p])
    return mn, mx


@_jit
def _scale_row(r, out, mn, mx):
    """out = (r - mn) / (mx - mn), or zeros for a constant row. `out` is `r` itself or a row of
    another array, never a partial overlap: a loop over one array is the in-place case LLVM
    vectorises (two names for one buffer fail its overlap check and the division runs a lane
    at a time: ~30 us instead of 4 on a 224x224 map)."""
    rng = mx - mn
    if rng <= 1e-12 * max(1.0, abs(np.float64(mx))):
        out[:] = 0
    elif r is out:
        for p in range(r.shape[0]):
            r[p] = (r[p] - mn) / rng
    else:
        for p in range(r.shape[0]):
            out[p] = (r[p] - mn) / rng


@_jit
def _minmax_rows(x, out):
    """out[n] = (x[n] - min) / (max - min) row by row; out may be x itself (in place)."""
    for n in range(x.shape[0]):
        mn, mx = _row_min_max(x[n])   # exact: the same min and max as numpy's
        _scale_row(x[n], out[n], mn, mx)


@_jit
def normalize_minmax_nb(x):
    out = np.empty_like(x)
    _minmax_rows(x, out)
    return out


def normalize_minmax_np(x):
    mn = x.min(axis=1, keepdims=True)
    mx = x.max(axis=1, keepdims=True)
    rng = mx - mn
    flat = rng <= 1e-12 * np.maximum(1.0, np.abs(mx.astype(np.float64)))
    out = (x - mn) / np.where(flat, np.float32(1), rng)
    out[flat[:, 0]] = 0
    return out


# --- Saliency (Simonyan 2014): max over colour channels of |g|, (N, H, W, C) -> (N, H, W) --
@_jit
def channel_max_abs_nb(g):
    n_img, h, w, c = g.shape
    out = np.empty((n_img, h, w), np.float32)
    for n in range(n_img):
        for i in range(h):
            for j in range(w):
                v = abs(g[n, i, j, 0])
                for k in range(1, c):
                    a = abs(g[n, i, j, k])
                    if a > v or a != a:   # NaN wins, as np.maximum
                        v = a
                out[n, i, j] = v
    return out


def channel_max_abs_np(g):
    # channel by channel: numpy's max over a last axis of 3 runs 30x slower (1.5 against 0.05 ms)
    h = np.abs(g)
    return np.maximum.reduce([h[..., c] for c in range(h.shape[-1])]).astype(np.float32, copy=False)


# --- Finer-CAM's seed (Zhang 2025): per image the target c, its k classes nearest by logit
# (|y_j - y_c| in float32, the target left out, ties to the lower index: a stable sort's first k)
# and the weights of S = sum_d p_d (y_c - alpha y_d) / (sum_d p_d + 1e-9), p = softmax(y) in float64
@_jit
def finer_seed_nb(logits, targets, k, alpha):
    n, m = logits.shape
    classes = np.empty((n, k + 1), np.int64)
    w = np.empty((n, k), np.float64)
    weights = np.empty((n, k + 1), np.float64)
    taken = np.zeros(m, np.bool_)
    for i in range(n):
        c = targets[i]
        taken[:] = False
        taken[c] = True
        classes[i, 0] = c
        for r in range(k):
            best, bd = -1, np.inf
            for j in range(m):
                if not taken[j]:
                    d = abs(logits[i, j] - logits[i, c])
                    if best < 0 or d < bd or (bd != bd and d == d):   # a NaN distance sorts last
                        best, bd = j, d
            taken[best] = True
            classes[i, r + 1] = best
        mx = np.float64(logits[i, 0])
        for j in range(1, m):
            mx = max(mx, np.float64(logits[i, j]))
        total = 0.0
        for j in range(m):
            total += math.exp(np.float64(logits[i, j]) - mx)
        ws = 0.0
        for r in range(k):
            w[i, r] = math.exp(np.float64(logits[i, classes[i, r + 1]]) - mx) / total
            ws += w[i, r]
        ws += 1e-9
        s = 0.0
        for r in range(k):
            w[i, r] /= ws
            s += w[i, r]
            weights[i, r + 1] = -alpha * w[i, r]
        weights[i, 0] = s
    return classes, w, weights


def finer_seed_np(logits, targets, k, alpha):
    n = len(logits)
    dist = np.abs(logits - logits[np.arange(n), targets][:, None]).astype(np.float64)
    is_target = np.zeros(dist.shape, np.int8)
    is_target[np.arange(n), targets] = 1
    refs = np.lexsort((dist, is_target), axis=1)[:, :k]   # the target last, NaN before it, ties by index
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    w = np.take_along_axis(p, refs, axis=1)
    w /= w.sum(axis=1, keepdims=True) + 1e-9
    return (np.concatenate([targets[:, None], refs], axis=1), w,
            np.concatenate([w.sum(axis=1, keepdims=True), -alpha * w], axis=1))


# --- Score-CAM masked-input batch: out[k] = image * masks[k][..., None] (Wang 2020) -------
@_jit
def masked_inputs_nb(image, masks, out):
    h, w, c = image.shape
    for k in range(masks.shape[0]):
        for i in range(h):
            for j in range(w):
                m = masks[k, i, j]
                for ch in range(c):
                    out[k, i, j, ch] = image[i, j, ch] * m
    return out


def masked_inputs_np(image, masks, out):
    return np.multiply(image[None], masks[..., None], out=out)
