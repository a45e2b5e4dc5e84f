"""The model-parameter randomisation test of Adebayo et al., "Sanity Checks for Saliency
Maps", NeurIPS 2018, sec. 3.1 (cascading randomisation).

Starting from the trained network, the weights are re-initialised layer by layer from the
top (the logits, then conv4, conv3, ... conv0), cumulatively, each layer with its own
initializer (Glorot uniform kernels, zero biases: what Keras gave it before training).
After each step every method explains the same images for the same classes, and the
Spearman rank correlation between the trained heatmap and the randomised one is taken
per image (evaluate.metrics.spearman). An explanation that depends on what the model
learned must decorrelate; a method whose maps keep a high correlation once the whole
network is random is explaining the input, not the model, and is flagged.

A map made constant by the randomisation (e.g. every CAM value below zero before the
ReLU) has no defined rank correlation; it has lost all structure, so it counts as 0 in
the means and the count of such maps is reported beside them.

This needs TensorFlow and the model.keras beside the model.onnx (randomised copies are
rebuilt through export.onnx.build_onnx); TensorFlow is imported only inside
`randomisation_test`, so the rest of the evaluation runs on the edge runtime alone.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from explicam.evaluate.metrics import spearman

STAGES = ("logits", "conv4", "conv3", "conv2", "conv1", "conv0")  # top layer first
FLAG_RHO = 0.5  # mean Spearman rho after the full cascade at or above this: flagged


class SanitySkipped(RuntimeError):
    """The test cannot run here; str() says why in one line."""


def keras_path_for(onnx_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(onnx_path)), "model.keras")


def _reinitialise(layer, seed: int) -> None:
    """Give `layer` fresh weights drawn from its own initializers (seeded)."""
    for attr, init_attr in (("kernel", "kernel_initializer"), ("bias", "bias_initializer")):
        var, init = getattr(layer, attr, None), getattr(layer, init_attr, None)
        if var is None or init is None:
            continue
        cfg = init.get_config()
        if "seed" in cfg:
            cfg["seed"] = seed
        fresh = type(init).from_config(cfg)
        var.assign(np.asarray(fresh(tuple(var.shape), dtype=var.dtype)))
        seed += 1


def randomised_models(onnx_path: str, meta: dict, seed: int = 0):
    """Yield (stage, path of a randomised model.onnx) for the cascade, top layer first.
    The files live in a temporary folder that is removed when the generator finishes."""
    keras_path = keras_path_for(onnx_path)
    if not os.path.isfile(keras_path):
        raise SanitySkipped(f"no model.keras beside {onnx_path}: the randomisation test rebuilds the model from it")
    try:
        import keras  # noqa: F401  (TensorFlow is needed only here)

        from explicam.export.onnx import build_onnx, load_keras_model, set_metadata, write_atomic
    except ImportError as exc:
        raise SanitySkipped(f"TensorFlow is not installed ({exc.name}); install the [train] extra") from None
    trained = load_keras_model(keras_path)
    if int(trained.input_shape[1]) != int(meta["input_size"]):
        raise SanitySkipped(f"{keras_path} takes {trained.input_shape[1]} px but {onnx_path} takes "
                            f"{meta['input_size']} px: they are not the same model")
    model = keras.models.clone_model(trained)
    model.set_weights(trained.get_weights())
    names = {layer.name for layer in model.layers}
    head_file = meta.get("head_file") or "model.head.onnx"
    with tempfile.TemporaryDirectory(prefix="explicam-sanity-") as tmp:
        for i, stage in enumerate(s for s in STAGES if s in names):
            _reinitialise(model.get_layer(stage), seed + 100 * i)
            extra = [d["name"] for d in (meta.get("feature_layers") or [])[1:]]   # export --layer a,b
            main, head = build_onnx(model, meta.get("feature_layer", "conv4"), extra=extra)
            set_metadata(main, meta)
            set_metadata(head, {**meta, "role": "head"})
            path = os.path.join(tmp, "model.onnx")
            write_atomic(head.SerializeToString(), os.path.join(tmp, head_file))
            if meta.get("input_grads_file"):   # export --input-grads: the randomised network's own
                from explicam.export.input_grads import input_grads_model, metadata
                from explicam.export.onnx import classifier_only

                classifier = classifier_only(main, features=False)
                for key, guided in (("input_grads_file", False), ("guided_grads_file", True)):
                    if meta.get(key):
                        side = input_grads_model(classifier, guided=guided)
                        set_metadata(side, metadata(meta.get("export_id", ""), guided=guided))
                        write_atomic(side.SerializeToString(), os.path.join(tmp, meta[key]))
            write_atomic(main.SerializeToString(), path)
            yield stage, path


def compare_maps(trained: np.ndarray, randomised: np.ndarray) -> tuple[float, int]:
    """(mean Spearman rho over images with constant maps counted as 0, constant maps)."""
    rhos = np.array([spearman(a, b) for a, b in zip(trained, randomised)])
    constant = int(np.isnan(rhos).sum())
    return float(np.nan_to_num(rhos, nan=0.0).mean()), constant


def randomisation_test(onnx_path: str, meta: dict, x: np.ndarray, targets: np.ndarray, trained: dict,
                       explainer_kw: dict, explain_kw: dict, seed: int = 0, log=print) -> dict:
    """Run the cascade; `trained` = {method: heatmaps (n, S, S)} of the trained model for
    the preprocessed images x and classes `targets`. Returns
    {"stages": [...], "methods": {m: {"rho": [...], "constant": [...], "final_rho", "flagged"}}}."""
    from explicam.runtime.explainer import Explainer

    methods = list(trained)
    out = {"stages": [], "images": int(len(x)), "flag_rho": FLAG_RHO,
           "methods": {m: {"rho": [], "constant": []} for m in methods}}
    for stage, path in randomised_models(onnx_path, meta, seed):
        ex = Explainer(path, warmup=False, **explainer_kw)
        out["stages"].append(stage)
        for m in methods:
            heat = ex.explain(x, m, targets, **explain_kw).heatmaps
            rho, constant = compare_maps(trained[m], heat)
            out["methods"][m]["rho"].append(round(rho, 4))
            out["methods"][m]["constant"].append(constant)
        log(f"  sanity: randomised down to {stage}: " + ", ".join(
            f"{m} {out['methods'][m]['rho'][-1]:+.2f}" for m in methods))
        del ex
    for m, r in out["methods"].items():
        r["final_rho"] = r["rho"][-1] if r["rho"] else float("nan")
        r["flagged"] = bool(r["rho"]) and r["final_rho"] >= FLAG_RHO
    return out
