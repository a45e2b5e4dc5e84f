"""MaskedForward: class probabilities of X * M for many masks M of one image, computed
only where each mask reaches.

Score-CAM costs one forward pass per channel. But its masks are conv4 channels: where a
mask is zero the masked image is zero, and an activation whose receptive field sees only
zeros equals the zero image's activation at that position. So each mask runs the body
block by block (model.blocks.onnx), each block only on the rectangle its changed input
can reach, pasted into the zero image's activations; the head then runs on the whole
conv4 map. The result is the full forward pass's, to float rounding (tests hold it to
1e-5), for about half the convolution work on the synthetic validation set.

Rectangles, per block with kernel K padded (K-1)//2 before and the rest after ('same'):
a changed input span [y0, y1] changes conv outputs [y0 - after, y1 + before]; for a
pooled block that span is widened to whole 2x2 windows, and the pooled span is its half.

Small convolutions parallelise poorly over threads, so the masks are spread over one
single-threaded pipeline per core instead: on the 2-core VM, 0.57 of a forward pass per
mask against 0.82 for one two-threaded pipeline (timed side by side while building this).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _box(mask: np.ndarray):
    """(y0, y1, x0, x1), inclusive, of the mask's nonzero pixels, or None."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask[rows[0]:rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


class MaskedForward:
    def __init__(self, blocks, head, geometry: dict, input_size: int, workers: int | None = None,
                 forward=None, input_name: str = "image", whole_above: float = 0.8):
        """blocks, head, forward: onnxruntime sessions of model.blocks.onnx, model.head.onnx
        and (optional) model.forward.onnx, best opened with one intra-op thread each (the
        workers are the parallelism). A mask whose crops would need more than `whole_above`
        of the whole image's convolution work runs whole through `forward`."""
        self.blocks, self.head, self.forward = blocks, head, forward
        self.input_name, self.whole_above = input_name, float(whole_above)
        self.k = int(geometry["kernel"])
        self.before, self.after = int(geometry["pad_before"]), int(geometry["pad_after"])
        self.pooled = [bool(p) for p in geometry["pooled"]]
        self.size = int(input_size)
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self._pool = None
        # The zero image's input to every block, padded as 'same' pads it (zeros outside),
        # and its conv4 map: the context every crop is pasted into.
        self.zero_inputs = []
        z = np.zeros((1, int(geometry["channels"][0]), self.size, self.size), np.float32)
        for b in range(len(self.pooled)):
            z = self._pad(z)
            self.zero_inputs.append(z)
            z = self._block(b, z)
        self.zero_features = z  # (1, C, h, w)
        self.zero_probabilities = self._head(z)[0]
        # multiply-adds per conv output position of each block, to report the work saved
        outs = [int(c) for c in geometry["channels"][1:]] + [z.shape[1]]
        self._macs = [int(c) * o * self.k ** 2 for c, o in zip(geometry["channels"], outs)]
        self._full = sum(m * (self.size >> b) ** 2 for b, m in enumerate(self._macs))
        self._lock = threading.Lock()
        self.work = [0.0, 0.0]  # conv multiply-adds done, and those whole masked images would need

    def _pad(self, x):
        return np.pad(x, ((0, 0), (0, 0), (self.before, self.after), (self.before, self.after)))

    def _block(self, b: int, x: np.ndarray) -> np.ndarray:
        return self.blocks.run(None, {"block": np.array(b, np.int64), "x": x})[0]

    def _head(self, f: np.ndarray) -> np.ndarray:
        return self.head.run(["probabilities"], {"features": np.ascontiguousarray(f.transpose(0, 2, 3, 1))})[0]

    def _span(self, lo: int, hi: int, n: int, pooled: bool):
        """Conv outputs changed by the input span [lo, hi], widened to whole pooling windows."""
        lo, hi = max(0, lo - self.after), min(n - 1, hi + self.before)
        return (lo - lo % 2, hi | 1) if pooled else (lo, hi)

    def _plan(self, y0: int, y1: int, x0: int, x1: int):
        """For the changed input box: per block, the box pasted into its input and the box of
        conv outputs it computes; the box changed in conv4; the multiply-adds."""
        plan, n, done = [], self.size, 0
        for b, pooled in enumerate(self.pooled):
            (a, c), (l, r) = self._span(y0, y1, n, pooled), self._span(x0, x1, n, pooled)
            plan.append(((y0, y1, x0, x1), (a, c, l, r)))
            done += self._macs[b] * (c - a + 1) * (r - l + 1)
            y0, y1, x0, x1, n = (a // 2, c // 2, l // 2, r // 2, n // 2) if pooled else (a, c, l, r, n)
        return plan, (y0, y1, x0, x1), done

    def _count(self, done: int) -> None:
        with self._lock:
            self.work[0] += done
            self.work[1] += self._full

    def one(self, image: np.ndarray, image_chw: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Probabilities (classes,) of image (S, S, 3) * mask (S, S); image_chw is the same
        image (3, S, S). A mask that reaches nearly everything runs the whole masked image
        through the classifier instead: five block calls with their copies cost more than
        the little they save (above 0.75-0.85 of the work, 4-7% faster overall both at 128
        and at 224 px, timed side by side)."""
        box = _box(mask)
        if box is None:
            self._count(0)
            return self.zero_probabilities.copy()
        plan, last, done = self._plan(*box)
        if self.forward is not None and done > self.whole_above * self._full:
            self._count(self._full)
            x = np.multiply(image, mask[:, :, None], dtype=np.float32)[None]
            return self.forward.run(["probabilities"], {self.input_name: x})[0][0]
        return self._head(self._features(image_chw, mask, box, plan, last, done))[0]

    def features(self, image_chw: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """conv4 of image (3, S, S) * mask (S, S), always through the blocks: (1, C, h, w) NCHW."""
        box = _box(mask)
        if box is None:
            self._count(0)
            return self.zero_features.copy()
        return self._features(image_chw, mask, box, *self._plan(*box))

    def _features(self, image_chw, mask, box, plan, last, done) -> np.ndarray:
        y0, y1, x0, x1 = box
        changed = np.multiply(image_chw[:, y0:y1 + 1, x0:x1 + 1], mask[y0:y1 + 1, x0:x1 + 1], dtype=np.float32)[None]
        k, pre = self.k, self.before
        for b, ((y0, y1, x0, x1), (a, c, l, r)) in enumerate(plan):
            # conv outputs a..c need padded inputs a..c+K-1: the zero image's, the change pasted in
            crop = self.zero_inputs[b][:, :, a:c + k, l:r + k].copy()
            crop[:, :, y0 + pre - a:y1 + pre - a + 1, x0 + pre - l:x1 + pre - l + 1] = changed
            changed = self._block(b, crop)
        y0, y1, x0, x1 = last
        features = self.zero_features.copy()
        features[:, :, y0:y1 + 1, x0:x1 + 1] = changed
        self._count(done)
        return features

    @property
    def work_fraction(self) -> float:
        """Convolution work done so far, as a fraction of what whole masked images need."""
        return self.work[0] / self.work[1] if self.work[1] else float("nan")

    def probabilities(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """(M, classes) for one preprocessed image (S, S, 3) and masks (M, S, S)."""
        image, masks = np.asarray(image, np.float32), np.asarray(masks, np.float32)
        if image.shape != (self.size, self.size, 3) or masks.shape[1:] != (self.size, self.size):
            raise ValueError(f"expected an image ({self.size}, {self.size}, 3) and masks (M, {self.size}, "
                             f"{self.size}); got {image.shape} and {masks.shape}")
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))  # NCHW once, not per mask
        if self.workers == 1 or len(masks) < 2:
            out = [self.one(image, chw, m) for m in masks]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="explicam-masked")
            out = list(self._pool.map(lambda m: self.one(image, chw, m), masks))
        return np.stack(out) if out else np.zeros((0, len(self.zero_probabilities)), np.float32)
