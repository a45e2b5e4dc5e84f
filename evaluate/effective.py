"""The effective centre of each feature cell: where its input gradient actually lies.

The geometric placement (export/geometry.py) puts cell j at the centre of its theoretical
receptive field. What the trained weights make a cell react to can sit elsewhere (Luo et
al. 2016, "Understanding the effective receptive field"): here, for cell (i, j),

    G_ij(p) = mean over images of  sum over colour channels |d (sum_c features[i, j, c]) / d image[p]|

and its centre is the G-weighted mean pixel position (pixel p centred at coordinate p, the
geometry module's convention). `fit_placement` fits centre = stride * j + offset per axis by
least squares over the inner cells (the outer ring's fields are cut by the image border,
which pulls their centres inwards), the same form the geometric placement has, so it can be
given to Explainer(placement=...) and scored beside the other placements.

The gradients come from the ONNX file itself: explicam's differentiation of the exported
graph, seeded per cell (export/input_grads.py: cell_gradient_model), with onnx and
onnxruntime alone, for any export whose ops from the image to the features have gradient
rules; TensorFlow and the run's model.keras (`keras_cell_saliency`) are the fallback where
onnx is not installed. `export --input-grads` measures it once and writes it into the
metadata (`--placement effective`); `evaluate` measures it again on its own images and
reports it beside the geometric centre.
"""
from __future__ import annotations

import os

import numpy as np


class EffectiveSkipped(RuntimeError):
    pass


def cell_centres(saliency: np.ndarray) -> np.ndarray:
    """(h, w, H, W) non-negative influence maps -> (h, w, 2) centres (y, x) in input pixels."""
    s = np.asarray(saliency, np.float64)
    h, w, H, W = s.shape
    total = s.sum(axis=(2, 3))
    if (total <= 0).any():
        raise ValueError("a cell has no influence from the input (all-zero gradient)")
    ys, xs = np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64)
    cy = (s.sum(axis=3) * ys).sum(axis=2) / total
    cx = (s.sum(axis=2) * xs).sum(axis=2) / total
    return np.stack([cy, cx], axis=-1)


def fit_placement(centres: np.ndarray, rows=None, cols=None, full_hw=None) -> dict:
    """{"stride": [sy, sx], "offset": [oy, ox], "residual_px": [ry, rx]} fitted to (h, w, 2)
    centres over the inner cells (all cells when the map has fewer than 3 per axis). `rows`,
    `cols`: the cell indices the centres belong to when only some were measured (default
    all), out of a map of `full_hw` cells (default (h, w)); its outer ring is left out."""
    h, w, _ = centres.shape
    rows = np.arange(h) if rows is None else np.asarray(rows)
    cols = np.arange(w) if cols is None else np.asarray(cols)
    fh, fw = full_hw or (h, w)
    inner_y = (rows > 0) & (rows < fh - 1) if fh >= 3 else np.ones(h, bool)
    inner_x = (cols > 0) & (cols < fw - 1) if fw >= 3 else np.ones(w, bool)
    out = {"stride": [], "offset": [], "residual_px": []}
    for axis in (0, 1):
        idx = np.broadcast_to(rows[:, None] if axis == 0 else cols[None, :], (h, w)).astype(np.float64)
        j, c = idx[inner_y][:, inner_x].ravel(), centres[inner_y][:, inner_x, axis].ravel()
        if j.size == 0 or np.ptp(j) == 0:  # one cell along this axis: the stride is not measurable
            raise ValueError("need at least two cells along each axis to fit a stride")
        stride, offset = np.polyfit(j, c, 1)
        out["stride"].append(float(stride))
        out["offset"].append(float(offset))
        out["residual_px"].append(float(np.sqrt(np.mean((stride * j + offset - c) ** 2))))
    return out


def keras_cell_saliency(model, layer: str, images: np.ndarray) -> np.ndarray:
    """G (h, w, H, W) of the Keras model's `layer` over preprocessed images (n, H, W, 3)."""
    import keras
    import tensorflow as tf

    body = keras.Model(model.inputs, model.get_layer(layer).output)
    x = tf.constant(np.asarray(images, np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        f = body(x, training=False)
        cells = tf.reduce_sum(f, axis=-1)  # (n, h, w): recorded, so that each cell can be differentiated
        h, w = int(f.shape[1]), int(f.shape[2])
        picked = [[tf.reduce_sum(cells[:, i, j]) for j in range(w)] for i in range(h)]
    out = np.empty((h, w) + tuple(x.shape[1:3]), np.float32)
    for i in range(h):
        for j in range(w):
            g = tape.gradient(picked[i][j], x).numpy()
            out[i, j] = np.abs(g).sum(axis=-1).mean(axis=0)
    del tape
    return out


def measure_effective(onnx_path: str, meta: dict, x: np.ndarray, geometry: dict | None,
                      features: str = "features") -> dict:
    """The fitted effective placement of the model in `onnx_path` (its feature output
    `features`), with how far it lies from the geometric centres: from the ONNX graph, else
    from the model.keras beside it. Raises EffectiveSkipped when neither can run."""
    try:
        from explicam.export.input_grads import measure_effective as from_onnx
    except ImportError as exc:   # onnx is not installed (an edge install): TensorFlow, if it is there
        why = f"onnx is not installed ({exc.name})"
    else:
        try:
            return from_onnx(onnx_path, x, geometry, features)
        except Exception as exc:  # noqa: BLE001  (an op without a gradient rule, a cell without influence)
            why = str(exc).splitlines()[0]
    if features != "features":
        raise EffectiveSkipped(f"{why}; and the TensorFlow fallback measures the primary feature layer only")
    try:
        return keras_effective(onnx_path, meta, x, geometry)
    except EffectiveSkipped as exc:
        raise EffectiveSkipped(f"{why}; {exc}") from None


def keras_effective(onnx_path: str, meta: dict, x: np.ndarray, geometry: dict | None) -> dict:
    """measure_effective from TensorFlow and the model.keras beside `onnx_path`."""
    keras_path = os.path.join(os.path.dirname(os.path.abspath(onnx_path)), "model.keras")
    if not os.path.isfile(keras_path):
        raise EffectiveSkipped(f"no model.keras beside {onnx_path}: the input gradients come from it")
    try:
        from explicam.export.onnx import load_keras_model
    except ImportError as exc:
        raise EffectiveSkipped(f"TensorFlow is not installed ({exc.name})") from None
    try:
        model = load_keras_model(keras_path)
    except Exception as exc:  # an ExportError or a missing TensorFlow
        raise EffectiveSkipped(str(exc).splitlines()[0]) from None
    saliency = keras_cell_saliency(model, meta.get("feature_layer", "conv4"), x)
    centres = cell_centres(saliency)
    fit = fit_placement(centres)
    out = {**fit, "images": int(len(x)), "source": "mean |d cell / d image| (TensorFlow, model.keras)",
           "centres": np.round(centres, 2).tolist()}
    if geometry:
        h, w = centres.shape[:2]
        gy = geometry["stride"][0] * np.arange(h) + geometry["offset"][0]
        gx = geometry["stride"][1] * np.arange(w) + geometry["offset"][1]
        out["from_geometric_px"] = [float(np.mean(centres[1:-1, 1:-1, 0] - gy[1:-1, None])) if h >= 3 else
                                    float(np.mean(centres[..., 0] - gy[:, None])),
                                    float(np.mean(centres[1:-1, 1:-1, 1] - gx[None, 1:-1])) if w >= 3 else
                                    float(np.mean(centres[..., 1] - gx[None, :]))]
    return out
