"""Per-pixel kernels for class activation maps, jitted with numba, with a numpy fallback.

    from explicam import camkernels as ck
    ck.warmup()                                   # compile now, not on the first frame
    w = ck.channel_mean(grads)                    # Grad-CAM weights (N, C)
    cam = ck.relu(ck.weighted_sum(acts, w))       # (N, h, w)
    cam = ck.normalize_minmax(ck.upsample_bilinear(cam, 224, 224))
    cam = ck.upsample_placed(cam, 224, 224, 16, 23, 16, 23)   # each cell at its receptive field's centre
    heat = ck.heatmap_placed(cam, 224, 224, 16, 23, 16, 23)   # normalize_minmax(upsample_placed(...)), one call
    sal = ck.channel_max_abs(input_grads)         # gradient saliency: max over colours of |g|

`BACKEND` is what the module-level functions use: "numba", or "numpy" when numba cannot be
imported (a one-line notice goes to stderr once). `get("numba" | "numpy" | "auto")` returns
a namespace with the same functions bound to one backend.

Shapes: acts and grads (N, h, w, C) NHWC as the ONNX model outputs them; channel weights
(N, C); maps (N, h, w). Inputs of any float dtype or memory layout are accepted (they are
copied to C-contiguous float32 only when needed); every result is a new float32 array.
This package imports numpy and numba only (edge devices have no TensorFlow).
"""
from __future__ import annotations

import glob
import hashlib
import operator
import os
import sys
import types

import numpy as np


def _drop_stale_cache(here: str | None = None) -> None:
    """numba's on-disk cache (cache=True) checks each kernel against its own file only: one that
    calls a kernel of another file (placement.heatmap_placed_nb -> kernels._minmax_rows) keeps
    the callee's old machine code after that file changes, in a checkout after an edit or a
    pull. So the cache carries a digest of every kernel file and is dropped when it changes.
    A read-only install has no cache to keep here; nothing is done then."""
    here = here or os.path.dirname(os.path.abspath(__file__))
    cache = os.path.join(here, "__pycache__")
    digest = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(here, "*.py"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    stamp = os.path.join(cache, "numba-sources.sha1")
    try:
        with open(stamp) as f:
            if f.read() == digest.hexdigest():
                return
    except OSError:
        pass
    try:
        for old in glob.glob(os.path.join(cache, "*.nbi")) + glob.glob(os.path.join(cache, "*.nbc")):
            os.remove(old)
        os.makedirs(cache, exist_ok=True)
        tmp = f"{stamp}.{os.getpid()}.tmp"   # one per process: two starting at once each write whole
        with open(tmp, "w") as f:
            f.write(digest.hexdigest())
        os.replace(tmp, stamp)
    except OSError:
        pass


_drop_stale_cache()

from explicam.camkernels import frames as _frames  # noqa: E402  (after the cache check)
from explicam.camkernels import kernels as _k  # noqa: E402
from explicam.camkernels import masks as _masks  # noqa: E402
from explicam.camkernels import placement as _placement  # noqa: E402

__all__ = [
    "BACKEND", "get", "warmup", "channel_mean", "weighted_sum", "gradcampp_weights",
    "xgradcam_weights", "grad_product_sum", "relu", "normalize_minmax",
    "upsample_bilinear", "upsample_placed", "heatmap_placed", "channel_max_abs", "masked_inputs", "shrink_area",
    "mask_weighted_sum", "finer_seed", "path_accumulate",
]

BACKEND = "numpy" if _k.NUMBA_ERROR else "numba"
if _k.NUMBA_ERROR:  # module code runs once per process, so this prints once
    print(f"camkernels: numba unavailable ({_k.NUMBA_ERROR}); using the slower numpy kernels",
          file=sys.stderr)


def _f32(x, name, ndim):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return x


def _pair(acts, grads):
    a = _f32(acts, "acts", 4)
    g = _f32(grads, "grads", 4)
    if a.shape != g.shape:
        raise ValueError(f"acts {a.shape} and grads {g.shape} must have the same shape (N, h, w, C)")
    return a, g


def _size(v, name):
    v = operator.index(v)
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _placed(maps, out_h, out_w, stride_y, offset_y, stride_x, offset_x) -> tuple:
    """The placed kernels' arguments, checked: (maps, out_h, out_w, scale_y, shift_y, scale_x, shift_x)."""
    x = _f32(maps, "maps", 3)
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"maps must not be empty, got shape {x.shape}")
    sy, hy = _placement.scale_shift(stride_y, offset_y)
    sx, hx = _placement.scale_shift(stride_x, offset_x)
    return x, _size(out_h, "out_h"), _size(out_w, "out_w"), sy, hy, sx, hx


def _build(backend):
    nb = backend == "numba"
    impl = {name: getattr(_k, f"{name}_{'nb' if nb else 'np'}") for name in (
        "channel_mean", "weighted_sum", "gradcampp_weights", "xgradcam_weights",
        "grad_product_sum", "relu", "normalize_minmax", "masked_inputs", "channel_max_abs", "finer_seed")}
    impl.update({name: getattr(_placement, f"{name}_{'nb' if nb else 'np'}")
                 for name in ("upsample_bilinear", "upsample_placed", "heatmap_placed")})
    impl["shrink_area"] = getattr(_frames, f"shrink_area_{'nb' if nb else 'np'}")
    impl["mask_weighted_sum"] = getattr(_masks, f"mask_weighted_sum_{'nb' if nb else 'np'}")
    impl["path_accumulate"] = getattr(_masks, f"path_accumulate_{'nb' if nb else 'np'}")

    def channel_mean(grads):
        """(N, h, w, C) -> (N, C): mean over pixels (Grad-CAM weights)."""
        return impl["channel_mean"](_f32(grads, "grads", 4))

    def weighted_sum(acts, weights, relu=False):
        """sum_k weights[n, k] * acts[n, :, :, k] -> (N, h, w); with relu, max(that, 0) in the
        same pass (what relu(weighted_sum(...)) gives, one call)."""
        a = _f32(acts, "acts", 4)
        w = _f32(weights, "weights", 2)
        if w.shape != (a.shape[0], a.shape[3]):
            raise ValueError(f"weights must be (N, C) = {(a.shape[0], a.shape[3])}, got {w.shape}")
        return impl["weighted_sum"](a, w, bool(relu))

    def gradcampp_weights(acts, grads, eps=0.0):
        """Grad-CAM++ channel weights (N, C), eq. 19 of Chattopadhay 2018.

        alpha = g^2 / (2 g^2 + sum_ij(A) g^3 + eps), 0 where the denominator is 0;
        weight_k = sum_ij alpha * relu(g). eps=1e-6 reproduces pytorch-grad-cam exactly.
        """
        a, g = _pair(acts, grads)
        return impl["gradcampp_weights"](a, g, float(eps))

    def xgradcam_weights(acts, grads):
        """XGrad-CAM channel weights (N, C): sum_ij g*A / (sum_ij A + 1e-7) (Fu 2020)."""
        a, g = _pair(acts, grads)
        return impl["xgradcam_weights"](a, g)

    def grad_product_sum(acts, grads, relu_grads):
        """sum_k g*A (HiResCAM) or, with relu_grads, sum_k relu(g)*A (Layer-CAM) -> (N, h, w)."""
        a, g = _pair(acts, grads)
        return impl["grad_product_sum"](a, g, bool(relu_grads))

    def relu(maps):
        """max(x, 0) as a new float32 array of the same shape (any shape)."""
        x = _f32(maps, "maps", np.ndim(maps))
        return impl["relu"](x.reshape(-1)).reshape(x.shape)

    def normalize_minmax(maps):
        """Scale each maps[n] to [0, 1] by (x - min) / (max - min); constant maps give zeros.

        Works per leading index for any (N, ...) array, e.g. Score-CAM's (C, H, W) channel maps.
        """
        x = _f32(maps, "maps", max(np.ndim(maps), 2))
        if x.size == 0:
            return x.copy()
        return impl["normalize_minmax"](x.reshape(x.shape[0], -1)).reshape(x.shape)

    def upsample_bilinear(maps, out_h, out_w):
        """(N, h, w) -> (N, out_h, out_w), bilinear with half-pixel centres like
        cv2.resize(..., interpolation=cv2.INTER_LINEAR), for up- and downscaling."""
        x = _f32(maps, "maps", 3)
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise ValueError(f"maps must not be empty, got shape {x.shape}")
        return impl["upsample_bilinear"](x, _size(out_h, "out_h"), _size(out_w, "out_w"))

    def upsample_placed(maps, out_h, out_w, stride_y, offset_y, stride_x, offset_x):
        """(N, h, w) -> (N, out_h, out_w) with cell j of each axis centred at output pixel
        stride * j + offset (pixel p centred at p; export/geometry.py's convention),
        bilinear in between, edge cells held beyond the outermost centres.
        stride = out/in, offset = (stride - 1) / 2 is upsample_bilinear exactly."""
        return impl["upsample_placed"](*_placed(maps, out_h, out_w, stride_y, offset_y, stride_x, offset_x))

    def heatmap_placed(maps, out_h, out_w, stride_y, offset_y, stride_x, offset_x):
        """normalize_minmax(upsample_placed(maps, ...)) in one call: the heatmaps in [0, 1]."""
        return impl["heatmap_placed"](*_placed(maps, out_h, out_w, stride_y, offset_y, stride_x, offset_x))

    def channel_max_abs(grads):
        """(N, H, W, C) -> (N, H, W): max over the last axis of |g| (gradient saliency)."""
        return impl["channel_max_abs"](_f32(grads, "grads", 4))

    def finer_seed(logits, targets, k, alpha=1.0):
        """Finer-CAM's comparison score for each image (Zhang et al. 2025): (classes (N, k + 1)
        int64: the target, then the k classes whose logits lie nearest it, ties to the lower
        index; w (N, k) float64: their softmax probabilities over (their sum + 1e-9); weights
        (N, k + 1) float64: the seed [sum w, -alpha w] of S = sum_d w_d (y_c - alpha y_d))."""
        lg = _f32(logits, "logits", 2)
        t = np.ascontiguousarray(targets, np.int64).reshape(-1)
        if len(t) != len(lg) or (len(t) and not (0 <= t.min() and t.max() < lg.shape[1])):
            raise ValueError(f"targets must be {len(lg)} class indices below {lg.shape[1]}, got {t.tolist()}")
        k = operator.index(k)
        if not 0 <= k < lg.shape[1]:
            raise ValueError(f"k must be in [0, {lg.shape[1] - 1}] for {lg.shape[1]} classes, got {k}")
        return impl["finer_seed"](lg, t, k, float(alpha))

    def masked_inputs(image, masks, out=None):
        """Score-CAM batch (K, H, W, ch): image (H, W, ch) times each mask (K, H, W).

        `out`: optional preallocated C-contiguous float32 (K, H, W, ch) array to fill (saves
        allocating ~150 MB per frame for K=256 at 224x224x3); it is returned.
        """
        img = _f32(image, "image", 3)
        m = _f32(masks, "masks", 3)
        if m.shape[1:] != img.shape[:2]:
            raise ValueError(f"masks (K, H, W) {m.shape} do not match image (H, W, ch) {img.shape}")
        shape = m.shape + img.shape[2:]
        if out is None:
            out = np.empty(shape, np.float32)
        elif (not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.float32
              or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}")
        return impl["masked_inputs"](img, m, out)

    def mask_weighted_sum(masks, weights):
        """sum_k weights[k] * masks[k] -> (H, W) float32 for masks (K, H, W) (RISE's saliency
        of one chunk of masks), accumulated in float64."""
        m = _f32(masks, "masks", 3)
        w = np.ascontiguousarray(weights, np.float32).reshape(-1)
        if len(w) != len(m):
            raise ValueError(f"{len(w)} weights for {len(m)} masks")
        return impl["mask_weighted_sum"](m.reshape(len(m), -1), w).reshape(m.shape[1:])

    def path_accumulate(acc, grads, weights):
        """acc += sum_k w_k g_k in place, in float64 in point order (Integrated Gradients' path
        sum, one call's points at a time: the calls in order give what one pass over the whole
        path gives, bit for bit): acc float64 C-contiguous shaped like one g, grads (K, ...) at
        K of the path's points, weights (K,). Returns acc."""
        g = np.ascontiguousarray(grads, np.float32)
        w = np.ascontiguousarray(weights, np.float64).reshape(-1)
        if not (isinstance(acc, np.ndarray) and acc.dtype == np.float64 and acc.flags.c_contiguous):
            raise ValueError("acc must be a C-contiguous float64 array")
        if len(w) != len(g) or g.shape[1:] != acc.shape:
            raise ValueError(f"grads {g.shape}, weights {w.shape} and acc {acc.shape} do not match")
        impl["path_accumulate"](acc.reshape(-1), g.reshape(len(g), -1), w)
        return acc

    def shrink_area(image, out_h, out_w=None, swap_rb=False):
        """(H, W, ch) uint8 -> (out_h, out_w, ch) uint8 by area averaging, the pixels of
        cv2.resize(..., interpolation=cv2.INTER_AREA) to one level; swap_rb reverses the
        channel order in the same pass (BGR frame -> RGB model input). Shrinking only."""
        img = np.ascontiguousarray(image)
        if img.dtype != np.uint8 or img.ndim != 3:
            raise ValueError(f"image must be (H, W, ch) uint8, got {img.dtype} {img.shape}")
        out_h = _size(out_h, "out_h")
        out_w = out_h if out_w is None else _size(out_w, "out_w")
        if out_h > img.shape[0] or out_w > img.shape[1]:
            raise ValueError(f"shrink_area only shrinks: {img.shape[:2]} -> {(out_h, out_w)}")
        return impl["shrink_area"](img, *_frames.area_table(img.shape[0], out_h),
                                   *_frames.area_table(img.shape[1], out_w), bool(swap_rb))

    return types.SimpleNamespace(
        backend=backend, channel_mean=channel_mean, weighted_sum=weighted_sum,
        gradcampp_weights=gradcampp_weights, xgradcam_weights=xgradcam_weights,
        grad_product_sum=grad_product_sum, relu=relu, normalize_minmax=normalize_minmax,
        upsample_bilinear=upsample_bilinear, upsample_placed=upsample_placed, heatmap_placed=heatmap_placed,
        channel_max_abs=channel_max_abs, finer_seed=finer_seed, masked_inputs=masked_inputs,
        shrink_area=shrink_area, mask_weighted_sum=mask_weighted_sum, path_accumulate=path_accumulate)


_NAMESPACES: dict[str, types.SimpleNamespace] = {}


def get(backend="auto") -> types.SimpleNamespace:
    """The kernel functions bound to "numba", "numpy" or "auto" (= BACKEND)."""
    if backend == "auto":
        backend = BACKEND
    if backend not in ("numba", "numpy"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
    if backend == "numba" and _k.NUMBA_ERROR:
        raise RuntimeError(f"camkernels: the numba backend is unavailable ({_k.NUMBA_ERROR}); "
                           "install numba or use get('numpy')")
    if backend not in _NAMESPACES:
        _NAMESPACES[backend] = _build(backend)
    return _NAMESPACES[backend]


def warmup(ns=None) -> None:
    """Run every kernel once on tiny inputs so numba compiles (or loads its on-disk cache)
    now rather than on the first video frame. Cheap for the numpy backend."""
    ns = get() if ns is None else ns
    rng = np.random.default_rng(0)
    a = rng.random((1, 3, 2, 4), dtype=np.float32)
    g = rng.standard_normal((1, 3, 2, 4), dtype=np.float32)
    w = ns.channel_mean(g)
    ns.weighted_sum(a, w)
    ns.weighted_sum(a, w, True)
    ns.gradcampp_weights(a, g)
    ns.xgradcam_weights(a, g)
    ns.grad_product_sum(a, g, True)
    m = ns.relu(ns.normalize_minmax(ns.upsample_bilinear(a[..., 0], 5, 4)))
    ns.upsample_placed(a[..., 0], 5, 4, 2.0, 1.5, 2.0, 0.5)
    ns.heatmap_placed(a[..., 0], 5, 4, 2.0, 1.5, 2.0, 0.5)
    ns.channel_max_abs(g)
    ns.finer_seed(g[0, 0], np.array([0, 3]), 2, 1.0)
    ns.masked_inputs(rng.random((5, 4, 3), dtype=np.float32), m)
    ns.shrink_area(np.zeros((7, 9, 3), np.uint8), 3, 4, True)
    ns.mask_weighted_sum(m, np.ones(len(m), np.float32))
    ns.path_accumulate(np.zeros(g.shape[1:]), g, np.ones(1))


_auto = get()
channel_mean = _auto.channel_mean
weighted_sum = _auto.weighted_sum
gradcampp_weights = _auto.gradcampp_weights
xgradcam_weights = _auto.xgradcam_weights
grad_product_sum = _auto.grad_product_sum
relu = _auto.relu
normalize_minmax = _auto.normalize_minmax
upsample_bilinear = _auto.upsample_bilinear
upsample_placed = _auto.upsample_placed
heatmap_placed = _auto.heatmap_placed
channel_max_abs = _auto.channel_max_abs
finer_seed = _auto.finer_seed
masked_inputs = _auto.masked_inputs
shrink_area = _auto.shrink_area
mask_weighted_sum = _auto.mask_weighted_sum
path_accumulate = _auto.path_accumulate
