"""Numbers for explanations: faithfulness, localisation, rank correlation, chance maps.

Every function takes heatmaps as (N, S, S) float arrays in [0, 1] at the model's input
size (what `Explanation.heatmaps` holds) and preprocessed inputs (N, S, S, 3) in the
model's value range. Perturbations are done in pixel-intensity space (the value range
mapped to [0, 1]) so "black" and "image times heatmap" mean what the papers mean for any
value range the metadata records. Nothing here imports TensorFlow or scipy: the metrics
run on the edge runtime alone.

Faithfulness
  Average Drop and Increase in Confidence -- Chattopadhay et al., "Grad-CAM++: Generalized
  Gradient-based Visual Explanations for Deep Convolutional Networks", WACV 2018, sec. 5.1:
  with Y_i^c the model's score for class c on image i and O_i^c its score on the
  explanation map E_i = image_i * heatmap_i (element-wise),
      Average Drop %           = 100/N * sum_i max(0, Y_i^c - O_i^c) / Y_i^c   (lower is better)
      Increase in Confidence % = 100/N * sum_i 1[Y_i^c < O_i^c]                (higher is better)
  Scores are softmax probabilities, as in the paper's experiments.

  Deletion and insertion -- Petsiuk, Das, Saenko, "RISE: Randomized Input Sampling for
  Explanation of Black-box Models", BMVC 2018, sec. 4.1: pixels are ranked by the heatmap,
  most important first. Deletion replaces them, `steps` equal chunks at a time, by the
  baseline and records p(c) after each chunk (lower area under the curve is better);
  insertion starts from the baseline and puts the original pixels back in the same order
  (higher AUC is better). The x axis is the fraction of pixels changed, 0..1, the AUC the
  trapezoid rule over steps+1 points. As in RISE's code, deletion replaces pixels with
  black and insertion starts from a blurred copy (a Gaussian of sigma = 5 px at 224 px,
  scaled with the input side; RISE uses an 11-tap sigma-5 kernel); either baseline can
  be "black" or "blur". Deleting to a blur is a weak test wherever colour carries the
  class (the built-in dataset: a blurred image keeps most predictions), hence black.
  Ties in the ranking (flat zero regions after the ReLU) are broken at random with a
  fixed seed, not in raster order.

Localisation
  Pointing game -- Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV
  2016 / IJCV 2018: a hit when the heatmap's maximum lies on the object. We use no
  tolerance by default (`tolerance` px dilates the mask, Zhang used 15 px at 224 px); when
  the maximum is shared by several pixels the hit is the share of them on the object, so a
  flat map scores the object's area share, i.e. chance.
  Energy-based pointing game -- Wang et al., "Score-CAM: Score-Weighted Visual Explanations
  for Convolutional Neural Networks", CVPR-W 2020, sec. 4.2:
      proportion = sum_{(i,j) in object} L(i,j) / sum_{(i,j)} L(i,j),
  with the object given by a mask or a bounding box. A uniform map gets exactly the
  object's area share, reported beside it as chance; an all-zero heatmap points nowhere
  and is scored as uniform.

Sanity
  Spearman's rank correlation (with average ranks for ties, as scipy.stats.spearmanr) is
  the similarity measure of Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS
  2018, sec. 3 (see evaluate/sanity.py for the randomisation itself).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

BASELINES = ("blur", "black")


# ---------------------------------------------------------------- pixel space
def to_unit(x: np.ndarray, value_range) -> np.ndarray:
    lo, hi = (float(v) for v in value_range)
    return (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))


def from_unit(u: np.ndarray, value_range) -> np.ndarray:
    lo, hi = (float(v) for v in value_range)
    return (u * np.float32(hi - lo) + np.float32(lo)).astype(np.float32, copy=False)


def blur_sigma(size: int) -> float:
    """RISE's sigma of 5 px at 224 px, scaled with the input side."""
    return 5.0 * size / 224.0


def baseline_images(x: np.ndarray, value_range, kind: str = "blur") -> np.ndarray:
    """The images that deletion ends with and insertion starts from (same shape as x)."""
    if kind == "black":
        return from_unit(np.zeros_like(x), value_range)
    if kind != "blur":
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {kind!r}")
    sigma = blur_sigma(x.shape[1])
    return np.stack([cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT) for img in x])


def explanation_maps(x: np.ndarray, heatmaps: np.ndarray, value_range) -> np.ndarray:
    """Chattopadhay's E = image * heatmap, in pixel-intensity space."""
    return from_unit(to_unit(x, value_range) * heatmaps[..., None].astype(np.float32), value_range)


# ---------------------------------------------------------------- faithfulness
def average_drop(p_orig: np.ndarray, p_expl: np.ndarray) -> float:
    """Average Drop %, Chattopadhay et al. 2018 (lower is better)."""
    y = np.maximum(np.asarray(p_orig, np.float64), 1e-12)
    return float(100.0 * np.mean(np.maximum(0.0, y - np.asarray(p_expl, np.float64)) / y))


def increase_in_confidence(p_orig: np.ndarray, p_expl: np.ndarray) -> float:
    """Increase in Confidence %, Chattopadhay et al. 2018 (higher is better)."""
    return float(100.0 * np.mean(np.asarray(p_orig) < np.asarray(p_expl)))


def pixel_ranks(heatmap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """rank[p] = position of pixel p when sorted most important first (random tie-break)."""
    flat = np.asarray(heatmap, np.float64).ravel()
    order = np.lexsort((rng.random(flat.size), -flat))
    ranks = np.empty(flat.size, np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks


def step_counts(n_pixels: int, steps: int) -> np.ndarray:
    """Pixels changed after each of steps+1 points: round(t * P / steps), t = 0..steps."""
    return np.rint(np.arange(steps + 1) * (n_pixels / steps)).astype(np.int64)


def perturbed_series(x: np.ndarray, base_del: np.ndarray, base_ins: np.ndarray, ranks: np.ndarray,
                     steps: int, out: np.ndarray | None = None) -> np.ndarray:
    """The interior points t = 1..steps-1 of both curves for one image:
    (2 * (steps - 1), S, S, 3), deletion images first, then insertion images; written
    into `out` when given (no temporary copies: this runs once per image and method)."""
    (h, w), n = x.shape[:2], steps - 1
    if out is None:
        out = np.empty((2 * n,) + x.shape, np.float32)
    counts = step_counts(h * w, steps)[1:-1]
    changed = (ranks.reshape(1, h, w) < counts[:, None, None])[..., None]  # (steps-1, H, W, 1)
    out[:n] = x
    np.copyto(out[:n], base_del, where=changed)
    out[n:] = base_ins
    np.copyto(out[n:], x, where=changed)
    return out


def deletion_insertion_curves(model, x, heatmaps, targets, p_orig, bases, p_bases, steps: int = 16,
                              batch_size: int = 128, seed: int = 0, progress=None):
    """Deletion and insertion curves (N, steps+1) of p(target), RISE (Petsiuk 2018).

    bases = (deletion baseline images, insertion baseline images). The end points are
    shared by every method and passed in: p_orig (the image: deletion starts and insertion
    ends there) and p_bases = (p on the deletion baseline, where deletion ends; p on the
    insertion baseline, where insertion starts). The interior points of several images go
    through onnxruntime together, `batch_size` inputs per call."""
    if steps < 2:
        raise ValueError(f"--steps must be at least 2, got {steps}")
    n = len(x)
    rng = np.random.default_rng(seed)
    deletion = np.empty((n, steps + 1), np.float64)
    insertion = np.empty((n, steps + 1), np.float64)
    deletion[:, 0], deletion[:, -1] = p_orig, p_bases[0]
    insertion[:, 0], insertion[:, -1] = p_bases[1], p_orig
    per_image = 2 * (steps - 1)
    chunk = max(1, math.ceil(batch_size / per_image))
    buffer = np.empty((min(n, chunk) * per_image,) + x.shape[1:], np.float32)
    for start in range(0, n, chunk):
        idx = range(start, min(n, start + chunk))
        for j, i in enumerate(idx):
            perturbed_series(x[i], bases[0][i], bases[1][i], pixel_ranks(heatmaps[i], rng), steps,
                             buffer[j * per_image:(j + 1) * per_image])
        inputs = buffer[:len(idx) * per_image]
        probs = model.probabilities(inputs, batch_size).reshape(len(idx), per_image, -1)
        for j, i in enumerate(idx):
            p = probs[j, :, targets[i]]
            deletion[i, 1:-1], insertion[i, 1:-1] = p[:steps - 1], p[steps - 1:]
        if progress:
            progress(len(idx))
    return deletion, insertion


def auc(curves: np.ndarray) -> np.ndarray:
    """Area under each curve (..., steps+1) over x in [0, 1], trapezoid rule."""
    c = np.asarray(curves, np.float64)
    steps = c.shape[-1] - 1
    return (c[..., :-1] + c[..., 1:]).sum(axis=-1) / (2.0 * steps)


# ---------------------------------------------------------------- localisation
def dilate(masks: np.ndarray, tolerance: int) -> np.ndarray:
    if tolerance <= 0:
        return masks
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    return np.stack([cv2.dilate(m.astype(np.uint8), k) > 0 for m in masks])


def _valid(masks: np.ndarray) -> np.ndarray:
    return masks.reshape(len(masks), -1).any(axis=1)


def object_share(masks: np.ndarray) -> np.ndarray:
    """Area share of the object per image: what a uniform map scores. NaN without object."""
    share = masks.reshape(len(masks), -1).mean(axis=1)
    return np.where(_valid(masks), share, np.nan)


def pointing_game(heatmaps: np.ndarray, masks: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """Per image: 1 when the maximum is on the object, 0 when not; the on-object share of
    the maximal pixels when several tie. NaN where the mask is empty (Zhang et al. 2016)."""
    h = heatmaps.reshape(len(heatmaps), -1)
    m = dilate(masks, tolerance).reshape(len(masks), -1)
    top = h >= h.max(axis=1, keepdims=True)
    hits = (top & m).sum(axis=1) / top.sum(axis=1)
    return np.where(_valid(masks), hits, np.nan)


def energy_pointing_game(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: share of heatmap energy on the object (Wang et al. 2020). NaN where the
    mask is empty; an all-zero heatmap scores as a uniform one (the area share)."""
    h = heatmaps.reshape(len(heatmaps), -1).astype(np.float64)
    m = masks.reshape(len(masks), -1)
    total = h.sum(axis=1)
    inside = (h * m).sum(axis=1)
    share = np.where(total > 0, inside / np.where(total > 0, total, 1.0), m.mean(axis=1))
    return np.where(_valid(masks), share, np.nan)


# ---------------------------------------------------------------- rank correlation
def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average')."""
    a = np.asarray(a).ravel()
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    first = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(np.r_[first, True])
    avg = (starts[:-1] + starts[1:] + 1) / 2.0  # mean of 1-based ranks start+1..end
    ranks = np.empty(a.size, np.float64)
    ranks[order] = avg[group]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps (flattened); NaN when either is constant, as scipy."""
    ra, rb = rankdata(a), rankdata(b)
    if ra.size != rb.size:
        raise ValueError(f"maps differ in size: {ra.size} vs {rb.size}")
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denom) if denom > 0 else float("nan")


# ---------------------------------------------------------------- chance
def random_heatmaps(n: int, feature_hw, size: int, seed: int = 0, k=None) -> np.ndarray:
    """Chance maps shaped like CAMs: uniform noise at the feature map's resolution,
    upsampled bilinearly to the input and min-max normalised (what every method does)."""
    from explicam import camkernels

    k = k or camkernels.get()
    return k.normalize_minmax(k.upsample_bilinear(random_cams(n, feature_hw, seed), size, size))


def random_cams(n: int, feature_hw, seed: int = 0) -> np.ndarray:
    """Uniform noise at the feature map's resolution (N, h, w): the chance row's CAMs."""
    h, w = feature_hw
    return np.random.default_rng(seed).random((n, h, w), dtype=np.float32)


def mask_at_cam_resolution(masks: np.ndarray, feature_hw, k=None) -> np.ndarray:
    """The ground-truth masks as the best possible CAM: averaged down to the feature map's
    h x w cells, then upsampled and normalised like every CAM. Its energy share is the
    ceiling a map of that resolution can reach (the chance share is the floor)."""
    from explicam import camkernels

    k = k or camkernels.get()
    h, w = feature_hw
    small = np.stack([cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) for m in masks])
    return k.normalize_minmax(k.upsample_bilinear(small, masks.shape[1], masks.shape[2]))


def nanmean(values) -> float:
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")
