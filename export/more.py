"""What `--layer a,b,c` and `--input-grads` add to an export, for both export paths (an
explicam run, export/run.py; any model, export/anymodel.py).

metadata of model.onnx
  feature_layers     [{"name", "layer" (tensor), "features", "grads" (output names),
                     "feature_shape" [h, w, C], "geometry"}, ...], the primary layer first
                     (features / grads), then features_1 / grads_1 ... (export/layers.py)
  input_grads_file   "model.inputgrads.onnx" (export/input_grads.py), "" without --input-grads
  guided_grads_file  "model.guidedgrads.onnx": guided backpropagation's, with it
  input_grads        what its outputs are
  effective_geometry the measured effective centre of each primary-layer cell (mean position of
                     |d cell / d image| over a few images, fitted as stride j + offset:
                     `--placement effective`), with --input-grads
"""
from __future__ import annotations

import os


def input_grads_path_for(onnx_path: str) -> str:
    root, _ = os.path.splitext(onnx_path)
    return root + ".inputgrads.onnx"


def guided_grads_path_for(onnx_path: str) -> str:
    root, _ = os.path.splitext(onnx_path)
    return root + ".guidedgrads.onnx"


def feature_layers_meta(main, names, log=print) -> list:
    """The feature_layers entry: one dict per layer of the export's autodiff info."""
    import json

    from explicam.export.autodiff import META_KEY
    from explicam.export.geometry import geometry_for_metadata

    info = json.loads({p.key: p.value for p in main.metadata_props}[META_KEY])
    out = []
    for name, layer in zip(names, info["layers"]):
        geometry = geometry_for_metadata(main, layer["features"], log=log)
        out.append({"name": name, "layer": layer["layer"], "features": layer["features"], "grads": layer["grads"],
                    "feature_shape": layer["feature_shape"], "geometry": geometry})
    return out


def more_metadata(main, names, input_grads: bool, images, images_what: str, out: str, log=print) -> dict:
    """The metadata entries above for an export's main graph (its prologue in place)."""
    meta = {"feature_layers": feature_layers_meta(main, names, log), "input_grads_file": "", "guided_grads_file": "",
            "input_grads": ""}
    if len(names) > 1:
        log("feature layers: " + ", ".join(f"{d['name']} {d['feature_shape']} -> {d['features']}, {d['grads']}"
                                           for d in meta["feature_layers"]))
    if input_grads:
        from explicam.export.input_grads import effective_meta

        meta["input_grads_file"] = os.path.basename(input_grads_path_for(out))
        meta["guided_grads_file"] = os.path.basename(guided_grads_path_for(out))
        meta["input_grads"] = ("input_grads = d logits[target] / d image (N, H, W, 3) in the first side file; "
                               "guided backpropagation's (every ReLU, and Clip from 0) in the second")
        meta["effective_geometry"] = effective_meta(main, images, meta["feature_layers"][0]["geometry"],
                                                    images_what, log)
    return meta


def side_files(main, meta: dict, out: str, log=print) -> list:
    """[(path, ModelProto)] of model.inputgrads.onnx and model.guidedgrads.onnx for the main
    graph, checked (ExportError when not)."""
    from explicam.export.input_grads import build_side_files, metadata
    from explicam.export.onnx import ExportError, set_metadata

    try:
        side, guided, _ = build_side_files(main, log)
    except ValueError as exc:  # GraphError (an op without a rule on the way to the image) or the check
        raise ExportError(f"--input-grads: {exc}") from None
    set_metadata(side, metadata(meta["export_id"]))
    set_metadata(guided, metadata(meta["export_id"], guided=True))
    return [(input_grads_path_for(out), side), (guided_grads_path_for(out), guided)]
