"""camkernels: numba vs numpy twins, slow loop references from the papers, cv2, validation."""
import os

import cv2
import numpy as np
import pytest

from explicam import camkernels as ck
from explicam.camkernels import kernels as K

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPY = ck.get("numpy")
BACKENDS = ["numpy"] + ([] if K.NUMBA_ERROR else ["numba"])
needs_numba = pytest.mark.skipif(bool(K.NUMBA_ERROR), reason=f"numba unavailable: {K.NUMBA_ERROR}")


def close(x, ref, tol=1e-5):
    """|x - ref| <= tol * max|ref| elementwise; float32 result of the reference's shape."""
    ref = np.asarray(ref, np.float64)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32, (type(x), getattr(x, "dtype", None))
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert np.isfinite(x).all()
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-30)
    err = float(np.abs(x - ref).max(initial=0.0))
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * {scale:.3g}"


def all_kernels(ns, a, g, image=None):
    """Every kernel on (a, g) (NHWC); the results by name."""
    w = ns.channel_mean(g)
    cam = ns.weighted_sum(a, w)
    out = {
        "channel_mean": w, "weighted_sum": cam,
        "gradcampp": ns.gradcampp_weights(a, g), "gradcampp_eps": ns.gradcampp_weights(a, g, 1e-6),
        "xgradcam": ns.xgradcam_weights(a, g),
        "hirescam": ns.grad_product_sum(a, g, False), "layercam": ns.grad_product_sum(a, g, True),
        "relu": ns.relu(cam), "norm": ns.normalize_minmax(cam),
        "up": ns.upsample_bilinear(cam, 3 * cam.shape[1] + 1, 2 * cam.shape[2]),
        "down": ns.upsample_bilinear(cam, max(cam.shape[1] // 2, 1), max(cam.shape[2] // 3, 1)),
        "norm_channels": ns.normalize_minmax(np.moveaxis(np.asarray(a, np.float32)[0], -1, 0)),
    }
    if image is not None:
        masks = ns.normalize_minmax(ns.upsample_bilinear(np.moveaxis(np.asarray(a)[0], -1, 0),
                                                         image.shape[0], image.shape[1]))
        out["masked"] = ns.masked_inputs(image, masks)
    return out


def random_cases():
    rng = np.random.default_rng(7)
    for shape in [(1, 14, 14, 256), (3, 7, 5, 13), (1, 1, 1, 1), (2, 9, 11, 17), (4, 3, 14, 8)]:
        yield f"{shape}", rng.random(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    # signed activations (no ReLU before the layer): sum_ij(A) can be negative
    yield "signed", rng.standard_normal((2, 6, 6, 20)).astype(np.float32), rng.standard_normal((2, 6, 6, 20)).astype(np.float32)
    big_a = rng.random((3, 16, 12, 40), dtype=np.float32)
    big_g = rng.standard_normal((3, 16, 12, 40), dtype=np.float32)
    yield "non-contiguous", big_a[::2, 1::2, ::-1, 3:31:2], big_g[::2, 1::2, ::-1, 3:31:2]
    yield "fortran-order", np.asfortranarray(big_a[:1]), np.asfortranarray(big_g[:1])
    yield "float64", rng.random((2, 5, 6, 9)), 1e-3 * rng.standard_normal((2, 5, 6, 9))


def photo():
    """A real RGB photo as float32 in [0, 1] (sklearn or skimage sample), else a structured image."""
    img = None
    try:
        from sklearn.datasets import load_sample_images
        img = load_sample_images().images[0]
    except Exception:
        try:
            from skimage import data
            img = data.astronaut()
        except Exception:
            pass
    if img is None:  # smooth blobs, edges and a ramp, drawn with cv2
        img = np.zeros((160, 160, 3), np.uint8)
        img[:] = np.linspace(0, 120, 160, dtype=np.uint8)[None, :, None]
        cv2.circle(img, (60, 70), 35, (250, 40, 30), -1)
        cv2.rectangle(img, (95, 20), (150, 90), (20, 200, 60), -1)
        cv2.line(img, (0, 159), (159, 100), (40, 60, 255), 5)
        img = cv2.GaussianBlur(img, (0, 0), 2.0)
    return cv2.resize(img, (112, 112), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def photo_features(img, channels=48):
    """acts (1, 14, 14, C) from a bank of random 5x5 filters + ReLU + pooling; grads from Sobel."""
    rng = np.random.default_rng(3)
    acts, grads = [], []
    for _ in range(channels):
        resp = sum(cv2.filter2D(img[..., c], -1, rng.standard_normal((5, 5)).astype(np.float32))
                   for c in range(3))
        act = cv2.resize(np.maximum(resp, 0), (14, 14), interpolation=cv2.INTER_AREA)
        acts.append(act)
        grads.append(cv2.Sobel(act, cv2.CV_32F, 1, 0) * 0.01 + rng.normal(0, 1e-3))
    return np.stack(acts, -1)[None], np.stack(grads, -1)[None]


# --- numba twin == numpy twin ---------------------------------------------------------------
@needs_numba
@pytest.mark.parametrize("a,g", [pytest.param(a, g, id=name) for name, a, g in random_cases()])
def test_twins_agree_random(a, g):
    got = all_kernels(ck.get("numba"), a, g)
    want = all_kernels(NPY, a, g)
    for key in want:
        close(got[key], want[key])


@needs_numba
def test_twins_agree_photo():
    img = photo()
    a, g = photo_features(img)
    got = all_kernels(ck.get("numba"), a, g, image=img)
    want = all_kernels(NPY, a, g, image=img)
    for key in want:
        close(got[key], want[key])
    assert got["masked"].shape == (a.shape[3], 112, 112, 3)


@needs_numba
def test_elementwise_kernels_are_bit_identical():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((5, 13, 17), dtype=np.float32)
    nb = ck.get("numba")
    for f in (lambda ns: ns.relu(m), lambda ns: ns.normalize_minmax(m),
              lambda ns: ns.upsample_bilinear(m, 100, 61), lambda ns: ns.upsample_bilinear(m, 4, 7),
              lambda ns: ns.masked_inputs(m[0, :, :, None].repeat(3, -1), m)):
        assert np.array_equal(f(nb), f(NPY))


# --- against loops written from the papers' formulas --------------------------------------
def small_case(seed=0, shape=(2, 4, 5, 6)):
    rng = np.random.default_rng(seed)
    return rng.random(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcam_and_cam_against_loops(backend):
    ns = ck.get(backend)
    a, g = small_case()
    n_img, h, w, c = a.shape
    mean = np.zeros((n_img, c))
    for n in range(n_img):
        for k in range(c):
            mean[n, k] = sum(float(g[n, i, j, k]) for i in range(h) for j in range(w)) / (h * w)
    close(ns.channel_mean(g), mean)
    cam = np.zeros((n_img, h, w))
    for n in range(n_img):
        for i in range(h):
            for j in range(w):
                cam[n, i, j] = sum(float(mean[n, k]) * float(a[n, i, j, k]) for k in range(c))
    close(ns.weighted_sum(a, mean), cam)
    close(ns.relu(cam), np.maximum(cam, 0))


def gradcampp_loop(a, g, eps=0.0):
    n_img, h, w, c = a.shape
    out = np.zeros((n_img, c))
    for n in range(n_img):
        for k in range(c):
            s = sum(float(a[n, i, j, k]) for i in range(h) for j in range(w))
            for i in range(h):
                for j in range(w):
                    gv = float(g[n, i, j, k])
                    den = 2 * gv ** 2 + s * gv ** 3 + eps
                    alpha = gv ** 2 / den if den != 0 else 0.0
                    out[n, k] += alpha * max(gv, 0.0)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcampp_against_loop(backend):
    ns = ck.get(backend)
    a, g = small_case(1)
    close(ns.gradcampp_weights(a, g), gradcampp_loop(a, g))
    close(ns.gradcampp_weights(a, 1e-3 * g, eps=1e-6), gradcampp_loop(a, 1e-3 * g, 1e-6))
    # a zero denominator with g > 0: g = 0.5, sum_ij(A) = -4  ->  2/4 - 4/8 = 0 exactly
    a0 = np.zeros((1, 2, 2, 2), np.float32)
    a0[0, :, :, 0] = -1.0
    g0 = np.zeros((1, 2, 2, 2), np.float32)
    g0[0, 0, 0, 0] = 0.5
    g0[0, 1, 1, 0] = 1.0
    w0 = ns.gradcampp_weights(a0, g0)
    assert np.isfinite(w0).all()
    close(w0, gradcampp_loop(a0, g0))
    assert w0[0, 1] == 0.0  # all-zero gradients: zero weight, no NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcampp_eps_matches_pytorch_grad_cam(backend):
    # pytorch-grad-cam's grad_cam_plusplus.py, transcribed on NCHW arrays
    a, g = small_case(2, (2, 6, 6, 5))
    acts, grads = a.transpose(0, 3, 1, 2), (1e-2 * g).transpose(0, 3, 1, 2)
    gp2 = grads ** 2
    gp3 = gp2 * grads
    sum_act = np.sum(acts, axis=(2, 3))
    aij = gp2 / (2 * gp2 + sum_act[:, :, None, None] * gp3 + 0.000001)
    aij = np.where(grads != 0, aij, 0)
    ref = np.sum(np.maximum(grads, 0) * aij, axis=(2, 3))
    close(ck.get(backend).gradcampp_weights(a, 1e-2 * g, eps=1e-6), ref, tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_xgradcam_and_grad_products_against_loops(backend):
    ns = ck.get(backend)
    a, g = small_case(3)
    n_img, h, w, c = a.shape
    xw = np.zeros((n_img, c))
    for n in range(n_img):
        for k in range(c):
            s = sum(float(a[n, i, j, k]) for i in range(h) for j in range(w))
            xw[n, k] = sum(float(g[n, i, j, k]) * float(a[n, i, j, k])
                           for i in range(h) for j in range(w)) / (s + 1e-7)
    close(ns.xgradcam_weights(a, g), xw)
    hires = np.zeros((n_img, h, w))
    layer = np.zeros((n_img, h, w))
    for n in range(n_img):
        for i in range(h):
            for j in range(w):
                for k in range(c):
                    hires[n, i, j] += float(g[n, i, j, k]) * float(a[n, i, j, k])
                    layer[n, i, j] += max(float(g[n, i, j, k]), 0.0) * float(a[n, i, j, k])
    close(ns.grad_product_sum(a, g, relu_grads=False), hires)
    close(ns.grad_product_sum(a, g, relu_grads=True), layer)


def bilinear_loop(m, out_h, out_w):
    """Half-pixel-centre bilinear from the formula, in float64."""
    def taps(n_in, n_out):
        res = []
        for d in range(n_out):
            src = (d + 0.5) * n_in / n_out - 0.5
            s0 = int(np.floor(src))
            f = src - s0
            if s0 < 0:
                s0, f = 0, 0.0
            if s0 >= n_in - 1:
                s0, f = n_in - 1, 0.0
            res.append((s0, min(s0 + 1, n_in - 1), f))
        return res
    ty, tx = taps(m.shape[1], out_h), taps(m.shape[2], out_w)
    out = np.zeros((m.shape[0], out_h, out_w))
    for n in range(m.shape[0]):
        for i, (y0, y1, fy) in enumerate(ty):
            for j, (x0, x1, fx) in enumerate(tx):
                top = m[n, y0, x0] * (1 - fx) + m[n, y0, x1] * fx
                bot = m[n, y1, x0] * (1 - fx) + m[n, y1, x1] * fx
                out[n, i, j] = top * (1 - fy) + bot * fy
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_normalize_masks_against_loops(backend):
    ns = ck.get(backend)
    rng = np.random.default_rng(4)
    m = rng.standard_normal((3, 5, 7)).astype(np.float32)
    r = ns.relu(m)
    assert r is not m and not np.shares_memory(r, m)
    close(r, [[[max(v, 0.0) for v in row] for row in mp] for mp in m.tolist()])
    ref = np.array([(mp - mp.min()) / (mp.max() - mp.min()) for mp in m.astype(np.float64)])
    close(ns.normalize_minmax(m), ref)
    close(ns.upsample_bilinear(m, 11, 4), bilinear_loop(m, 11, 4))
    close(ns.upsample_bilinear(m, 2, 3), bilinear_loop(m, 2, 3))
    big = rng.standard_normal((1, 224, 224)).astype(np.float32)  # large source coordinates:
    close(ns.upsample_bilinear(big, 100, 100), bilinear_loop(big, 100, 100), tol=2e-6)  # float64 src
    img = rng.random((5, 7, 3)).astype(np.float32)
    masked = ns.masked_inputs(img, m)
    for k in range(3):
        for i in range(5):
            for j in range(7):
                close(masked[k, i, j], [img[i, j, ch] * m[k, i, j] for ch in range(3)])


# --- bilinear == cv2.resize(INTER_LINEAR) ---------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src,dst", [((14, 14), (224, 224)), ((7, 7), (100, 100)), ((5, 9), (37, 61)),
                                     ((12, 16), (224, 160)), ((224, 224), (14, 14)), ((224, 224), (100, 100)), ((50, 33), (21, 20)),
                                     ((14, 14), (14, 14)), ((1, 6), (4, 9))])
def test_bilinear_matches_cv2(backend, src, dst):
    rng = np.random.default_rng(5)
    maps = rng.standard_normal((3,) + src).astype(np.float32)
    got = ck.get(backend).upsample_bilinear(maps, *dst)
    ref = np.stack([cv2.resize(m, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR) for m in maps])
    close(got, ref, tol=1e-4)
    if src == dst:
        assert np.array_equal(got, maps)


# --- normalize_minmax --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_minmax(backend):
    ns = ck.get(backend)
    rng = np.random.default_rng(6)
    # constant, zero, huge constant, and a 1e-20 ripple (below the 1e-12 absolute floor): zeros
    maps = np.concatenate([np.full((1, 6, 7), 3.5, np.float32), np.zeros((1, 6, 7), np.float32),
                           np.full((1, 6, 7), -1e30, np.float32), rng.standard_normal((1, 6, 7)) * 1e-20,
                           rng.standard_normal((2, 6, 7)), rng.standard_normal((2, 6, 7)) * 1e20,
                           rng.standard_normal((1, 6, 7)) * 1e-3 + 7.0]).astype(np.float32)
    out = ns.normalize_minmax(maps)
    assert out.dtype == np.float32 and out.shape == maps.shape and np.isfinite(out).all()
    assert (out[:4] == 0).all()
    for o in out[4:]:
        assert o.min() == 0.0 and o.max() == 1.0
    near = np.full((1, 4, 4), 1e6, np.float32)
    near[0, 0, 0] = np.nextafter(np.float32(1e6), np.float32(2e6))  # differs by 1 ulp: not constant
    assert ns.normalize_minmax(near).max() == 1.0
    assert ns.normalize_minmax(np.zeros((0, 4, 4))).shape == (0, 4, 4)
    chans = rng.standard_normal((5, 8, 9))  # Score-CAM: per channel of (C, H, W)
    assert (ns.normalize_minmax(chans).reshape(5, -1).max(axis=1) == 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation(backend):
    ns = ck.get(backend)
    a, g = small_case()
    with pytest.raises(ValueError):
        ns.gradcampp_weights(a, g[:, :3])
    with pytest.raises(ValueError):
        ns.weighted_sum(a, np.ones((2, 5), np.float32))
    with pytest.raises(ValueError):
        ns.channel_mean(g[0])
    with pytest.raises(ValueError):
        ns.upsample_bilinear(g[..., 0], 0, 4)
    with pytest.raises(ValueError):
        ns.masked_inputs(np.ones((4, 6, 3)), np.ones((2, 4, 5)))
    with pytest.raises(ValueError):
        ns.masked_inputs(np.ones((4, 5, 3)), np.ones((2, 4, 5)), out=np.empty((2, 4, 5, 3)))
    buf = np.empty((2, 4, 5, 3), np.float32)
    assert ns.masked_inputs(np.ones((4, 5, 3)), np.full((2, 4, 5), 2.0), out=buf) is buf
    assert (buf == 2).all()
    with pytest.raises(ValueError):
        ck.get("cuda")


def test_module_level_api():
    assert ck.BACKEND in ("numba", "numpy")
    assert ck.get().backend == ck.BACKEND and ck.get() is ck.get("auto")
    assert ck.channel_mean is ck.get().channel_mean
    for name in ("channel_mean", "weighted_sum", "gradcampp_weights", "xgradcam_weights",
                 "grad_product_sum", "relu", "normalize_minmax", "upsample_bilinear", "masked_inputs",
                 "shrink_area", "heatmap_placed", "channel_max_abs"):
        assert callable(getattr(ck, name))
    for b in BACKENDS:
        ck.warmup(ck.get(b))
    ck.warmup()
