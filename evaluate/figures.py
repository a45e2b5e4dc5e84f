"""The report's figures, drawn from the run itself: heatmap grids (PNG, OpenCV) and small
line charts (SVG written by hand: no plotting library and nothing fetched from a CDN)."""
from __future__ import annotations

import html

import cv2
import numpy as np

from explicam.runtime.overlay import grid, overlay

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def mask_tile(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photo dimmed outside the ground-truth object, with its outline in green."""
    out = image.copy()
    out[~mask] = (out[~mask] * 0.35).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), max(1, image.shape[0] // 112))
    return out


def heatmap_grid(examples: dict, class_names: list, methods: list, tile: int = 160) -> np.ndarray:
    """Rows: one validation image per class; columns: photo, mask (when known), one
    overlay per method. `examples` is an evaluation's examples.npz as a dict."""
    images, masks = examples["images"], examples["masks"]
    has_masks = masks.ndim == 3 and len(masks) == len(images)
    tiles, titles = [], []
    for i, img in enumerate(images):
        pred = int(examples["predicted"][i])
        label = int(examples["labels"][i])
        tiles.append(img)
        titles.append(f"{class_names[label]}{'' if pred == label else ' > ' + class_names[pred]} "
                      f"{float(examples['confidence'][i]):.0%}")
        if has_masks:
            tiles.append(mask_tile(img, masks[i]))
            titles.append("ground truth")
        for m in methods:
            tiles.append(overlay(img, examples[f"heat_{m}"][i].astype(np.float32)))
            titles.append(m)
    return grid(tiles, titles, cols=len(methods) + 1 + int(has_masks), tile=tile)


def kernel_grid(per_kernel: dict, method: str, class_names: list, tile: int = 160) -> np.ndarray:
    """Rows: the example images; columns: photo, mask, then `method` for every kernel.
    per_kernel = {kernel: examples dict}; every kernel explained the same images."""
    first = next(iter(per_kernel.values()))
    images, masks = first["images"], first["masks"]
    has_masks = masks.ndim == 3 and len(masks) == len(images)
    tiles, titles = [], []
    for i, img in enumerate(images):
        tiles.append(img)
        titles.append(class_names[int(first["labels"][i])])
        if has_masks:
            tiles.append(mask_tile(img, masks[i]))
            titles.append("ground truth")
        for k, ex in per_kernel.items():
            tiles.append(overlay(img, ex[f"heat_{method}"][i].astype(np.float32)))
            titles.append(f"k{k} {method}")
    return grid(tiles, titles, cols=len(per_kernel) + 1 + int(has_masks), tile=tile)


def placed_heatmaps(cams: np.ndarray, geometry: dict | None, size_hw) -> dict:
    """{"naive": heatmaps, "geometric": heatmaps} of (n, h, w) cams at the input size, as the
    runtime draws them (camkernels.upsample_placed); "geometric" only with a geometry."""
    from explicam import camkernels
    from explicam.runtime import placement

    out = {}
    for place in ("naive", "geometric") if geometry else ("naive",):
        p = placement.params(place, geometry, size_hw, cams.shape[1:3])
        out[place] = camkernels.normalize_minmax(camkernels.upsample_placed(cams, *size_hw, *p))
    return out


def placement_grid(per_kernel: dict, method: str, tile: int = 200) -> np.ndarray:
    """One row per kernel: the photo with the object outlined, then `method`'s heatmap placed
    naively (stretched) and geometrically (each cell at its receptive field's centre), the
    outline drawn over both. per_kernel = {kernel: (examples dict, geometry)}; the image is
    the first example the kernel classified correctly (else the first)."""
    tiles, titles = [], []
    for k, (ex, geometry) in per_kernel.items():
        ok = np.flatnonzero(ex["predicted"] == ex["labels"])
        i = int(ok[0]) if len(ok) else 0
        img, cams = ex["images"][i], ex[f"cam_{method}"][i:i + 1]
        masks = ex["masks"]
        mask = masks[i] if masks.ndim == 3 and len(masks) == len(ex["images"]) else None
        tiles.append(mask_tile(img, mask) if mask is not None else img)
        titles.append(f"k{k}")
        for place, heat in placed_heatmaps(cams, geometry, img.shape[:2]).items():
            tile_img = overlay(img, heat[0])
            if mask is not None:
                contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(tile_img, contours, -1, (255, 255, 255), max(1, img.shape[0] // 112))
            tiles.append(tile_img)
            titles.append(f"k{k} {method} {place}")
    return grid(tiles, titles, cols=3, tile=tile)


def svg_open(width: int, height: int, left: int, title: str) -> list:
    """The start of every chart here: the SVG element, a white page and the title."""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']


def svg_frame(left, top, pw, ph, height, xlabel, ylabel) -> list:
    """The plot area's border and its axis labels (no x label when `xlabel` is None)."""
    out = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>']
    if xlabel is not None:
        out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(ylabel)}</text>')
    return out


def svg_lines(series: dict, title: str, xlabel: str, ylabel: str, width: int = 560, height: int = 300,
              y_range=(0.0, 1.0)) -> str:
    """A line chart as standalone SVG text. series = {label: [(x, y), ...]}."""
    left, right, top, bottom = 52, 130, 28, 40
    pw, ph = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _ in pts] or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = y_range
    sx = lambda x: left + (x - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: top + ph - (min(max(y, y0), y1) - y0) / (y1 - y0) * ph  # noqa: E731
    out = svg_open(width, height, left, title)
    for t in np.linspace(y0, y1, 6):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.2g}</text>')
    for t in np.unique(np.linspace(x0, x1, min(6, int(x1 - x0) + 1)).round()):
        out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{int(t)}</text>')
    out += svg_frame(left, top, pw, ph, height, xlabel, ylabel)
    for i, (label, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        ly = top + 14 + 16 * i
        out.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 28}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="3"/><text x="{left + pw + 32}" y="{ly}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def svg_bars(groups: dict, title: str, ylabel: str, reference: float | None = None, width: int = 560,
             height: int = 300) -> str:
    """Grouped bars as SVG: groups = {group label: {series label: value in [0, 1]}};
    `reference` draws a dashed line (e.g. the share a uniform map gets)."""
    left, right, top, bottom = 52, 130, 28, 40
    pw, ph = width - left - right, height - top - bottom
    labels = list(dict.fromkeys(s for g in groups.values() for s in g))
    out = svg_open(width, height, left, title)
    sy = lambda y: top + ph - max(0.0, min(1.0, y)) * ph  # noqa: E731
    for t in np.linspace(0, 1, 6):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.1f}</text>')
    gw = pw / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(labels))
    for gi, (group, values) in enumerate(groups.items()):
        gx = left + gi * gw + gw * 0.1
        for si, label in enumerate(labels):
            v = values.get(label)
            if v is None or not np.isfinite(v):
                continue
            out.append(f'<rect x="{gx + si * bw:.1f}" y="{sy(v):.1f}" width="{bw - 1:.1f}" '
                       f'height="{sy(0) - sy(v):.1f}" fill="{PALETTE[si % len(PALETTE)]}"/>')
        out.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{top + ph + 16}" text-anchor="middle">'
                   f'{html.escape(str(group))}</text>')
    if reference is not None and np.isfinite(reference):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(reference):.1f}" y2="{sy(reference):.1f}" '
                   'stroke="black" stroke-dasharray="5,4"/>')
        labels = labels + ["uniform map"]
    out += svg_frame(left, top, pw, ph, height, None, ylabel)
    for i, label in enumerate(labels):
        ly = top + 14 + 16 * i
        style = ('stroke="black" stroke-dasharray="5,4" stroke-width="2"' if label == "uniform map" and reference
                 is not None else f'stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="8"')
        out.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 28}" y1="{ly - 4}" y2="{ly - 4}" {style}/>'
                   f'<text x="{left + pw + 32}" y="{ly}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)
