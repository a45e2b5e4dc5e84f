"""Methods from gradients with respect to the image, and multi-layer Layer-CAM.

The input gradients come from the export's side file model.inputgrads.onnx (`export
--input-grads`: the whole network and the preprocessing differentiated by explicam,
export/input_grads.py), through OnnxModel.input_gradients; a file without it makes these
methods say so in one line. Every map here is at the input's resolution (N, H, W), like
RISE's: the explainer draws it as it is (runtime/placement.py: no placement moves it).
Registered in runtime/methods.py's METHODS like every method.

Per-pixel maps reduce the three colour channels as Simonyan et al. do: max_c |g_c|.
"""
from __future__ import annotations

import cv2
import numpy as np

from explicam.runtime.methods import CamInputs, MethodError, register

INPUT_GRAD_METHODS = ("saliency", "smoothgrad", "integrated-gradients", "guided-gradcam")
# what needs no feature map: when a call asks for these alone the explainer skips the main graph and
# takes logits and the targets' input gradients from model.inputgrads.onnx (one pass, not two)
FEATURE_FREE = ("saliency", "smoothgrad", "integrated-gradients")
SMOOTHGRAD_DEFAULTS = {"smoothgrad_samples": 50, "smoothgrad_noise": 0.15, "smoothgrad_seed": 0}
IG_DEFAULTS = {"ig_steps": 50, "ig_baseline": "black", "ig_method": "trapezoid", "ig_seed": 0}
IG_BASELINES = ("black", "white", "blur", "noise")
IG_METHODS = ("trapezoid", "midpoint", "left", "right")
# Pixels per input-gradient call: the backward pass keeps every layer's map, and above about two
# 224 px images per call they leave the cache (one thread, kernel-4 seed net: 15.7 ms per image at
# 1 and 2 images per call, 18.0-18.4 at 4 to 16). Option `input_grads_batch`: images per call.
INPUT_GRAD_PIXELS = 2 * 224 * 224
# Two calls or more run as one-thread pipelines, one call per core at a time (run_calls), each call
# this many pixels: a 224 px image. Against one session on both cores, in its best calls of 2, on
# 2 cores (onnxruntime 1.32, 16 images, interleaved): the seed's kernel-4 saliency 7.7 against 9.1
# ms per image, EfficientNet-Lite0's 11.0 against 11.9; in pipelines, calls of 2 were slower
# (7.9, 12.4). A backward pass is a chain of many small, memory-bound ops, and two threads
# splitting each one wait on each other at every op; one image per core does not. Option
# `input_grads_pipelines`: how many (1: every call on the model's one session, as before 2026-12-04).
PIPELINE_PIXELS = 224 * 224


def _option(a: CamInputs, name: str, defaults: dict):
    value = a.options.get(name)
    return defaults[name] if value is None else value


def _plan(model, images: int, hw, batch=None, pipelines=None) -> tuple[int, int]:
    """(images per call, pipelines) for `images` inputs of size hw: pipelines > 1 where the model
    may use several threads (or `pipelines` says how many) and the inputs make two calls of
    PIPELINE_PIXELS or more."""
    pipelined = max(1, int(batch or PIPELINE_PIXELS // int(np.prod(hw))))
    workers = int(pipelines) if pipelines is not None else int(getattr(model, "workers", 1))
    if workers < 1:
        raise ValueError(f"input_grads_pipelines must be >= 1, got {pipelines}")
    if workers > 1 and images > pipelined:
        return pipelined, min(workers, -(-images // pipelined))
    return max(1, int(batch or INPUT_GRAD_PIXELS // int(np.prod(hw)))), 1


def run_calls(model, calls: list, pipelines: int = 1, guided: bool = False) -> list:
    """OnnxModel.input_gradients of each (x, targets) of `calls`, in order; pipelines > 1: in
    that many threads over a one-thread session (shared: onnxruntime's run is thread-safe)."""
    if pipelines < 2 or len(calls) < 2:
        return [model.input_gradients(x, t, guided) for x, t in calls]
    model.input_grads_session(guided, threads=1)   # opened here, not by two threads at once
    return list(model.pipeline_pool(pipelines).map(lambda c: model.input_gradients(c[0], c[1], guided, threads=1), calls))


def input_gradients(model, x: np.ndarray, targets, guided: bool = False, batch=None, pipelines=None) -> dict:
    """OnnxModel.input_gradients over many images, a few per call (_plan), in pipelines where
    there are two calls or more."""
    size, pipes = _plan(model, len(x), x.shape[1:3], batch, pipelines)
    targets = np.asarray(targets)
    parts = run_calls(model, [(x[s:s + size], targets[s:s + size]) for s in range(0, len(x), size)], pipes, guided)
    if len(parts) == 1:   # one call (a frame, a few images): its arrays as they came, no copy
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _needs_input_grads(a: CamInputs, method: str):
    if not getattr(a.model, "has_input_grads", False):
        raise MethodError(f"method '{method}' needs input gradients, which this export does not have: "
                          "re-export the model with --input-grads")


def _gradients(a: CamInputs, method: str, x: np.ndarray, targets, guided: bool = False) -> tuple:
    """(d logits[target] / d x (M, H, W, 3) float32, logits (M, classes))."""
    _needs_input_grads(a, method)
    out = input_gradients(a.model, x, targets, guided, a.options.get("input_grads_batch"),
                          a.options.get("input_grads_pipelines"))
    return out["input_grads"], out["logits"]


def _sample_calls(a: CamInputs, method: str, samples: int, target: int, fill, use):
    """One image's `samples` inputs through the input-gradient file, a round of calls at a time
    (_plan: in pipelines, a call per thread): fill(buf, s, e) writes samples s..e-1 into buf,
    use(g, logits, s, e) takes each call's gradients and logits, in sample order. One round's
    arrays at a time, not all of an image's samples at once: with the default 50 at 224 px,
    numpy's peak per image fell from 61 MB to 4 (SmoothGrad) and from 66 to 6 (IG; tracemalloc,
    EfficientNet-Lite0), what an edge board feels; the time per sample did not change
    (interleaved against the old code, 4 images)."""
    _needs_input_grads(a, method)
    batch, pipes = _plan(a.model, samples, a.inputs.shape[1:3], a.options.get("input_grads_batch"),
                         a.options.get("input_grads_pipelines"))
    round_ = batch * pipes
    buf = np.empty((min(round_, samples), *a.inputs.shape[1:]), np.float32)
    targets = np.full(batch, target, np.int64)
    for s in range(0, samples, round_):
        e = min(s + round_, samples)
        fill(buf[:e - s], s, e)
        starts = range(s, e, batch)
        calls = [(buf[k - s:min(k + batch, e) - s], targets[:min(k + batch, e) - k]) for k in starts]
        for k, out in zip(starts, run_calls(a.model, calls, pipes)):
            use(out["input_grads"], out["logits"], k, min(k + batch, e))


@register("saliency")
def saliency(a: CamInputs):
    """Gradient saliency (Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks:
    Visualising Image Classification Models and Saliency Maps", ICLR-W 2014, section 3):
    M_ij = max_c |d S_c / d I_ijc|, the class score's gradient with respect to the image
    (pre-softmax score), one forward and one backward pass."""
    g = a.input_grads if a.input_grads is not None else _gradients(a, "saliency", a.inputs, a.targets)[0]
    return a.k.channel_max_abs(g)


def smoothgrad_noise(a: CamInputs, n: int, samples: int):
    """noise(i, s, e, out): writes into out the noise to add to samples s..e-1 of image i: the
    option `smoothgrad_noise_set` as given (absolute, (S, H, W, 3) for every image or
    (n, S, H, W, 3)), else sigma_i * N(0, 1) with sigma_i = smoothgrad_noise * (max - min of
    image i), the same seeded draws for every image, drawn once per explainer (so a batch gives
    what its images give one by one). Scaled a call's samples at a time: every image's at once
    would be n x S images in memory (154 MB at batch 32 and 8 samples, 5% of the call)."""
    given = a.options.get("smoothgrad_noise_set")
    hw = a.inputs.shape[1:]
    if given is not None:
        given = np.asarray(given, np.float32)
        if given.shape[-4:] != (samples, *hw) or given.ndim not in (4, 5) or (given.ndim == 5 and len(given) != n):
            raise ValueError(f"smoothgrad_noise_set must be (S, H, W, 3) or (N, S, H, W, 3) with S = "
                             f"smoothgrad_samples = {samples} and N = {n} images per call; got {given.shape}")
        if given.ndim == 4:
            return lambda i, s, e, out: np.copyto(out, given[s:e])
        return lambda i, s, e, out: np.copyto(out, given[i, s:e])
    seed = int(_option(a, "smoothgrad_seed", SMOOTHGRAD_DEFAULTS))
    key = ("smoothgrad", samples, hw, seed)
    if key not in a.cache:
        a.cache[key] = np.random.default_rng(seed).standard_normal((samples, *hw), dtype=np.float32)
    level = float(_option(a, "smoothgrad_noise", SMOOTHGRAD_DEFAULTS))
    sigma = (level * (a.inputs.reshape(n, -1).max(axis=1) - a.inputs.reshape(n, -1).min(axis=1))).astype(np.float32)
    base = a.cache[key]
    return lambda i, s, e, out: np.multiply(base[s:e], sigma[i], out=out)


@register("smoothgrad")
def smoothgrad(a: CamInputs):
    """SmoothGrad (Smilkov, Thorat, Kim, Viegas & Wattenberg, "SmoothGrad: removing noise by
    adding noise", ICML-W 2017, eq. 3): the gradient averaged over `smoothgrad_samples` copies
    of the image with Gaussian noise, M = 1/n sum_k d S_c(x + N(0, sigma^2)) / dx, sigma =
    `smoothgrad_noise` * (x_max - x_min) (the paper's noise level; default 0.15 and n = 50,
    in its 10-20% range), noise seeded by `smoothgrad_seed`; then max_c |.| as saliency.
    `smoothgrad_noise_set` gives the noise itself (smoothgrad_noise above). Costs n saliency
    passes; the copies of all the images go through in batches."""
    n = len(a.inputs)
    samples = int(_option(a, "smoothgrad_samples", SMOOTHGRAD_DEFAULTS))
    if samples < 1:
        raise ValueError(f"smoothgrad_samples must be >= 1, got {samples}")
    noise = smoothgrad_noise(a, n, samples)
    out = np.empty(a.inputs.shape[:3], np.float32)
    for i in range(n):   # one image's copies at a time: 32 images x 50 copies at 224 px would be 1 GB
        total = np.zeros(a.inputs.shape[1:], np.float64)

        def fill(buf, s, e, i=i):
            noise(i, s, e, buf)
            buf += a.inputs[i]

        def use(g, logits, s, e, total=total):
            for row in g:   # in sample order, in float64: what g.mean(axis=0, dtype=float64) sums
                total += row

        _sample_calls(a, "smoothgrad", samples, a.targets[i], fill, use)
        out[i] = a.k.channel_max_abs((total / samples)[None])[0]
    return out


def ig_schedule(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of the path integral's quadrature on [0, 1]: `trapezoid` (the
    composite rule, steps points from 0 to 1, weights 1/(steps-1) halved at the ends; Captum's
    riemann_trapezoid weighs them 1/steps, which sums to (steps-1)/steps), `midpoint`, `left`,
    `right` (the paper's eq. 3), steps points each."""
    if method not in IG_METHODS:
        raise ValueError(f"ig_method must be one of {', '.join(IG_METHODS)}, got {method!r}")
    if steps < (2 if method == "trapezoid" else 1):
        raise ValueError(f"ig_steps must be >= {2 if method == 'trapezoid' else 1} for {method}, got {steps}")
    if method == "trapezoid":
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, steps), w
    k = np.arange(steps, dtype=np.float64)
    start = {"midpoint": 0.5, "left": 0.0, "right": 1.0}[method]
    return (k + start) / steps, np.full(steps, 1.0 / steps)


def ig_baseline(a: CamInputs) -> np.ndarray:
    """x' (N, H, W, 3): `ig_baseline_image` when given (one image or one per image), else
    black (0), white (1), blur (a Gaussian of sigma 5 px at 224 px, as RISE's insertion
    start and `evaluate`) or noise (uniform, seeded by ig_seed) in the model's value range."""
    x, (lo, hi) = a.inputs, a.model.value_range
    given = a.options.get("ig_baseline_image")
    if given is not None:
        return np.broadcast_to(np.asarray(given, np.float32), x.shape).astype(np.float32)
    kind = _option(a, "ig_baseline", IG_DEFAULTS)
    if kind == "black":
        return np.full_like(x, lo)
    if kind == "white":
        return np.full_like(x, hi)
    if kind == "blur":
        sigma = 5.0 * x.shape[1] / 224.0
        return np.stack([cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT) for img in x])
    if kind == "noise":
        rng = np.random.default_rng(int(_option(a, "ig_seed", IG_DEFAULTS)))
        return np.broadcast_to(rng.uniform(lo, hi, x.shape[1:]).astype(np.float32), x.shape).copy()
    raise ValueError(f"ig_baseline must be one of {', '.join(IG_BASELINES)}, got {kind!r}")


def integrated_gradients_attributions(a: CamInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(attributions (N, H, W, 3), F(x), F(x')): (x - x') * sum_k w_k grad F(x' + alpha_k (x - x'))."""
    n = len(a.inputs)
    base = ig_baseline(a)
    alphas, weights = ig_schedule(int(_option(a, "ig_steps", IG_DEFAULTS)), _option(a, "ig_method", IG_DEFAULTS))
    attr, f_base = np.empty(a.inputs.shape, np.float64), np.empty(n, np.float64)
    a32 = alphas.astype(np.float32)[:, None, None, None]
    for i in range(n):   # one image's path at a time (all of a batch's would not fit in memory)
        x, x0 = a.inputs[i], base[i].astype(np.float32)
        diff, total = x - x0, np.zeros(x.shape, np.float64)

        def fill(buf, s, e, x=x, x0=x0, diff=diff):
            np.multiply(a32[s:e], diff, out=buf)
            buf += x0   # x' + alpha (x - x')
            buf[alphas[s:e] == 1.0] = x   # the end of the path is the image itself, bit for bit

        def use(g, logits, s, e, i=i, total=total):
            # a kernel pass, not np.tensordot: that is OpenBLAS, whose threads stay awake after it
            # and slowed the next onnxruntime calls by a quarter (2 cores); numpy's point-by-point
            # sum took 3.5 ms per image of 8 points at 224 px, 5% of IG at batch 32 (0.35 here)
            a.k.path_accumulate(total, g, weights[s:e])
            if s == 0:
                f_base[i] = logits[0, a.targets[i]]

        _sample_calls(a, "integrated-gradients", len(alphas), a.targets[i], fill, use)
        attr[i] = total * diff
    if alphas[0] != 0.0:   # the baseline is not on the path: its score takes one more pass
        _, base_logits = _gradients(a, "integrated-gradients", base, a.targets)
        f_base = base_logits[np.arange(n), a.targets].astype(np.float64)
    return attr, a.logits[np.arange(n), a.targets].astype(np.float64), f_base


@register("integrated-gradients")
def integrated_gradients(a: CamInputs):
    """Integrated Gradients (Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep
    Networks", ICML 2017): IG_i = (x_i - x'_i) * integral_0^1 d F(x' + a (x - x')) / d x_i da,
    F the target's pre-softmax score, by a Riemann sum of `ig_steps` points (default 50; the
    paper: 20 to 300) with `ig_method` trapezoid (default), midpoint, left or right (eq. 3),
    from the baseline `ig_baseline` (black, white, blur, noise; `ig_baseline_image`: given).
    The map is the attributions summed over the colour channels (signed: the explainer's ReLU
    keeps the evidence for the class). Completeness (the paper's axiom: the attributions add up
    to F(x) - F(x')) is reported per image in Explanation.notes: ig_sum, ig_score_difference,
    ig_delta = ig_sum - ig_score_difference (Captum's convergence delta), ig_completeness =
    |ig_delta| / |ig_score_difference| (the relative error `explain` writes); more steps shrink it."""
    attr, f_x, f_base = integrated_gradients_attributions(a)
    total = attr.reshape(len(attr), -1).sum(axis=1)
    delta = total - (f_x - f_base)
    a.notes.update(ig_sum=total, ig_score_difference=f_x - f_base, ig_delta=delta,
                   ig_completeness=np.abs(delta) / np.maximum(np.abs(f_x - f_base), 1e-12))
    return attr.sum(axis=-1).astype(np.float32)


@register("guided-gradcam")
def guided_gradcam(a: CamInputs):
    """Guided Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017, section 3.1): guided backpropagation (Springenberg
    et al. 2015; the export's guided ReLU rule, export/autodiff_more.py) times the Grad-CAM map
    upsampled to the input (bilinear, each cell where the explainer places it), point by
    point; max_c |.| over the colour channels."""
    gb, _ = _gradients(a, "guided-gradcam", a.inputs, a.targets, guided=True)
    cam = a.k.weighted_sum(a.features, a.k.channel_mean(a.grads), relu=True)
    return a.k.channel_max_abs(gb) * a.upsample(cam, None)


# --- multi-layer Layer-CAM -------------------------------------------------------------------
LAYERCAM_GAMMA = 2.0


def layercam_fused(a: CamInputs):
    """Layer-CAM over several layers (Jiang, Zhang, Hou, Cheng & Wei, "LayerCAM: Exploring
    Hierarchical Class Activation Maps for Localization", IEEE TIP 2021, section III-C): each
    layer's map M = ReLU(sum_k relu(g^k) * A^k) divided by its maximum; the shallower layers'
    (all but the one of fewest cells) scaled by eq. 9, tanh(gamma * M / max M), gamma =
    `layercam_gamma` (2, the paper's); each upsampled to the input where its cells look; fused
    by the element-wise maximum (`layercam_fuse`: max, the paper's and torchcam's, or sum)."""
    gamma = float(a.options.get("layercam_gamma") or LAYERCAM_GAMMA)
    fuse = a.options.get("layercam_fuse") or "max"
    if fuse not in ("max", "sum"):
        raise ValueError(f"layercam_fuse must be max or sum, got {fuse!r}")
    deepest = min(range(len(a.layers)), key=lambda i: np.prod(a.layers[i][1].shape[1:3]))
    out = None
    for i, (layer, feats, grads) in enumerate(a.layers):
        m = a.k.relu(a.k.grad_product_sum(feats, grads, True))
        peak = m.reshape(len(m), -1).max(axis=1)
        m = m / np.where(peak > 0, peak, 1.0).astype(np.float32)[:, None, None]
        if i != deepest:
            m = np.tanh(gamma * m).astype(np.float32)
        up = a.upsample(m, layer)
        out = up if out is None else (np.maximum(out, up) if fuse == "max" else out + up)
    return out
