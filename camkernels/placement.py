"""Placement-aware upsampling: each feature cell drawn at the centre of its receptive field.

Convention (export/geometry.py): pixel p is centred at coordinate p; cell j of the map is
centred at stride * j + offset pixels. Output pixel p takes the bilinear interpolation at
the fractional cell u = (p - offset) / stride, computed as

    u = (p + 0.5) * scale - shift,   scale = 1 / stride,   shift = (offset + 0.5) / stride

in float64, then u0 = floor(u), frac = u - u0, clamped to the edge cell (frac = 0) when
u0 < 0 or u0 >= n_in - 1, and a horizontal and a vertical pass in float32, exactly the
steps of upsample_bilinear below. With the naive placement (stride = S / h, offset =
(stride - 1) / 2) shift is exactly 0.5 and scale is 1 / (S / h) as cv2 computes it, so the
result is upsample_bilinear's bit for bit.
"""
from __future__ import annotations

import math

import numpy as np

from explicam.camkernels.kernels import _jit, _minmax_rows, normalize_minmax_np


def scale_shift(stride: float, offset: float) -> tuple[float, float]:
    """(scale, shift) of the coordinate formula above for a cell-to-pixel map."""
    stride, offset = float(stride), float(offset)
    if not (math.isfinite(stride) and stride > 0 and math.isfinite(offset)):
        raise ValueError(f"stride must be a positive number and offset finite, got {stride}, {offset}")
    return 1.0 / stride, (offset + 0.5) / stride


# --- Bilinear resize with half-pixel centres, as cv2.resize(INTER_LINEAR) ------------------
# Per output index d: src = (d + 0.5) * scale - shift in float64. Plain resizing has
# scale = 1 / (n_out / n_in) as cv2 computes it and shift = 0.5; placing each feature cell
# at its receptive field's centre (camkernels/placement.py) has scale = 1 / stride and
# shift = (offset + 0.5) / stride. s0 = floor(src), frac = src - s0, clamped to the edge
# pixel (frac = 0) when s0 < 0 or s0 >= n_in - 1. Then a horizontal and a vertical pass,
# each p0 * (1 - frac) + p1 * frac in float32. (Rounding src to float32 before taking the
# fraction, as older cv2 sources suggest, is off by up to 8e-5 when shrinking 224 -> 100;
# float64 agrees with cv2 5.0 to 1e-5 and with exact bilinear to 6e-7.)
@_jit
def placed_coords_nb(n_in, n_out, scale, shift):
    i0 = np.empty(n_out, np.int64)
    i1 = np.empty(n_out, np.int64)
    w0 = np.empty(n_out, np.float32)
    w1 = np.empty(n_out, np.float32)
    for d in range(n_out):
        src = (d + 0.5) * scale - shift
        s = math.floor(src)
        frac = np.float32(src - s)
        if s < 0:
            s, frac = 0, np.float32(0)
        if s >= n_in - 1:
            s, frac = n_in - 1, np.float32(0)
        i0[d] = s
        i1[d] = min(s + 1, n_in - 1)
        w0[d] = np.float32(1) - frac
        w1[d] = frac
    return i0, i1, w0, w1


def placed_coords_np(n_in, n_out, scale, shift):
    src = (np.arange(n_out) + 0.5) * scale - shift
    s = np.floor(src)
    frac = (src - s).astype(np.float32)
    frac[(s < 0) | (s >= n_in - 1)] = 0
    i0 = np.clip(s, 0, n_in - 1).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, np.float32(1) - frac, frac


@_jit
def upsample_placed_nb(x, out_h, out_w, scale_y, shift_y, scale_x, shift_x):
    n_map, in_h, in_w = x.shape
    y0, y1, wy0, wy1 = placed_coords_nb(in_h, out_h, scale_y, shift_y)
    x0, x1, wx0, wx1 = placed_coords_nb(in_w, out_w, scale_x, shift_x)
    out = np.empty((n_map, out_h, out_w), np.float32)
    for n in range(n_map):
        tmp = np.empty((in_h, out_w), np.float32)  # horizontal pass, one row per source row
        for i in range(in_h):
            for j in range(out_w):
                tmp[i, j] = x[n, i, x0[j]] * wx0[j] + x[n, i, x1[j]] * wx1[j]
        for i in range(out_h):
            r0, r1, b0, b1 = y0[i], y1[i], wy0[i], wy1[i]
            for j in range(out_w):
                out[n, i, j] = tmp[r0, j] * b0 + tmp[r1, j] * b1
    return out


def upsample_placed_np(x, out_h, out_w, scale_y, shift_y, scale_x, shift_x):
    y0, y1, wy0, wy1 = placed_coords_np(x.shape[1], out_h, scale_y, shift_y)
    x0, x1, wx0, wx1 = placed_coords_np(x.shape[2], out_w, scale_x, shift_x)
    tmp = x[:, :, x0] * wx0
    tmp += x[:, :, x1] * wx1
    out = np.take(tmp, y0, axis=1)  # in place from here on: this pass is memory-bound
    out *= wy0[:, None]
    bottom = np.take(tmp, y1, axis=1)
    bottom *= wy1[:, None]
    out += bottom
    return out


# --- A heatmap: upsample_placed, then normalize_minmax in place, one call (one array less;
# after an onnxruntime call each kernel call is a cold start, so one call instead of two)
@_jit
def heatmap_placed_nb(x, out_h, out_w, scale_y, shift_y, scale_x, shift_x):
    out = upsample_placed_nb(x, out_h, out_w, scale_y, shift_y, scale_x, shift_x)
    flat = out.reshape(out.shape[0], out_h * out_w)
    _minmax_rows(flat, flat)
    return out


def heatmap_placed_np(x, out_h, out_w, scale_y, shift_y, scale_x, shift_x):
    out = upsample_placed_np(x, out_h, out_w, scale_y, shift_y, scale_x, shift_x)
    return normalize_minmax_np(out.reshape(len(out), -1)).reshape(out.shape)


@_jit
def upsample_bilinear_nb(x, out_h, out_w):
    return upsample_placed_nb(x, out_h, out_w, 1.0 / (out_h / x.shape[1]), 0.5, 1.0 / (out_w / x.shape[2]), 0.5)


def upsample_bilinear_np(x, out_h, out_w):
    return upsample_placed_np(x, out_h, out_w, 1.0 / (out_h / x.shape[1]), 0.5, 1.0 / (out_w / x.shape[2]), 0.5)
