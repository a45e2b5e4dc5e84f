"""The video frame's per-pixel kernel: shrinking a camera frame to the model input.

On a 2-core board the video loop spends as much CPU on a 640x480 frame's pixels as on a
small model, and the biggest piece was cv2.resize(INTER_AREA), the resize the model was
trained with (runtime/images.resize_rgb). shrink_area computes the same pixels, with the
BGR -> RGB swap in the same pass, at about a third of the cost: the vertical pass runs
first, over whole contiguous rows, so it vectorises, and the horizontal pass then only
touches S rows. It agrees with cv2 to one level of 255 (float32 sums in another order;
tests/test_camkernels.py).

(A fused numba heatmap blend was tried too: resizing, colouring and blending in one pass
over the frame took 0.6 ms against 0.4 ms for OpenCV's SIMD steps, so the blend stays in
runtime/overlay.Blender.)
"""
from __future__ import annotations

import functools
import math

import numpy as np

from explicam.camkernels.kernels import _jit


@functools.lru_cache(maxsize=32)
def area_table(n_in: int, n_out: int):
    """INTER_AREA weights of one axis, as OpenCV's computeResizeAreaTab: output d averages
    the source interval [d * scale, (d + 1) * scale), each pixel weighted by its overlap.
    Returns (first source index, count, weights padded with zeros) per output index."""
    scale = n_in / n_out
    rows = []
    for d in range(n_out):
        f1 = d * scale
        f2 = f1 + scale
        s1, s2 = math.ceil(f1), math.floor(f2)
        cell = min(scale, n_in - f1)
        items = []
        if s1 - f1 > 1e-3:
            items.append((s1 - 1, (s1 - f1) / cell))
        items += [(s, 1.0 / cell) for s in range(s1, min(s2, n_in))]
        if f2 - s2 > 1e-3 and s2 < n_in:
            items.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        rows.append(items)
    start = np.array([r[0][0] for r in rows], np.int64)
    count = np.array([len(r) for r in rows], np.int64)
    weights = np.zeros((n_out, int(count.max())), np.float32)
    for d, r in enumerate(rows):
        weights[d, :len(r)] = [w for _, w in r]
    return start, count, weights


@_jit
def shrink_area_nb(src, ys, yn, yw, xs, xn, xw, swap):
    h, w, ch = src.shape
    out_h, out_w = ys.shape[0], xs.shape[0]
    flat = src.reshape(h, w * ch)
    rows = np.empty(w * ch, np.float32)
    out = np.empty((out_h, out_w, ch), np.uint8)
    half = np.float32(0.5)
    for o in range(out_h):
        wt = yw[o, 0]
        first = flat[ys[o]]
        for j in range(w * ch):  # vertical pass over whole rows: contiguous, vectorises
            rows[j] = wt * np.float32(first[j])
        for k in range(1, yn[o]):
            wt = yw[o, k]
            row = flat[ys[o] + k]
            for j in range(w * ch):
                rows[j] += wt * np.float32(row[j])
        orow = out[o]
        if ch == 3:  # the common case, with the three sums in registers: 30% faster
            for p in range(out_w):
                a0 = a1 = a2 = np.float32(0)
                b = xs[p] * 3
                for k in range(xn[p]):
                    wk = xw[p, k]
                    a0 += wk * rows[b]
                    a1 += wk * rows[b + 1]
                    a2 += wk * rows[b + 2]
                    b += 3
                v0 = min(max(int(a0 + half), 0), 255)
                v1 = min(max(int(a1 + half), 0), 255)
                v2 = min(max(int(a2 + half), 0), 255)
                if swap:
                    v0, v2 = v2, v0
                orow[p, 0], orow[p, 1], orow[p, 2] = v0, v1, v2
        else:
            for p in range(out_w):
                for c in range(ch):
                    acc = np.float32(0)
                    for k in range(xn[p]):
                        acc += xw[p, k] * rows[(xs[p] + k) * ch + c]
                    orow[p, ch - 1 - c if swap else c] = min(max(int(acc + half), 0), 255)
    return out


def shrink_area_np(src, ys, yn, yw, xs, xn, xw, swap):
    def dense(start, count, weights, n_in):
        m = np.zeros((len(start), n_in), np.float32)
        for d in range(len(start)):
            m[d, start[d]:start[d] + count[d]] = weights[d, :count[d]]
        return m

    h, w, ch = src.shape
    rows = dense(ys, yn, yw, h) @ src.reshape(h, w * ch).astype(np.float32)
    out = (rows.reshape(-1, w, ch).transpose(0, 2, 1) @ dense(xs, xn, xw, w).T).transpose(0, 2, 1)
    out = np.clip(np.floor(out + np.float32(0.5)), 0, 255).astype(np.uint8)
    return out[..., ::-1].copy() if swap else out
