"""Keras vs ONNX, figure by figure. Used by the export itself (it refuses to write a
model that disagrees) and by the tests.

The references are computed the independent way: TensorFlow's own autodiff
(tf.GradientTape) for the gradients, and the keras.io Grad-CAM tutorial's recipe
(GradientTape, channel means of the gradient, weighted sum, ReLU) for the heatmap.
"""
from __future__ import annotations

import numpy as np

TOLERANCE = 1e-4


def keras_features_logits_grads(model, layer_name, images, target: int):
    """(features, logits, d logits[:, target] / d features) from Keras with tf.GradientTape."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(model.input, [model.get_layer(layer_name).output, model.output])
    with tf.GradientTape() as tape:
        features, logits = grad_model(tf.constant(images), training=False)
        score = tf.reduce_sum(logits[:, target])  # images are independent: the sum's gradient is per image
    grads = tape.gradient(score, features)
    return features.numpy(), logits.numpy(), grads.numpy()


def keras_tutorial_gradcam(model, layer_name, image, pred_index=None):
    """Grad-CAM exactly as the keras.io tutorial computes it (one image, (h, w) map)."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(model.input, [model.get_layer(layer_name).output, model.output])
    with tf.GradientTape() as tape:
        last_conv_layer_output, preds = grad_model(image[None], training=False)
        if pred_index is None:
            pred_index = tf.argmax(preds[0])
        class_channel = preds[:, pred_index]
    grads = tape.gradient(class_channel, last_conv_layer_output)
    pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = last_conv_layer_output[0] @ pooled_grads[..., tf.newaxis]
    return tf.maximum(tf.squeeze(heatmap), 0).numpy()


def keras_gradcam_batch(keras_path: str, layer_name: str = "conv4"):
    """The keras.io tutorial's Grad-CAM as a callable on a batch (top-1 class): the baseline
    `cli.py bench` compares the runtime with. Raises ImportError without TensorFlow."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(keras_path, compile=False)
    grad_model = keras.Model(model.input, [model.get_layer(layer_name).output, model.output])

    def gradcam(x):
        with tf.GradientTape() as tape:
            conv, preds = grad_model(x, training=False)
            score = tf.reduce_sum(tf.reduce_max(preds, axis=1))
        pooled = tf.reduce_mean(tape.gradient(score, conv), axis=(1, 2))
        return tf.maximum(tf.einsum("nhwc,nc->nhw", conv, pooled), 0).numpy()
    return gradcam


def keras_baseline_for(model_path: str) -> dict:
    """{"keras.io Grad-CAM (TF)": fn} for `cli.py bench` when TensorFlow and the model.keras
    beside an exported model.onnx are both there, else {}."""
    import os

    keras_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "model.keras")
    if not os.path.exists(keras_path):
        return {}
    try:
        from explicam.train import quiet_tensorflow

        quiet_tensorflow()  # TensorFlow's C++ start-up lines would land in the middle of the table
        return {"keras.io Grad-CAM (TF)": keras_gradcam_batch(keras_path)}
    except (ImportError, RuntimeError):  # RuntimeError: an edge install without TensorFlow
        return {}


def minmax(x):
    x = np.asarray(x, np.float64)
    span = x.max() - x.min()
    return np.zeros_like(x) if span <= 1e-12 * max(1.0, abs(x.max())) else (x - x.min()) / span


def cam_difference(onnx_cam, ref, features, grads) -> float:
    """Largest difference of the min-max normalised maps. A map that is a near-cancellation
    of its terms (span under 1e-3 of max_ij sum_k |w_k A_k|, e.g. a 2x2 conv4 at 32 px)
    magnifies float rounding when normalised, so there the difference is measured on the
    terms' own scale instead: what float32 can promise."""
    terms = float(np.einsum("hwc,c->hw", np.abs(features), np.abs(grads.mean(axis=(0, 1)))).max())
    span = float(np.asarray(ref, np.float64).max() - np.asarray(ref, np.float64).min())
    if terms > 0 and span < 1e-3 * terms:
        return float(np.abs(np.asarray(onnx_cam, np.float64) - ref).max()) / terms
    return float(np.abs(minmax(onnx_cam) - minmax(ref)).max())


def gradcam_from_onnx_outputs(features, grads):
    """Grad-CAM from the exported outputs alone (N, h, w): ReLU(sum_k mean_ij(g_k) A_k)."""
    weights = grads.mean(axis=(1, 2))
    return np.maximum(np.einsum("nhwc,nc->nhw", features, weights), 0)


def compare(model, session, images, layer_name: str = "conv4", classes=None) -> dict:
    """Largest Keras-vs-ONNX differences over the images and every class (or `classes`)."""
    images = np.ascontiguousarray(images, np.float32)
    n_classes = int(model.output_shape[-1])
    classes = range(n_classes) if classes is None else classes
    report = {"logits": 0.0, "probabilities": 0.0, "features": 0.0, "grads_rel": 0.0, "gradcam": 0.0}
    for c in classes:
        out = session.run(None, {"image": images, "target": np.full(len(images), c, np.int64)})
        out = dict(zip([o.name for o in session.get_outputs()], out))
        feats, logits, grads = keras_features_logits_grads(model, layer_name, images, c)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        report["logits"] = max(report["logits"], float(np.abs(out["logits"] - logits).max()))
        report["probabilities"] = max(report["probabilities"], float(np.abs(out["probabilities"] - probs).max()))
        report["features"] = max(report["features"], float(np.abs(out["features"] - feats).max()))
        scale = max(float(np.abs(grads).max()), 1e-12)
        report["grads_rel"] = max(report["grads_rel"], float(np.abs(out["grads"] - grads).max()) / scale)
        onnx_cams = gradcam_from_onnx_outputs(out["features"], out["grads"])
        for i, image in enumerate(images):
            ref = keras_tutorial_gradcam(model, layer_name, image, c)
            diff = cam_difference(onnx_cams[i], ref, out["features"][i], out["grads"][i])
            report["gradcam"] = max(report["gradcam"], diff)
    return report


def failures(report: dict, tol: float = TOLERANCE) -> list[str]:
    return [f"{k} differs by {v:.2e} (tolerance {tol:.0e})" for k, v in report.items() if not v <= tol]
