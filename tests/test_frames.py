"""camkernels.shrink_area (camkernels/frames.py): a camera frame shrunk to the model input,
against the area average written out, cv2's INTER_AREA, and its numpy twin."""
import cv2
import numpy as np
import pytest

from explicam import camkernels as ck
from explicam.camkernels import kernels as K

BACKENDS = ["numpy"] + ([] if K.NUMBA_ERROR else ["numba"])


def area_loop(img, out_h, out_w):
    """Each output pixel: the mean of the source over its cell [o*sy, (o+1)*sy) x [p*sx, (p+1)*sx),
    every source pixel weighted by the area it shares with the cell (float64, then rounded)."""
    h, w = img.shape[:2]
    sy, sx = h / out_h, w / out_w
    out = np.zeros((out_h, out_w, img.shape[2]))
    for o in range(out_h):
        for p in range(out_w):
            y0, y1, x0, x1 = o * sy, (o + 1) * sy, p * sx, (p + 1) * sx
            acc = 0.0
            for i in range(int(np.floor(y0)), min(h, int(np.ceil(y1)))):
                wy = min(i + 1, y1) - max(i, y0)
                for j in range(int(np.floor(x0)), min(w, int(np.ceil(x1)))):
                    acc = acc + wy * (min(j + 1, x1) - max(j, x0)) * img[i, j].astype(np.float64)
            out[o, p] = acc / (sy * sx)
    return np.floor(out + 0.5).astype(np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src,dst", [((48, 64), (16, 16)), ((108, 192), (23, 23)), ((30, 31), (15, 9)),
                                     ((21, 21), (21, 21)), ((40, 50), (7, 50))])
def test_shrink_area_matches_the_definition_and_cv2(backend, src, dst):
    ns = ck.get(backend)
    rng = np.random.default_rng(12)
    img = cv2.GaussianBlur(rng.integers(0, 256, src + (3,), dtype=np.uint8), (0, 0), 1.5)
    cv2.rectangle(img, (3, 2), (src[1] // 2, src[0] // 2), (255, 0, 40), -1)  # sharp edges too
    got = ns.shrink_area(img, *dst)
    assert got.dtype == np.uint8 and got.shape == dst + (3,)
    for ref in (area_loop(img, *dst), cv2.resize(img, dst[::-1], interpolation=cv2.INTER_AREA)):
        diff = np.abs(got.astype(int) - ref)
        # float32 sums: a rounding level at most, where the exact mean sits on a .5 tie or next to it
        assert diff.max() <= 1 and diff.mean() < 0.05
    assert np.array_equal(ns.shrink_area(img, *dst, swap_rb=True), got[..., ::-1])
    if src == dst:
        assert np.array_equal(got, img)


def test_shrink_area_twins_channels_and_validation():
    rng = np.random.default_rng(13)
    for shape, dst in (((480, 640, 3), (128, 128)), ((60, 50, 1), (7, 9)), ((33, 40, 4), (20, 11))):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        outs = [ck.get(b).shrink_area(img, *dst) for b in BACKENDS]
        assert all(np.abs(o.astype(int) - outs[0]).max() <= 1 for o in outs)
        ref = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_AREA).reshape(dst + (shape[2],))
        assert np.abs(outs[-1].astype(int) - ref).max() <= 1
    ns = ck.get()
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            ns.shrink_area(bad, 4)
    with pytest.raises(ValueError, match="only shrinks"):
        ns.shrink_area(np.zeros((8, 8, 3), np.uint8), 9)
    with pytest.raises(ValueError):
        ns.shrink_area(np.zeros((8, 8, 3), np.uint8), 0)
