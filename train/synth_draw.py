"""Drawing the built-in dataset's images: backgrounds, class objects, clutter, one image.

A class is a shape + a colour family + a texture; the background is one of ten
procedural styles (the "habitat"), with small clutter behind the object. `render`
draws one image from one seeded generator, so the same seed always gives the same
pixels; its optional arguments draw the counterfactual copies of an image (the same
object on another background, or the background without the object) and the free
object colour of `--colour-cue` from generators of their own, leaving the main stream,
and so every other pixel, as it was. train/synth.py lays the images out as a dataset.
"""
from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass

import cv2
import numpy as np

# Alphabetical on purpose: image_dataset_from_directory numbers classes by sorted
# folder name, so with this order our label index is also the Keras label index.
CLASS_NAMES = ["arrow", "circle", "crescent", "cross", "heart",
               "hexagon", "ring", "square", "star", "triangle"]
# Per class, same order. Hues (degrees) are spread round the wheel and objects are
# saturated while backgrounds are muted, so colour is a strong cue; texture and
# shape back it up so that the classes stay unambiguous.
CLASS_HUES = [0, 28, 55, 90, 130, 170, 200, 230, 275, 320]
CLASS_TEXTURES = ["stripes", "dots", "gradient", "checker", "solid",
                  "grid", "zigzag", "squares", "speckle", "diagonal"]
BACKGROUND_STYLES = ["gradient", "noise", "stripes", "grass", "bricks",
                     "waves", "blotches", "radial", "cells", "plaid"]
# The counterfactual "neutral" background: a style no class uses, never drawn for
# training or validation (its index, len(BACKGROUND_STYLES), is outside their range).
NEUTRAL_STYLE = "plain"
SPLITS = ("training", "validation")
MIN_SCALE, MAX_SCALE = 0.15, 0.45  # object's bounding size, as a fraction of the side


# ---------------------------------------------------------------- colours

def _rgb(h, s, v):
    """HSV (hue in degrees, s and v in 0..1) to an RGB float array in 0..255."""
    return np.array(colorsys.hsv_to_rgb((h % 360) / 360, s, v), np.float32) * 255


def _muted(rng):
    """A random background colour: any hue, but low saturation so objects stand out."""
    return _rgb(rng.uniform(0, 360), rng.uniform(0.05, 0.5), rng.uniform(0.25, 0.85))


def _mix(t, a, b):
    """Blend colour a (t=0) to colour b (t=1) over a float map t."""
    return a + (b - a) * t[..., None]


@functools.lru_cache(maxsize=4)
def _grid(n):
    """Pixel-centre coordinates in 0..1 (x, y), shared by all images of one size."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.meshgrid(c, c)


# ---------------------------------------------------------------- backgrounds
# Each style is f(rng, n) -> float32 (n, n, 3) RGB in 0..255.

def _bg_gradient(rng, n):
    x, y = _grid(n)
    a = rng.uniform(0, 2 * np.pi)
    t = x * np.cos(a) + y * np.sin(a)
    t = (t - t.min()) / (t.max() - t.min())
    return _mix(t, _muted(rng), _muted(rng))


def _bg_noise(rng, n):
    g = int(rng.integers(3, 9))
    t = cv2.resize(rng.random((g, g), np.float32), (n, n), interpolation=cv2.INTER_CUBIC)
    t = t + rng.uniform(-0.12, 0.12, (n, n)).astype(np.float32)  # fine grain on top
    return _mix(np.clip(t, 0, 1), _muted(rng), _muted(rng))


def _bg_stripes(rng, n):
    x, y = _grid(n)
    a, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.2)
    t = (np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period) > 0)
    return _mix(t.astype(np.float32), _muted(rng), _muted(rng))


def _bg_grass(rng, n):
    img = np.full((n, n, 3), _muted(rng) * 0.6, np.float32)
    hue, length = rng.uniform(0, 360), n * rng.uniform(0.06, 0.15)
    for _ in range(n * n // 100):  # blades from random roots, leaning a little
        x0, y0 = rng.uniform(0, n, 2)
        dx, dy = rng.normal(0, 0.3) * length, -length * rng.uniform(0.6, 1.0)
        col = _rgb(hue + rng.normal(0, 12), rng.uniform(0.2, 0.55), rng.uniform(0.3, 0.85))
        cv2.line(img, (int(x0), int(y0)), (int(x0 + dx), int(y0 + dy)), col.tolist(), 1)
    return img


def _bg_bricks(rng, n):
    img = np.full((n, n, 3), _muted(rng), np.float32)  # mortar
    brick, bh = _muted(rng), max(3, int(n * rng.uniform(0.06, 0.12)))
    bw, gap = int(bh * rng.uniform(1.8, 2.6)), max(1, bh // 8)
    for row, y in enumerate(range(0, n, bh)):
        for x in range(-(row % 2) * bw // 2, n, bw):
            col = np.clip(brick * rng.uniform(0.8, 1.15), 0, 255)
            cv2.rectangle(img, (x + gap, y + gap), (x + bw - 1, y + bh - 1), col.tolist(), -1)
    return img


def _bg_waves(rng, n):
    x, y = _grid(n)
    p1, p2, amp = rng.uniform(0.08, 0.25), rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.5)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (y / p1 + amp * np.sin(2 * np.pi * x / p2)))
    return _mix(t, _muted(rng), _muted(rng))


def _bg_blotches(rng, n):
    img = np.full((n, n, 3), _muted(rng), np.float32)
    for _ in range(int(rng.integers(12, 26))):
        c, axes = rng.uniform(0, n, 2), rng.uniform(0.04, 0.2, 2) * n
        cv2.ellipse(img, (int(c[0]), int(c[1])), (int(axes[0]), int(axes[1])),
                    rng.uniform(0, 180), 0, 360, _muted(rng).tolist(), -1)
    return cv2.GaussianBlur(img, (0, 0), n * 0.015)


def _bg_radial(rng, n):
    x, y = _grid(n)
    cx, cy = rng.uniform(-0.3, 1.3, 2)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    t = 0.5 + 0.5 * np.cos(2 * np.pi * r / rng.uniform(0.06, 0.2))
    return _mix(t, _muted(rng), _muted(rng))


def _bg_cells(rng, n):
    x, y = _grid(n)
    k = int(rng.integers(10, 26))
    sx, sy = rng.random(k, np.float32), rng.random(k, np.float32)
    nearest = np.argmin((x[..., None] - sx) ** 2 + (y[..., None] - sy) ** 2, axis=-1)
    a, b = _muted(rng), _muted(rng)
    palette = _mix(rng.random(k, np.float32), a, b)  # each cell between two colours
    return palette[nearest]


def _bg_plaid(rng, n):
    x, y = _grid(n)
    tx = (np.sin(2 * np.pi * x / rng.uniform(0.1, 0.3)) > 0.3).astype(np.float32)
    ty = (np.sin(2 * np.pi * y / rng.uniform(0.1, 0.3)) > 0.3).astype(np.float32)
    base, cx, cy = _muted(rng), _muted(rng), _muted(rng)
    return (base * (1 - 0.5 * tx - 0.5 * ty)[..., None]
            + cx * (0.5 * tx)[..., None] + cy * (0.5 * ty)[..., None])


def _bg_plain(rng, n):
    """The neutral style: one muted colour with a faint shading, no pattern."""
    x, y = _grid(n)
    base = _muted(rng)
    return _mix(0.15 * (x + y) / 2, base, base * 0.8)


_BACKGROUNDS = [_bg_gradient, _bg_noise, _bg_stripes, _bg_grass, _bg_bricks,
                _bg_waves, _bg_blotches, _bg_radial, _bg_cells, _bg_plaid]
NEUTRAL_INDEX = len(_BACKGROUNDS)  # the style index recorded for NEUTRAL_STYLE


def draw_background(style: int, rng, n: int) -> np.ndarray:
    """Background `style` (0..9, or NEUTRAL_INDEX) as float32 (n, n, 3) RGB in 0..255."""
    return _bg_plain(rng, n) if style == NEUTRAL_INDEX else _BACKGROUNDS[style](rng, n)


# ---------------------------------------------------------------- shapes
# Outlines in a unit frame (about -1..1) as layers (points, fill): 255 adds, 0 cuts.

def _ngon(k, radius=1.0, phase=-np.pi / 2):
    t = phase + np.arange(k) * 2 * np.pi / k
    return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)


def _heart():
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 16


_ARM = 0.33  # half-width of the cross's arms
_SHAPES = {
    "arrow": [(np.array([[-1, -.25], [.2, -.25], [.2, -.65], [1, 0],
                         [.2, .65], [.2, .25], [-1, .25]]), 255)],
    "circle": [(_ngon(64), 255)],
    "crescent": [(_ngon(64), 255), (_ngon(64, 0.85) + [0.45, 0], 0)],
    "cross": [(np.array([[-_ARM, -1], [_ARM, -1], [_ARM, -_ARM], [1, -_ARM], [1, _ARM],
                         [_ARM, _ARM], [_ARM, 1], [-_ARM, 1], [-_ARM, _ARM], [-1, _ARM],
                         [-1, -_ARM], [-_ARM, -_ARM]]), 255)],
    "heart": [(_heart(), 255)],
    "hexagon": [(_ngon(6), 255)],
    "ring": [(_ngon(64), 255), (_ngon(64, 0.55), 0)],
    "square": [(_ngon(4, phase=np.pi / 4), 255)],
    "star": [(_ngon(10) * np.where(np.arange(10) % 2, 0.45, 1.0)[:, None], 255)],  # 5 points
    "triangle": [(_ngon(3), 255)],
}


# ---------------------------------------------------------------- object textures

def _frac(a):
    return a - np.floor(a)


# name -> f(u, v, freq, phase, rng): a 0..1 pattern in the object's own frame (u, v),
# so it turns with the object. Class i wears CLASS_TEXTURES[i].
_TEXTURES = {
    "solid": lambda u, v, f, p, rng: np.zeros_like(u),
    "stripes": lambda u, v, f, p, rng: _frac(u * f + p) < 0.5,
    "dots": lambda u, v, f, p, rng: ((_frac(u * f * 1.5) - .5) ** 2
                                     + (_frac(v * f * 1.5) - .5) ** 2) < .08,
    "gradient": lambda u, v, f, p, rng: np.clip((u + 1) / 2, 0, 1),
    "checker": lambda u, v, f, p, rng: (np.floor(u * f) + np.floor(v * f)) % 2,
    "grid": lambda u, v, f, p, rng: (_frac(u * f * 1.3) < .25) | (_frac(v * f * 1.3) < .25),
    "zigzag": lambda u, v, f, p, rng: _frac(v * f * 1.5 + np.abs(_frac(u * f * 1.5) - .5)) < .5,
    "squares": lambda u, v, f, p, rng: _frac(np.maximum(np.abs(u), np.abs(v)) * f + p) < .5,
    "speckle": lambda u, v, f, p, rng: rng.random(u.shape, np.float32) < 0.35,
    "diagonal": lambda u, v, f, p, rng: _frac((u + v) * f + p) < 0.5,
}


# ---------------------------------------------------------------- one image

def _draw_object(rng, label, n, free_hue=None):
    """Return (mask uint8, colour image float32) of the class object at a random pose.
    free_hue: a hue (degrees) that replaces the class's own (--colour-cue); the class hue
    is still drawn from rng, so the pose, texture and every later draw stay the same."""
    layers = _SHAPES[CLASS_NAMES[label]]
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    outer = np.concatenate([p for p, fill in layers if fill]) @ rot.T
    lo, hi = outer.min(0), outer.max(0)
    k = rng.uniform(MIN_SCALE, MAX_SCALE) * n / (hi - lo).max()  # pixels per unit
    # Place the centre so the whole outline stays inside the image.
    centre = np.array([rng.uniform(-lo[i] * k, n - hi[i] * k) for i in (0, 1)])
    mask = np.zeros((n, n), np.uint8)
    for pts, fill in layers:  # 4 fractional bits keep small shapes crisp
        px = np.round(((pts @ rot.T) * k + centre) * 16).astype(np.int32)
        cv2.fillPoly(mask, [px], fill, cv2.LINE_8, shift=4)
    # Pixel -> object frame: inverse rotation of the offset from the centre.
    x, y = _grid(n)
    dx, dy = x * n - centre[0], y * n - centre[1]
    u = (dx * np.cos(a) + dy * np.sin(a)) / k
    v = (-dx * np.sin(a) + dy * np.cos(a)) / k
    hue = CLASS_HUES[label] + rng.uniform(-6, 6)
    if free_hue is not None:
        hue = free_hue
    sat, val = rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
    t = _TEXTURES[CLASS_TEXTURES[label]](u.astype(np.float32), v.astype(np.float32),
                                         rng.uniform(1.6, 2.2), rng.uniform(0, 1), rng)
    t = np.asarray(t, np.float32)
    return mask, _mix(t, _rgb(hue, sat, val), _rgb(hue, sat, val * 0.45))


def _draw_clutter(rng, img, limit):
    """A few blobs, lines and dot clusters, none a class shape, each under `limit` px."""
    n = img.shape[0]
    for _ in range(int(rng.integers(2, 7))):
        col = _rgb(rng.uniform(0, 360), rng.uniform(0.1, 0.8), rng.uniform(0.2, 0.95)).tolist()
        c, r = rng.uniform(0, n, 2), rng.uniform(0.15, 0.3) * limit  # size <= 0.6 limit
        kind = rng.integers(3)
        if kind == 0:  # irregular blob: random radii at sorted random angles
            t = np.sort(rng.uniform(0, 2 * np.pi, 7))
            rad = r * rng.uniform(0.4, 1.0, 7)
            pts = np.stack([c[0] + rad * np.cos(t), c[1] + rad * np.sin(t)], 1)
            cv2.fillPoly(img, [pts.astype(np.int32)], col)
        elif kind == 1:
            angle = rng.uniform(0, np.pi)
            d = r * np.array([np.cos(angle), np.sin(angle)])
            cv2.line(img, tuple((c - d).astype(int).tolist()), tuple((c + d).astype(int).tolist()),
                     col, int(rng.integers(1, max(2, n // 90))))
        else:
            for p in c + rng.uniform(-r, r, (int(rng.integers(3, 8)), 2)):
                radius = int(rng.integers(1, max(2, n // 80)))
                cv2.circle(img, tuple(p.astype(int).tolist()), radius, col, -1)


@dataclass
class Variant:
    """How a counterfactual copy departs from the image its generator draws.

    style: the background style drawn instead (by `rng`, not the image's generator);
    None keeps the image's own background. remove_object: leave the object out (its
    mask comes back empty), keeping background, clutter and grain."""
    style: int | None = None
    remove_object: bool = False
    rng: np.random.Generator | None = None


def render(rng, label, n, habitat_bias, free_hue=None, variant: Variant | None = None):
    """One RGB uint8 image, its mask, its background style index and the object's bbox.

    The image's generator `rng` is consumed the same way whatever free_hue and variant
    say, so a counterfactual copy has the very object (pose, texture, colour), clutter
    and grain of the image it copies; only the background or the object differ."""
    tied = rng.random() < habitat_bias  # the spurious "habitat" cue
    style = label if tied else int(rng.integers(len(_BACKGROUNDS)))
    img = _BACKGROUNDS[style](rng, n)
    if variant is not None and variant.style is not None:
        style, img = variant.style, draw_background(variant.style, variant.rng, n)
    mask, obj = _draw_object(rng, label, n, free_hue)
    ys, xs = np.nonzero(mask)
    _draw_clutter(rng, img, limit=max(np.ptp(xs), np.ptp(ys)) + 1)  # behind the object
    inside = mask > 0
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    if variant is not None and variant.remove_object:
        mask = np.zeros_like(mask)
    else:
        img[inside] = obj[inside]
    img += rng.normal(0, 3, img.shape).astype(np.float32)  # sensor-like grain
    return np.clip(img, 0, 255).astype(np.uint8), mask, style, bbox
