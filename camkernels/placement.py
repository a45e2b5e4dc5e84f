"""Placement-aware upsampling: each feature cell drawn at the centre of its receptive field.

Convention (export/geometry.py): pixel p is centred at coordinate p; cell j of the map is
centred at stride * j + offset pixels. Output pixel p takes the bilinear interpolation at
the fractional cell u = (p - offset) / stride, computed as

    u = (p + 0.5) * scale - shift,   scale = 1 / stride,   shift = (offset + 0.5) / stride

in float64, then u0 = floor(u), frac = u - u0, clamped to the edge cell (frac = 0) when
u0 < 0 or u0 >= n_in - 1, and a horizontal and a vertical pass in float32, exactly the
steps of kernels.upsample_bilinear. With the naive placement (stride = S / h, offset =
(stride - 1) / 2) shift is exactly 0.5 and scale is 1 / (S / h) as cv2 computes it, so the
result is upsample_bilinear's bit for bit.
"""
from __future__ import annotations

import math

# the kernels themselves are kernels.upsample_placed_nb / _np (plain resizing is their
# special case); this module holds the cell-to-pixel arithmetic
from explicam.camkernels.kernels import upsample_placed_nb, upsample_placed_np  # noqa: F401


def scale_shift(stride: float, offset: float) -> tuple[float, float]:
    """(scale, shift) of the coordinate formula above for a cell-to-pixel map."""
    stride, offset = float(stride), float(offset)
    if not (math.isfinite(stride) and stride > 0 and math.isfinite(offset)):
        raise ValueError(f"stride must be a positive number and offset finite, got {stride}, {offset}")
    return 1.0 / stride, (offset + 0.5) / stride
