"""A classifier's own preprocessing, as numbers: what `export` writes into the graph
(export/prologue.py) and what the plain-classifier path of the runtime (runtime/plain.py,
RISE on an ONNX file that was never exported) applies in numpy.

    value = (pixel * scale - mean) / std,   pixel = 255 * image, per channel, then layout

where `image` is explicam's one input convention: (N, H, W, 3) float32 RGB in [0, 1].
Only numpy: the runtime imports this, and so does the export.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, what torchvision's Grayscale and OpenCV use


@dataclass
class Preprocess:
    scale: float = 1 / 255
    mean: list = field(default_factory=lambda: [0.0])
    std: list = field(default_factory=lambda: [1.0])
    channels: str = "rgb"      # rgb | bgr | gray: what the original graph wants
    layout: str = "nhwc"       # nhwc | nchw: of the original graph's input

    def check(self, n_channels: int) -> None:
        if self.channels not in ("rgb", "bgr", "gray"):
            raise ValueError(f"--channels must be rgb, bgr or gray, got {self.channels!r}")
        want = 1 if self.channels == "gray" else 3
        if n_channels != want:
            raise ValueError(f"--channels {self.channels}: the model's input has {n_channels} channel(s); "
                             f"pass --channels {'gray' if n_channels == 1 else 'rgb'}")
        for name, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) not in (1, want):
                raise ValueError(f"{name} takes 1 or {want} values, got {len(values)}")
        if any(v == 0 for v in self.std):
            raise ValueError("--std: a value of 0 would divide by zero")

    def constants(self):
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return np.float32(255.0 * self.scale), mean, std

    def affine(self):
        """(a, b) per channel with value = image * a + b: (pixel * scale - mean) / std in two
        element-wise passes rather than three (the graph's prologue and numpy use the same)."""
        scale, mean, std = self.constants()
        return (scale / std).astype(np.float32), (-mean / std).astype(np.float32)

    def numpy(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) RGB in [0, 1] -> what the original graph takes."""
        a, b = self.affine()
        x = images.astype(np.float32)
        if self.channels == "bgr":
            x = x[..., ::-1]
        elif self.channels == "gray":
            x = x @ np.asarray(GREY, np.float32)[:, None]
        x = x * a + b
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.layout == "nchw" else x, np.float32)

    def as_meta(self) -> dict:
        return {"scale": float(self.scale), "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std], "channels": self.channels, "layout": self.layout,
                "applied": "inside the graph, before the original input"}


def parse_floats(text, option: str) -> list | None:
    if text is None:
        return None
    try:
        return [float(eval_fraction(v)) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def eval_fraction(value: str) -> float:
    """'1/255' or '0.0039' -> float (no eval: a fraction is the only expression allowed)."""
    value = value.strip()
    if "/" in value:
        num, den = value.split("/", 1)
        return float(num) / float(den)
    return float(value)
