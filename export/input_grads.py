"""Gradients with respect to the image: the whole network differentiated, in side files.

`export ... --input-grads` writes two files beside model.onnx (same export_id):

  model.inputgrads.onnx   inputs  image (N, H, W, 3) as model.onnx takes it (explicam's RGB
                                  [0, 1], the user's preprocessing inside: the gradient runs
                                  through the prologue too); target (N,) int64, default [-1]
                                  = top-1
                          outputs logits, probabilities, target_used as model.onnx;
                                  input_grads (N, H, W, 3) = d logits[n, target_used[n]] / d image[n]
  model.guidedgrads.onnx  the same, with guided backpropagation's input_grads (every ReLU, and
                          every Clip with lower bound 0, passes the gradient only where its
                          input and the incoming gradient are both positive)

Why side files rather than more outputs of model.onnx: onnxruntime runs every node of a
graph whatever outputs a call asks for (a 6-conv branch nobody fetched still cost its full
time, measured with onnxruntime 1.32), so every Grad-CAM call would pay for a backward pass
through the whole body. Why two files rather than a switch in one (as until 2026-12): the
switch was an op at every rectifier with no blocked-layout kernel in onnxruntime, and it
cost the ordinary gradient 15-20% (autodiff_more.guided_rules); the price is a second copy
of the weights on disk. Exports from before keep working (runtime/model.py feeds their
`guided` input).

The same walk, seeded per feature cell instead of per class (`cell_gradient_model`), gives
d features[i, j] / d image: where each cell's input influence lies (evaluate/effective.py).
Only onnx, numpy and onnxruntime here.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
from onnx import helper

from .autodiff import Builder, add_target, backward, measure_shapes, target_seed
from .autodiff_more import guided_rules
from .graph import FLOAT_TYPES, float_dependents, infer_shapes, opset_of

OUTPUT, CELL_SEED, CELL_GRADS = "input_grads", "cell_seed", "cell_grads"
F32 = onnx.TensorProto.FLOAT


def builder_at(model, name: str, shape) -> Builder:
    """A Builder over `model` with every float tensor's shape as onnxruntime gives it when the
    input `name` is fed random values of `shape` (batch 1)."""
    inferred, dtypes = infer_shapes(model)
    dep = float_dependents(model.graph.node, [name], dtypes)
    names = [o for n in model.graph.node for o in n.output if o in dep and dtypes.get(o, F32) in FLOAT_TYPES]
    feeds = {name: np.random.default_rng(0).random(tuple(shape), dtype=np.float32)}
    shapes = {**{k: v for k, v in inferred.items() if v is not None}, name: tuple(shape),
              **measure_shapes(model, names, feeds, dtypes)}
    return Builder(model, shapes, dtypes, opset_of(model))


def _image_hw(model, image: str = "image") -> tuple:
    dims = next(i for i in model.graph.input if i.name == image).type.tensor_type.shape.dim
    return int(dims[1].dim_value), int(dims[2].dim_value)


def input_grads_model(forward: onnx.ModelProto, guided: bool = False) -> onnx.ModelProto:
    """A side file from the export's classifier (model.forward.onnx's graph: image -> logits,
    probabilities): the module docstring's inputs and outputs, no metadata yet; guided:
    guided backpropagation's walk instead of the gradient's."""
    model = copy.deepcopy(forward)
    del model.metadata_props[:]
    hw = _image_hw(model)
    nodes = list(model.graph.node)
    b = builder_at(model, "image", (1, *hw, 3))
    classes = int(b.shape("logits")[1])
    b.wrts = {"image"}
    start, seed = target_seed(b, "logits", add_target(b, model, "logits"), classes)
    grad = backward(b, nodes, "image", start, seed, rules=guided_rules() if guided else None)
    b.node("Identity", [grad], [OUTPUT])
    model.graph.output.extend([helper.make_tensor_value_info("target_used", onnx.TensorProto.INT64, ["N"]),
                               helper.make_tensor_value_info(OUTPUT, F32, ["N", *hw, 3])])
    name_batch_axis(model, "image", hw)
    return model


def name_batch_axis(model, image: str, hw) -> None:
    """Declare axis 0 of every float tensor that carries the batch as "N" (value_info), found by
    running the graph on 1 and 2 images. Why: the gradient's Reshapes take the batch as -1, so
    onnx shape inference gives each its own unknown symbol, and onnxruntime's blocked-layout
    (NCHWc) optimiser then cannot prove that the gradient and the activation it is multiplied
    by have one shape: it moves both out of the layout and back at every Mul and Sum
    (EfficientNet-Lite0's saliency: 99 such moves without the names, 13 with)."""
    _, dtypes = infer_shapes(model)
    names = [o for n in model.graph.node for o in n.output if o and dtypes.get(o) in FLOAT_TYPES]
    rng = np.random.default_rng(0)
    one, two = (measure_shapes(model, names, {image: rng.random((k, *hw, 3), dtype=np.float32)}, dtypes) for k in (1, 2))
    declared = {v.name for v in model.graph.output} | {v.name for v in model.graph.input}
    del model.graph.value_info[:]
    for name in names:
        a, c = one[name], two[name]
        if name not in declared and len(a) == len(c) >= 1 and a[0] == 1 and c[0] == 2 and a[1:] == c[1:]:
            model.graph.value_info.append(helper.make_tensor_value_info(name, dtypes[name], ["N", *a[1:]]))


def metadata(export_id: str, guided: bool = False) -> dict:
    if guided:
        return {"role": "guided_grads", "export_id": export_id,
                "input_grads": "guided backpropagation (Springenberg 2015) from logits[target] to the image "
                               "(N, H, W, 3), written by explicam's differentiation"}
    return {"role": "input_grads", "export_id": export_id,
            "input_grads": "d logits[target] / d image (N, H, W, 3), the whole network and the preprocessing "
                           "differentiated by explicam"}


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def check_input_grads(side: onnx.ModelProto, images=None, classes=None, directions: int = 2, seed: int = 0):
    """(report, failures) of `input_grads` against central finite differences of the classifier
    itself (image -> logits, in float64 where onnxruntime has every op in double), along
    random directions, for a few classes; `input_grads_batch`: a batch gives what its images
    give one by one."""
    from .autodiff_check import FD_STEPS, FD_TOLERANCE_FLOAT32, TOLERANCES, _fd_error, head_graph
    from .autodiff_double import as_double

    hw = _image_hw(side)
    rng = np.random.default_rng(seed)
    x = np.asarray(images, np.float32) if images is not None else rng.random((2, *hw, 3), dtype=np.float32)
    s = _session(side)
    n = len(x)
    forward, _ = head_graph(side, "image", "logits")
    _, types = infer_shapes(forward)
    inner = [o for nd in forward.graph.node for o in nd.output if types.get(o) == F32]
    try:
        shapes = {"image": x.shape, **measure_shapes(forward, inner, {"image": x}, types)}
        fs, dtype = _session(as_double(forward, shapes)), np.float64
    except Exception:  # an op onnxruntime has only in float32: float32 steps, looser tolerance
        fs, dtype = _session(forward), np.float32

    def score(z, c):
        return fs.run(None, {"image": z.astype(dtype)})[0].reshape(n, -1)[:, c]

    logits = s.run(["logits"], {"image": x})[0]
    c_all = logits.shape[1]
    classes = sorted({0, c_all - 1}) if classes is None else list(classes)
    tol = TOLERANCES["grads_fd"] if dtype == np.float64 else FD_TOLERANCE_FLOAT32
    worst = 0.0
    for c in classes:
        g = s.run([OUTPUT], {"image": x, "target": np.full(n, c, np.int64)})[0].astype(np.float64)
        for _ in range(directions):
            v = rng.standard_normal(x.shape)
            worst = max(worst, float(_fd_error(score, x, g, v, c, (1, 2, 3), FD_STEPS[np.dtype(dtype).name]).max()))
    ones = np.concatenate([s.run([OUTPUT], {"image": x[i:i + 1]})[0] for i in range(n)])
    whole = s.run([OUTPUT], {"image": x})[0]
    batch = float(np.abs(ones - whole).max() / max(1.0, float(np.abs(whole).max())))
    report = {"input_grads_fd": worst, "input_grads_batch": batch}
    tols = {"input_grads_fd": tol, "input_grads_batch": TOLERANCES["batch"]}
    failures = [f"{k} differs by {v:.2e} (tolerance {tols[k]:.0e})" for k, v in report.items() if not v <= tols[k]]
    return report, failures


def check_guided(guided: onnx.ModelProto, side: onnx.ModelProto, seed: int = 1) -> dict:
    """{"guided_logits", "guided_batch"}: the guided file's logits against the gradient
    file's, and a batch against its images one by one (guided backpropagation is no
    gradient: finite differences cannot check it; tests check it against Captum)."""
    hw = _image_hw(side)
    x = np.random.default_rng(seed).random((2, *hw, 3), dtype=np.float32)
    g, s = _session(guided), _session(side)
    logits = float(np.abs(g.run(["logits"], {"image": x})[0] - s.run(["logits"], {"image": x})[0]).max())
    whole = g.run([OUTPUT], {"image": x})[0]
    ones = np.concatenate([g.run([OUTPUT], {"image": x[i:i + 1]})[0] for i in range(len(x))])
    return {"guided_logits": logits, "guided_batch": float(np.abs(ones - whole).max() / max(1.0, float(np.abs(whole).max())))}


def build_side_files(main: onnx.ModelProto, log=print):
    """(gradient ModelProto, guided ModelProto, check report) for an export's main graph;
    raises ValueError with the checks' failures when the input gradients disagree with
    finite differences or the guided file with the classifier."""
    from .autodiff_check import TOLERANCES
    from .onnx import classifier_only

    classifier = classifier_only(main, features=False)   # its outputs: logits, probabilities
    side, guided = input_grads_model(classifier), input_grads_model(classifier, guided=True)
    report, bad = check_input_grads(side)
    more = check_guided(guided, side)
    tols = {"guided_logits": 1e-4, "guided_batch": TOLERANCES["batch"]}
    bad += [f"{k} differs by {v:.2e} (tolerance {tols[k]:.0e})" for k, v in more.items() if not v <= tols[k]]
    report.update(more)
    log("input gradients against finite differences: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
    if bad:
        raise ValueError("the input gradients disagree with the classifier, nothing written: " + "; ".join(bad))
    return side, guided, report


# ---- d features[cell] / d image: each cell's influence, for the effective placement ------------
def cell_gradient_model(main: onnx.ModelProto, features: str = "features") -> onnx.ModelProto:
    """image (N, H, W, 3), cell_seed (N, h, w, C) -> cell_grads (N, H, W, 3) = d sum(seed *
    features) / d image, from an export's main graph (`features` or features_1, ...)."""
    from .autodiff_check import head_graph

    body, _ = head_graph(main, "image", features)
    model = copy.deepcopy(body)
    hw = _image_hw(main)
    del model.graph.input[:]
    model.graph.input.append(helper.make_tensor_value_info("image", F32, ["N", *hw, 3]))
    nodes = list(model.graph.node)
    b = builder_at(model, "image", (1, *hw, 3))
    fshape = b.shape(features)
    model.graph.input.append(helper.make_tensor_value_info(CELL_SEED, F32, ["N", *fshape[1:]]))
    grad = backward(b, nodes, "image", features, CELL_SEED)
    b.node("Identity", [grad], [CELL_GRADS])
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(CELL_GRADS, F32, ["N", *hw, 3]))
    return model


def cell_saliency(main, images, rows, cols, features: str = "features", chunk: int = 16) -> np.ndarray:
    """G (len(rows), len(cols), H, W) = mean over images of sum over colours of
    |d (sum_c features[i, j, c]) / d image| for the cells rows x cols (evaluate/effective.py),
    `chunk` cells per onnxruntime call (each a copy of the image seeded at one cell)."""
    proto = main if isinstance(main, onnx.ModelProto) else onnx.load(main)
    session = _session(cell_gradient_model(proto, features))
    x = np.asarray(images, np.float32)
    fshape = next(o for o in proto.graph.output if o.name == features).type.tensor_type.shape.dim
    h, w, c = (int(d.dim_value) for d in fshape[1:])
    cells = [(i, j) for i in rows for j in cols]
    out = np.zeros((len(cells), *x.shape[1:3]), np.float64)
    for image in x:
        for s in range(0, len(cells), chunk):
            part = cells[s:s + chunk]
            seed = np.zeros((len(part), h, w, c), np.float32)
            for k, (i, j) in enumerate(part):
                seed[k, i, j, :] = 1.0
            g = session.run([CELL_GRADS], {"image": np.repeat(image[None], len(part), 0), CELL_SEED: seed})[0]
            out[s:s + len(part)] += np.abs(g).sum(axis=-1)
    return (out / len(x)).reshape(len(rows), len(cols), *x.shape[1:3]).astype(np.float32)


def measure_effective(main, images, geometry: dict | None = None, features: str = "features",
                      per_axis: int = 9, source: str = "") -> dict:
    """The fitted effective placement {"stride", "offset", "residual_px", "images", "cells",
    "source", "from_geometric_px"} of an export's feature layer (evaluate/effective.py fits
    it): at most `per_axis` rows and columns of cells, evenly spread, are measured."""
    from explicam.evaluate.effective import cell_centres, fit_placement

    proto = main if isinstance(main, onnx.ModelProto) else onnx.load(main)
    dims = next(o for o in proto.graph.output if o.name == features).type.tensor_type.shape.dim
    h, w = int(dims[1].dim_value), int(dims[2].dim_value)
    rows = np.unique(np.linspace(0, h - 1, min(h, per_axis)).round().astype(int))
    cols = np.unique(np.linspace(0, w - 1, min(w, per_axis)).round().astype(int))
    centres = cell_centres(cell_saliency(proto, images, rows, cols, features))
    fit = fit_placement(centres, rows, cols, (h, w))
    out = {**fit, "images": int(len(images)), "cells": [len(rows), len(cols)],
           "source": source or "mean |d cell / d image| (explicam's ONNX differentiation, onnxruntime)"}
    if geometry:
        out["from_geometric_px"] = _from_geometric(centres, rows, cols, (h, w), geometry)
    return out


def _from_geometric(centres, rows, cols, hw, geometry) -> list:
    """Mean (effective - geometric) centre over the inner measured cells, per axis [y, x]."""
    inner = [(idx > 0) & (idx < n - 1) if n >= 3 else np.ones(len(idx), bool) for idx, n in ((rows, hw[0]), (cols, hw[1]))]
    sub = centres[inner[0]][:, inner[1]]
    gy = geometry["stride"][0] * rows[inner[0]] + geometry["offset"][0]
    gx = geometry["stride"][1] * cols[inner[1]] + geometry["offset"][1]
    return [float((sub[..., 0] - gy[:, None]).mean()), float((sub[..., 1] - gx[None, :]).mean())]


def effective_meta(main, images, geometry, what: str, log=print) -> dict | None:
    """measure_effective for the export's metadata, or None with one line saying why not."""
    try:
        eff = measure_effective(main, images, geometry)
    except Exception as exc:  # noqa: BLE001  (a cell without influence, an op without a rule: no effective)
        log(f"no effective placement in the metadata ({str(exc).splitlines()[0]})")
        return None
    eff["images_from"] = what
    log(f"effective centres ({eff['images']} {what}): {eff['stride'][0]:.2f} j + {eff['offset'][0]:.1f} px (y), "
        f"{eff['stride'][1]:.2f} j + {eff['offset'][1]:.1f} px (x)")
    return json.loads(json.dumps(eff))
