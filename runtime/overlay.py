"""Drawing explanations: heatmap colouring, blending over the photo, labels, grids.

All images here are RGB uint8. The model sees the photo squeezed to S x S, so a heatmap
is mapped back by resizing it to the photo's own width and height.
"""
from __future__ import annotations

import cv2
import numpy as np

COLORMAPS = {
    "jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS, "magma": cv2.COLORMAP_MAGMA, "plasma": cv2.COLORMAP_PLASMA,
    "hot": cv2.COLORMAP_HOT, "bone": cv2.COLORMAP_BONE,
}


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W, 3) RGB uint8 through an OpenCV colour map."""
    if colormap not in COLORMAPS:
        raise ValueError(f"--colormap must be one of {', '.join(COLORMAPS)}, got {colormap!r}")
    u8 = np.clip(np.nan_to_num(heatmap) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Blend the coloured heatmap over the photo, at the photo's own size."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 and 1, got {alpha}")
    h, w = image.shape[:2]
    if heatmap.shape[:2] != (h, w):
        heatmap = cv2.resize(heatmap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.addWeighted(colorize(heatmap, colormap), alpha, image, 1.0 - alpha, 0.0)


class Blender:
    """overlay() for a stream of frames: colour map and alpha fixed once per stream, and
    BGR in and out (what capture gives and writers take), so nothing is converted per frame.

    The heatmap is coloured at model resolution and the colours are resized to the frame,
    which costs half of colouring every frame pixel; heatmaps are smooth at that scale, so
    the result is within a few levels of overlay()'s. The colour map is built once as a
    256-entry table: cv2.applyColorMap given a table skips rebuilding it, 0.16 -> 0.015 ms."""

    def __init__(self, alpha: float = 0.5, colormap: str = "jet"):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha must be between 0 and 1, got {alpha}")
        if colormap not in COLORMAPS:
            raise ValueError(f"--colormap must be one of {', '.join(COLORMAPS)}, got {colormap!r}")
        self.alpha = float(alpha)
        self.lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], COLORMAPS[colormap]).reshape(256, 1, 3)

    def blend(self, bgr: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
        h, w = bgr.shape[:2]
        # x * 255 rounded and saturated in one SIMD pass (NaN -> 0); heatmaps are >= 0, so
        # the "Abs" never changes a value. numpy's clip/nan_to_num/astype took 4x longer.
        u8 = cv2.convertScaleAbs(np.asarray(heatmap, np.float32), alpha=255.0)
        colour = cv2.applyColorMap(u8, self.lut)
        if colour.shape[:2] != (h, w):
            colour = cv2.resize(colour, (w, h), interpolation=cv2.INTER_LINEAR)
        # the blend is written over the colours: no third frame-sized array per frame
        return cv2.addWeighted(colour, self.alpha, bgr, 1.0 - self.alpha, 0.0, dst=colour)


def draw_labels(image: np.ndarray, lines, corner=(6, 6)) -> np.ndarray:
    """Write lines of text on a dark box in the top-left corner (in place; returns image).
    The font scales with the image so labels stay readable on 224 px and 4000 px photos."""
    if not lines:
        return image
    h, w = image.shape[:2]
    scale = max(0.35, min(w, h) / 600.0)
    thick = max(1, int(round(scale * 1.6)))
    sizes = [cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick) for t in lines]
    line_h = max(s[0][1] + s[1] for s in sizes) + int(6 * scale)
    box_w = max(s[0][0] for s in sizes) + int(12 * scale)
    x0, y0 = corner
    x1, y1 = min(w - 1, x0 + box_w), min(h - 1, y0 + line_h * len(lines) + int(6 * scale))
    roi = image[y0:y1, x0:x1]
    roi[:] = cv2.convertScaleAbs(roi, alpha=0.35)  # darken instead of a solid box: the photo stays visible
    for i, text in enumerate(lines):
        y = y0 + (i + 1) * line_h
        cv2.putText(image, text, (x0 + int(6 * scale), y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    thick, cv2.LINE_AA)
    return image


def label_lines(top_k, method: str | None = None, target: str | None = None) -> list:
    """['cat 91.2%', 'dog 5.0%', ..., 'gradcam -> cat'] for draw_labels."""
    lines = [f"{name} {p:.1%}" for name, p in top_k]
    if method:
        lines.append(f"{method}" + (f" -> {target}" if target else ""))
    return lines


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Images of equal height next to each other, separated by a white gap."""
    h = max(i.shape[0] for i in images)
    parts = []
    for i, img in enumerate(images):
        if img.shape[0] != h:
            img = cv2.resize(img, (int(img.shape[1] * h / img.shape[0]), h))
        parts.append(img)
        if i < len(images) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def titled(image: np.ndarray, title: str, height: int = 22) -> np.ndarray:
    """The image with a white strip above it holding a title."""
    strip = np.full((height, image.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, str(title)[:40], (3, height - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, image], axis=0)


def grid(tiles, titles=None, cols: int | None = None, tile: int = 224) -> np.ndarray:
    """Tiles resized to tile x tile, with an optional title above each, in a grid."""
    cols = cols or len(tiles)
    rows = (len(tiles) + cols - 1) // cols
    title_h = 22 if titles else 0
    out = np.full((rows * (tile + title_h + 4), cols * (tile + 4), 3), 255, np.uint8)
    for i, img in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = r * (tile + title_h + 4), c * (tile + 4)
        out[y + title_h:y + title_h + tile, x:x + tile] = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        if titles:
            cv2.putText(out, str(titles[i])[:28], (x + 3, y + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                        cv2.LINE_AA)
    return out


def save_png(path: str, rgb: np.ndarray) -> None:
    """Write an RGB image (or a one-channel 8/16-bit map) atomically (temporary name,
    then rename): no half-written PNGs."""
    import os

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb)
    if not ok:
        raise ValueError(f"{path}: could not encode PNG")
    tmp = f"{path}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(buf.tobytes())
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C: leave no .partial behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
