"""Scatter plots as standalone SVG (like evaluate/figures.py: no plotting library, nothing
fetched), for the study's run-by-run figures: one point per run, coloured by a group."""
from __future__ import annotations

import html
import math

from explicam.evaluate.figures import PALETTE, svg_frame, svg_open


def _ticks(lo: float, hi: float, n: int = 5) -> list:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _range(values, pad: float = 0.05, floor=None, ceil=None):
    vals = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or max(abs(hi), 1.0) * 0.1
    lo, hi = lo - pad * span, hi + pad * span
    return (max(lo, floor) if floor is not None else lo), (min(hi, ceil) if ceil is not None else hi)


def svg_scatter(points: dict, title: str, xlabel: str, ylabel: str, width: int = 420, height: int = 300,
                y_range=None, log_x: bool = False) -> str:
    """points = {group label: [(x, y), ...]}; one colour per group, legend on the right."""
    left, right, top, bottom = 52, 110, 28, 40
    pw, ph = width - left - right, height - top - bottom
    fx = (lambda v: math.log2(v) if v > 0 else float("nan")) if log_x else (lambda v: v)  # noqa: E731
    xs = [fx(x) for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]
    x0, x1 = _range(xs)
    y0, y1 = y_range or _range(ys)
    sx = lambda x: left + (fx(x) - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: top + ph - (min(max(y, y0), y1) - y0) / (y1 - y0) * ph  # noqa: E731
    out = svg_open(width, height, left, title)
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    for t in _ticks(x0, x1):
        label = f"{2 ** t:.3g}" if log_x else f"{t:.3g}"
        px = left + (t - x0) / (x1 - x0) * pw
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>'
                   f'<text x="{px:.1f}" y="{top + ph + 16}" text-anchor="middle">{label}</text>')
    out += svg_frame(left, top, pw, ph, height, xlabel, ylabel)
    for i, (label, pts) in enumerate(points.items()):
        color = PALETTE[i % len(PALETTE)]
        for x, y in pts:
            if math.isfinite(fx(x)) and math.isfinite(y):
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}" fill-opacity="0.8"/>')
        ly = top + 14 + 16 * i
        out.append(f'<circle cx="{left + pw + 18}" cy="{ly - 4}" r="4" fill="{color}"/>'
                   f'<text x="{left + pw + 28}" y="{ly}">{html.escape(str(label))}</text>')
    out.append("</svg>")
    return "\n".join(out)
