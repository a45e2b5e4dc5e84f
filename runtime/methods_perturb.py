"""Methods that re-run (part of) the network on perturbed feature maps or images, without
gradients: Recipro-CAM (masked feature maps through the head) and RISE (masked images
through the classifier). Registered in runtime/methods.py's METHODS like every method.
"""
from __future__ import annotations

import math

import numpy as np

from explicam.runtime.methods import CamInputs, MethodError, register

# Recipro-CAM's "gaussian" spatial mask: the authors' 3x3 kernel around the position.
GAUSSIAN = np.array([[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]], np.float32)
RECIPRO_MASKS = ("onehot", "gaussian")
# Masked maps per head call: 16 copies of a 14x14x256 map (3.2 MB) stay in cache between being
# written and read by onnxruntime; all 196 in one call ran 1.6x slower (kernel 4 at 224 px).
RECIPRO_BATCH = 16
RISE_DEFAULTS = {"rise_masks": 1000, "rise_cells": 8, "rise_p": 0.5, "rise_seed": 0}
RISE_FULL_CACHE_BYTES = 256 << 20  # a mask set up to this size is kept whole; a larger one is redrawn per chunk


# --- Recipro-CAM -------------------------------------------------------------------------
def mosaic_entries(h: int, w: int, mask: str = "onehot") -> tuple:
    """Where the h*w spatially masked maps are non-zero, as index arrays sorted by map:
    (map k, row, column, source position, weight). Map k = i*w + j keeps the feature
    vector of position (i, j): there alone ("onehot"), or spread over its 3x3
    neighbourhood with the weights GAUSSIAN, cut at the border ("gaussian")."""
    if mask not in RECIPRO_MASKS:
        raise ValueError(f"reciprocam_mask must be one of {', '.join(RECIPRO_MASKS)}, got {mask!r}")
    ii, jj = np.divmod(np.arange(h * w), w)
    offsets = [(0, 0, 1.0)] if mask == "onehot" else [(dy, dx, GAUSSIAN[dy + 1, dx + 1])
                                                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    parts = []
    for dy, dx, weight in offsets:
        y, x = ii + dy, jj + dx
        ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        k = np.flatnonzero(ok)
        parts.append((k, y[ok], x[ok], k, np.full(len(k), weight, np.float32)))
    k, y, x, src, weight = (np.concatenate(p) for p in zip(*parts))
    order = np.argsort(k, kind="stable")
    return k[order], y[order], x[order], src[order], weight[order]


def reciprocam_maps(model, features: np.ndarray, mask: str = "onehot", batch: int | None = RECIPRO_BATCH,
                    entries: tuple | None = None) -> np.ndarray:
    """Recipro-CAM for every class at once: (N, classes, h, w), the head's softmax scores of
    the h*w spatially masked copies of each image's feature map, `batch` masked maps per
    head call (0 or None: all h*w of an image in one call)."""
    n, h, w, c = features.shape
    hw = h * w
    batch = hw if not batch else max(1, min(int(batch), hw))
    k, y, x, src, weight = entries if entries is not None else mosaic_entries(h, w, mask)
    bounds = np.searchsorted(k, np.arange(0, hw + batch, batch))  # entries of maps [s, s + batch)
    buf = np.zeros((batch, h, w, c), np.float32)  # cleared after each call: only the entries are written
    out = None
    for i in range(n):
        flat = np.ascontiguousarray(features[i], np.float32).reshape(hw, c)
        scores = []
        for chunk, s in enumerate(range(0, hw, batch)):
            e = slice(bounds[chunk], bounds[chunk + 1])
            size = min(batch, hw - s)
            buf[k[e] - s, y[e], x[e]] = flat[src[e]] * weight[e, None]
            scores.append(model.head(buf[:size], "probabilities"))
            buf[k[e] - s, y[e], x[e]] = 0.0
        probs = np.concatenate(scores)
        if out is None:
            out = np.empty((n, hw, probs.shape[1]), np.float32)
        out[i] = probs
    return out.transpose(0, 2, 1).reshape(n, -1, h, w)


@register("reciprocam")
def reciprocam(a: CamInputs):
    """Recipro-CAM (Byun & Lee, "Recipro-CAM: Fast gradient-free visual explanations for
    convolutional neural networks", arXiv 2209.14074, 2022; CVPR-W 2024), gradient-free: for
    each feature position (i, j) the feature map masked to that position, F * M^(i,j), runs
    through the head (model.head.onnx); the softmax score of the target at (i, j) is the map
    (the paper then min-max normalises it, as every heatmap here is). The h*w masked maps go
    through the head together, and give every class's map at once (reciprocam_maps).
    Option `reciprocam_mask`: "onehot" (default: the paper's spatial mask, as the authors'
    code cited by the paper and OpenVINO-XAI's CNN Recipro-CAM use it) or "gaussian" (the
    authors' first implementation: the position's features spread over its 3x3 neighbourhood
    with weights 1/4, 1/8, 1/16). `reciprocam_batch`: masked maps per head call (default
    RECIPRO_BATCH; 0: all h*w at once). With the one-hot mask, an export whose head begins
    with a pooling or Flatten + dense layer has model.recipro.onnx (export/recipro.py): the
    same scores from the features alone, no masked maps written."""
    if not a.model.meta.get("head_file"):
        raise MethodError("method 'reciprocam' runs masked feature maps through the head graph (model.head.onnx), "
                          "and this export has none (its head also reads the image); use another method")
    mask = a.options.get("reciprocam_mask") or "onehot"
    h, w = a.features.shape[1:3]
    fast = a.model.recipro(a.features) if mask == "onehot" and a.primary else None
    if fast is not None:   # model.recipro.onnx: the same scores without the h*w masked maps
        return fast[np.arange(len(a.targets)), :, a.targets].reshape(-1, h, w)
    key = ("reciprocam", h, w, mask)
    if key not in a.cache:
        a.cache[key] = mosaic_entries(h, w, mask)
    from explicam.runtime.model import ModelError

    try:
        maps = reciprocam_maps(a.model, a.features, mask, a.options.get("reciprocam_batch", RECIPRO_BATCH),
                               a.cache[key])
    except ModelError as exc:  # the head file was not copied, or belongs to another export
        raise MethodError(f"method 'reciprocam': {exc}") from None
    return maps[np.arange(len(a.targets)), a.targets]


# --- RISE --------------------------------------------------------------------------------
class RiseMasks:
    """RISE's N random masks for an (H, W) input, drawn as the authors' code draws them:
    an s x s grid of cells, each 1 with probability p, upsampled bilinearly to (s + 1) * cell
    pixels (cell = ceil(H / s)) and cropped to (H, W) at a random shift of 0..cell-1 pixels.
    The draws (grids and shifts, from numpy's default_rng(seed)) happen once; the masks
    themselves are kept whole when they fit in RISE_FULL_CACHE_BYTES, else made again chunk
    by chunk (the same values: bilinear upsampling of the same grids). Pixel i centred at
    i, edges held (cv2's INTER_LINEAR; the authors' skimage resize reflects at the border,
    which differs only within half a cell of the upsampled grid's edge)."""

    def __init__(self, n: int, cells: int, p: float, seed: int, hw, k, cache_bytes: int = RISE_FULL_CACHE_BYTES):
        if int(n) < 1 or int(cells) < 1 or not 0 < float(p) <= 1:
            raise ValueError(f"RISE needs rise_masks >= 1, rise_cells >= 1 and 0 < rise_p <= 1; got {n}, {cells}, {p}")
        self.n, self.cells, self.p, self.hw, self.k = int(n), int(cells), float(p), (int(hw[0]), int(hw[1])), k
        rng = np.random.default_rng(int(seed))
        self.grids = (rng.random((self.n, self.cells, self.cells)) < self.p).astype(np.float32)
        self.cell = tuple(math.ceil(d / self.cells) for d in self.hw)
        self.shifts = np.stack([rng.integers(0, c, self.n) for c in self.cell], axis=1)
        self.up = tuple((self.cells + 1) * c for c in self.cell)
        whole = self.n * self.hw[0] * self.hw[1] * 4 <= cache_bytes
        self.full = self._make(0, self.n) if whole else None

    @classmethod
    def given(cls, masks: np.ndarray, p: float) -> "RiseMasks":
        """A fixed mask set (N, H, W) in [0, 1] drawn elsewhere, with its probability p."""
        self = cls.__new__(cls)
        self.full = np.ascontiguousarray(masks, np.float32)
        if self.full.ndim != 3 or not 0 < float(p) <= 1:
            raise ValueError(f"rise_mask_set must be (N, H, W) and 0 < rise_p <= 1; got {self.full.shape}, {p}")
        self.n, self.hw, self.p = len(self.full), self.full.shape[1:], float(p)
        return self

    def _make(self, start: int, stop: int) -> np.ndarray:
        (H, W), up = self.hw, self.k.upsample_bilinear(self.grids[start:stop], *self.up)
        out = np.empty((stop - start, H, W), np.float32)
        for j, (dy, dx) in enumerate(self.shifts[start:stop]):
            out[j] = up[j, dy:dy + H, dx:dx + W]
        return out

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """Masks start..stop-1, (K, H, W) float32 in [0, 1]."""
        stop = min(stop, self.n)
        return self.full[start:stop] if self.full is not None else self._make(start, stop)


def rise_options(options: dict) -> tuple:
    """(N, s, p, seed) from the explain options, the defaults where not given."""
    o = {k: (options.get(k) if options.get(k) is not None else v) for k, v in RISE_DEFAULTS.items()}
    return int(o["rise_masks"]), int(o["rise_cells"]), float(o["rise_p"]), int(o["rise_seed"])


def rise_saliency(model, inputs: np.ndarray, targets, masks: RiseMasks, batch: int, k) -> np.ndarray:
    """sum_i P_c(I * M_i) M_i / (N p) for each image I and its class c: (n, H, W) float32.
    Masks go chunk by chunk (each made once for all the images); per image one classifier
    call per chunk of `batch` masked copies."""
    n, (H, W) = len(inputs), masks.hw
    sal = np.zeros((n, H * W), np.float64)
    buf = np.empty((batch, H, W, inputs.shape[3]), np.float32)
    for start in range(0, masks.n, batch):
        m = masks.chunk(start, start + batch)
        for i in range(n):
            probs = model.probabilities(k.masked_inputs(inputs[i], m, out=buf[:len(m)]), batch)
            sal[i] += k.mask_weighted_sum(m, probs[:, targets[i]]).reshape(-1)
    return (sal / (masks.n * masks.p)).reshape(n, H, W).astype(np.float32)


@register("rise")
def rise(a: CamInputs):
    """RISE (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018): S_c = sum_i P_c(I * M_i) M_i / (N p) over N random masks
    (RiseMasks), P the classifier's class probability; masked pixels go to 0 in the model's
    [0, 1] RGB input (black). Options: `rise_masks` N (default 1000, as OpenVINO-XAI's
    example; the paper used 4000 and 8000 on ImageNet networks), `rise_cells` s (8), `rise_p`
    p (0.5), `rise_seed` (0). The mask set is drawn once per (N, s, p, seed, input size) and
    kept by the explainer. It needs nothing but the classifier (model.forward.onnx, else the
    main graph; or any ONNX classifier, runtime/plain.py), and returns its map at the
    input's resolution (N, H, W), drawn there as it is. `rise_mask_set`: a fixed (N, H, W)
    mask set instead of the random one (with `rise_p`, the p it was drawn with)."""
    n_masks, cells, p, seed = rise_options(a.options)
    hw = a.inputs.shape[1:3]
    batch = int(a.options.get("batch_size", 32))
    if a.options.get("rise_mask_set") is not None:
        masks = RiseMasks.given(a.options["rise_mask_set"], p)
        if masks.hw != tuple(hw):
            raise ValueError(f"rise_mask_set is {masks.hw[0]}x{masks.hw[1]}; the input is {hw[0]}x{hw[1]}")
        return rise_saliency(a.model, a.inputs, a.targets, masks, batch, a.k)
    key = ("rise", n_masks, cells, p, seed, tuple(hw), a.k.backend)
    if key not in a.cache:
        a.cache[key] = RiseMasks(n_masks, cells, p, seed, hw, a.k)
    return rise_saliency(a.model, a.inputs, a.targets, a.cache[key], batch, a.k)
