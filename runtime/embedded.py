#!/usr/bin/env python3
"""explicam on a board: explain one photo with Grad-CAM from an explicam model.onnx.

    python embedded.py model.onnx photo.jpg [--out overlay.png] [--target CLASS]

Copy this one file next to model.onnx (e.g. on a Raspberry Pi). It needs only
onnxruntime and numpy. OpenCV (or Pillow) is used when present to read JPEGs; without
either it still reads and writes PNG with zlib. numba is used when present for the
weighted sum; numpy otherwise. It repeats a little of explicam's runtime on purpose: it
must stand alone.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib

import numpy as np
import onnxruntime as ort

try:
    import cv2
except ImportError:  # boards without OpenCV
    cv2 = None
try:
    from PIL import Image, ImageOps
except ImportError:
    Image = None
try:
    import numba
except ImportError:
    numba = None


# ----------------------------------------------------------------- images without OpenCV
def _read_png(data: bytes) -> np.ndarray:
    """8-bit RGB/RGBA/gray PNG (non-interlaced) -> RGB uint8, with zlib and numpy only."""
    pos, chunks = 8, {"IDAT": b""}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        kind = kind.decode("latin1")
        chunks["IDAT" if kind == "IDAT" else kind] = chunks["IDAT"] + body if kind == "IDAT" else body
        pos += 12 + length
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks["IHDR"])
    channels = {0: 1, 2: 3, 6: 4, 4: 2}.get(ctype)
    if depth != 8 or channels is None or interlace:
        raise ValueError("only 8-bit, non-interlaced gray/RGB/RGBA PNGs can be read without OpenCV or Pillow")
    raw = np.frombuffer(zlib.decompress(chunks["IDAT"]), np.uint8).reshape(h, 1 + w * channels)
    out, prev, bpp = np.zeros((h, w * channels), np.int32), np.zeros(w * channels, np.int32), channels
    for y in range(h):  # undo the per-row PNG filters
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        else:
            cur = np.zeros_like(line)
            for x in range(len(line)):
                left = cur[x - bpp] if x >= bpp else 0
                up, ul = prev[x], prev[x - bpp] if x >= bpp else 0
                if f == 1:
                    pred = left
                elif f == 3:
                    pred = (left + up) // 2
                else:  # Paeth
                    p = left + up - ul
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else ul)
                cur[x] = (line[x] + pred) & 255
        out[y], prev = cur, cur
    img = out.astype(np.uint8).reshape(h, w, channels)
    return np.repeat(img[..., :1], 3, axis=2) if channels <= 2 else img[..., :3]


def _write_png(path: str, rgb: np.ndarray) -> None:
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def read_image(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"{path}: empty file")
    if cv2 is not None:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{path}: not a readable image")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if Image is not None:
        return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _read_png(data)
    raise ValueError(f"{path}: reading JPEG needs opencv-python or pillow; convert it to PNG or install one")


def write_image(path: str, rgb: np.ndarray) -> None:
    tmp = path + ".partial.png"  # atomic: a crash never leaves half an image
    if cv2 is not None:
        cv2.imwrite(tmp, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    else:
        _write_png(tmp, rgb)
    os.replace(tmp, path)


# ----------------------------------------------------------------- the numeric walk
def resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear with half-pixel centres (OpenCV's INTER_LINEAR), for (H, W) or (H, W, C)."""
    if cv2 is not None:
        return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    h, w = img.shape[:2]

    def coords(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, fy = coords(h, out_h)
    x0, x1, fx = coords(w, out_w)
    img = img.astype(np.float32)
    if img.ndim == 3:
        fy, fx = fy[:, None, None], fx[None, :, None]
    else:
        fy, fx = fy[:, None], fx[None, :]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def upsample_placed(m: np.ndarray, out_h: int, out_w: int, geometry: dict) -> np.ndarray:
    """(h, w) -> (out_h, out_w) with each cell drawn at the centre of its receptive field, as
    explicam's runtime does: the export's `geometry` metadata puts cell j at stride * j + offset
    px (pixel p centred at p), bilinear in between, the edge cells held beyond their centres."""
    def coords(n_in, n_out, stride, offset):
        src = np.clip((np.arange(n_out) + 0.5) / stride - (offset + 0.5) / stride, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    (sy, sx), (oy, ox) = geometry["stride"], geometry["offset"]
    y0, y1, fy = coords(m.shape[0], out_h, sy, oy)
    x0, x1, fx = coords(m.shape[1], out_w, sx, ox)
    fy, fx = fy[:, None], fx[None, :]
    m = m.astype(np.float32)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def _weighted_sum_np(features, weights):
    return features @ weights


if numba is not None:
    @numba.njit(cache=True)
    def _weighted_sum_nb(features, weights):
        h, w, c = features.shape
        out = np.zeros((h, w), np.float32)
        for i in range(h):
            for j in range(w):
                acc = np.float32(0.0)
                for k in range(c):
                    acc += features[i, j, k] * weights[k]
                out[i, j] = acc
        return out
    weighted_sum = _weighted_sum_nb
else:
    weighted_sum = _weighted_sum_np


def gradcam(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju 2017): ReLU(sum_k mean_ij(dy/dA^k) A^k) for one image (h, w, C)."""
    weights = grads.mean(axis=(0, 1)).astype(np.float32)
    return np.maximum(weighted_sum(np.ascontiguousarray(features, np.float32), weights), 0)


def normalize(m: np.ndarray) -> np.ndarray:
    span = float(m.max() - m.min())
    return np.zeros_like(m, np.float32) if span <= 1e-12 else ((m - m.min()) / span).astype(np.float32)


def jet(heat: np.ndarray) -> np.ndarray:
    """The classic jet colour map: blue (0) -> cyan -> yellow -> red (1), RGB uint8."""
    r = np.clip(1.5 - np.abs(4 * heat - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * heat - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * heat - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255 + 0.5).astype(np.uint8)


def explain(model_path: str, image: np.ndarray, target=None):
    """-> (top-3 [(name, p)], heatmap (S, S) in [0, 1], class names)."""
    opts = ort.SessionOptions()
    # threads spin between the ops of a call, never between calls (runtime/model.py's policy)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if "class_names" not in meta:
        raise ValueError(f"{model_path}: not an explicam export (no class_names metadata)")
    names = json.loads(meta["class_names"])
    size = int(meta["input_size"])
    lo, hi = json.loads(meta["value_range"])
    x = resize_bilinear(image, size, size) if image.shape[:2] != (size, size) else image.astype(np.float32)
    x = (np.asarray(x, np.float32) * ((hi - lo) / 255.0) + lo)[None]
    t = -1 if target is None else (names.index(target) if target in names else int(target))
    probs, features, grads = session.run(["probabilities", "features", "grads"],
                                         {"image": x, "target": np.array([t], np.int64)})
    cam = gradcam(features[0], grads[0])
    geometry = json.loads(meta.get("geometry") or "null")  # older exports: the map stretched (naive)
    heat = normalize(upsample_placed(cam, size, size, geometry) if geometry else resize_bilinear(cam, size, size))
    order = np.argsort(-probs[0])[:3]
    return [(names[i], float(probs[0, i])) for i in order], heat, names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Explain one photo with Grad-CAM from an explicam model.onnx")
    ap.add_argument("model")
    ap.add_argument("photo")
    ap.add_argument("--out", help="overlay PNG [default: <photo>.gradcam.png]")
    ap.add_argument("--target", help="class name or index to explain [default: top-1]")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--save-heatmap", help="also save the (S, S) heatmap as .npy")
    args = ap.parse_args(argv)
    try:
        image = read_image(args.photo)
        top3, heat, _ = explain(args.model, image, args.target)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, p in top3:
        print(f"{name:24s} {p:7.2%}")
    h, w = image.shape[:2]
    colour = jet(np.clip(resize_bilinear(heat, h, w), 0, 1)).astype(np.float32)
    blended = (args.alpha * colour + (1 - args.alpha) * image).round().astype(np.uint8)
    out = args.out or os.path.splitext(args.photo)[0] + ".gradcam.png"
    write_image(out, blended)
    if args.save_heatmap:
        np.save(args.save_heatmap, heat)
    print(f"overlay: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
