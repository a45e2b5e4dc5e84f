"""Reading images from disk robustly: every failure becomes one clear line naming the file.

Used by training (train/data.py), the explainer CLI and the evaluation, so that a photo
is decoded the same way everywhere. OpenCV does the decoding: it converts grayscale,
RGBA, palette, 16-bit and CMYK files to 8-bit colour and applies the EXIF orientation,
so a phone photo is explained upright.
"""
from __future__ import annotations

import os
import struct

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# When the caller will shrink the image anyway, libjpeg decodes at 1/2, 1/4 or 1/8 scale,
# so a 12000x12000 photo never becomes a 432 MB array just to be shrunk to 224x224.
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
# Other formats have no scaled decoding. Above this many pixels they are decoded with
# OpenCV's 1/2 reduction (a 2x2 box average; it also spares OpenCV's second full-size
# buffer: 12000x12000 PNG peaks at ~540 MB instead of ~930 MB) and shrunk further with
# INTER_AREA, so later steps only ever see the small copy.
_SHRINK_PIXELS = 16_000_000


class ImageError(ValueError):
    """An image that cannot be used; str() is a one-line message naming the file."""


def is_image_file(path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder) -> list[str]:
    """All image files under `folder`, recursively, sorted (hidden files skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if is_image_file(f) and not f.startswith("."))
    return found


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG or JPEG header without decoding, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return w, h
            i += 2 + length
    return None


def _looks_truncated(data: bytes) -> bool:
    # libjpeg fills a truncated JPEG with grey and only warns; a real JPEG ends with the
    # EOI marker (FFD9), which cannot occur inside entropy-coded data (0xFF is stuffed).
    if data[:2] == b"\xff\xd8":
        return b"\xff\xd9" not in data[-1024:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-64:]
    return False


def decode_image(data: bytes, name: str = "<bytes>", min_side: int = 0) -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array (H, W, 3).

    `min_side`: the caller will shrink the image to this size, so a huge JPEG may be
    decoded at a reduced scale as long as its short side stays at least this large.
    """
    if len(data) == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if _looks_truncated(data):
        raise ImageError(f"{name}: truncated image file")
    flags = cv2.IMREAD_COLOR
    size = image_size_from_header(data)
    factor = _reduction(size, min_side)
    if factor > 1 and data[:2] == b"\xff\xd8":
        flags = dict(_REDUCED)[factor]
        factor = 1
    elif factor > 1 and size[0] * size[1] > _SHRINK_PIXELS:
        flags = cv2.IMREAD_REDUCED_COLOR_2
        factor //= 2
    else:
        factor = 1
    buf = np.frombuffer(data, np.uint8)
    try:
        bgr = cv2.imdecode(buf, flags)
    except cv2.error as exc:  # OpenCV raises for some corrupt headers instead of returning None
        raise ImageError(f"{name}: cannot decode image ({str(exc).strip().splitlines()[-1]})") from None
    if bgr is None or bgr.size == 0:
        raise ImageError(f"{name}: not a readable image (corrupt, truncated or not an image)")
    if bgr.ndim == 2:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    if bgr.dtype != np.uint8:  # IMREAD_COLOR already gives 8 bits; this guards odd TIFFs
        bgr = cv2.convertScaleAbs(bgr, alpha=255.0 / max(float(bgr.max()), 1.0))
    if factor > 1:  # the rest of a huge PNG's reduction
        bgr = cv2.resize(bgr, (bgr.shape[1] // factor, bgr.shape[0] // factor), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)  # in place: no second full-size copy


def _reduction(size, min_side: int) -> int:
    """The largest of 8, 4, 2 that keeps the short side at least 2 * min_side, else 1."""
    if not min_side or not size:
        return 1
    for factor, _ in _REDUCED:
        if min(size) // factor >= max(min_side, 1) * 2:
            return factor
    return 1


def read_image(path, min_side: int = 0) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); raises ImageError with a one-line message."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder, not an image")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    return decode_image(data, path, min_side=min_side)


def resize_rgb(image: np.ndarray, size) -> np.ndarray:
    """Resize to size x size (or to (h, w)) the way training did (bilinear; area when
    shrinking a lot)."""
    out_h, out_w = (size, size) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
    h, w = image.shape[:2]
    if (h, w) == (out_h, out_w):
        return image
    interp = cv2.INTER_AREA if min(h / out_h, w / out_w) > 2 else cv2.INTER_LINEAR
    return cv2.resize(image, (out_w, out_h), interpolation=interp)


def crop_box(shape, input_hw, resize_shorter: int | None = None) -> tuple:
    """The part of an image of `shape` (h, w) that the model sees, (y0, x0, y1, x1) in its
    pixels. Plain resize: all of it. Shorter-side resize (torchvision's Resize(S) then
    CenterCrop(H, W)): the centred window that becomes the model input after the image is
    scaled so its shorter side is S."""
    h, w = int(shape[0]), int(shape[1])
    if not resize_shorter:
        return 0, 0, h, w
    scale = resize_shorter / min(h, w)
    ch, cw = min(h, input_hw[0] / scale), min(w, input_hw[1] / scale)  # the window in original pixels
    y0, x0 = (h - ch) / 2, (w - cw) / 2
    return y0, x0, y0 + ch, x0 + cw


def fit_to_input(image: np.ndarray, input_hw, resize_shorter: int | None = None) -> np.ndarray:
    """An image (or mask) as the model input sees it: resized to input_hw, after the
    centre crop of a shorter-side resize when the model was trained that way."""
    if resize_shorter:
        y0, x0, y1, x1 = crop_box(image.shape, input_hw, resize_shorter)
        image = image[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))]
    return resize_rgb(image, input_hw)


def heatmap_on_photo(heatmap: np.ndarray, shape, resize_shorter: int | None = None) -> np.ndarray:
    """A heatmap at the model's input size drawn back on a photo of `shape` through the
    same resize the preprocessing used: stretched over the whole photo (plain resize), or
    over the centre window the model saw, zero outside it (shorter-side crop). A 4:3
    photo's heatmap then sits on the same object as on the model's square input."""
    h, w = int(shape[0]), int(shape[1])
    y0, x0, y1, x1 = crop_box((h, w), heatmap.shape, resize_shorter)
    if (y0, x0, y1, x1) == (0, 0, h, w):
        return cv2.resize(heatmap, (w, h), interpolation=cv2.INTER_LINEAR)
    # affine: input pixel (i, j) centre -> photo coordinates; warpAffine samples bilinearly
    sy, sx = heatmap.shape[0] / (y1 - y0), heatmap.shape[1] / (x1 - x0)
    m = np.float32([[sx, 0, (0.5 - x0) * sx - 0.5], [0, sy, (0.5 - y0) * sy - 0.5]])
    return cv2.warpAffine(heatmap.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
