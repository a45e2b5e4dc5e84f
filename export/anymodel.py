"""`python cli.py export --model FILE`: any image classifier in, an explicam model out.

The walk of one export:

    .onnx (PyTorch, TensorFlow, anywhere) -----------------+
    .keras / .h5 -> safe load -> tf2onnx forward graph ----+-> graph.prepare: image input,
        score (pre-softmax), static size, dynamic batch -> pick the feature tensor (auto or
        named) -> autodiff: features (NHWC) and grads = d score[target] / d features, target
        with a default -> self-check with onnxruntime alone (outputs as the original's,
        gradients against central finite differences) -> the user's preprocessing in front
        (prologue) -> head and forward side files, metadata -> atomic writes, model.onnx last.

Nothing is written when a check fails, and a model file never gets to run code (sources.py).
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field

import numpy as np

from explicam.export.headgrad import head_side_files
from explicam.export.more import more_metadata, side_files
from explicam.export.onnx import (ExportError, classifier_only, forward_parity, forward_path_for, head_model,
                                  head_path_for, set_metadata, write_atomic)
from explicam.export.prologue import Preprocess, add_prologue, read_labels

LINEAR = ("Gemm", "MatMul", "Add")
LAYOUT_ONLY = ("Transpose", "Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Dropout")


@dataclass
class ExportConfig:
    """What `cli.py export --model FILE` exports and how (its options)."""
    model: str
    layer: str = "auto"                 # the feature tensor: auto, an ONNX tensor name or a Keras layer name;
                                        # several comma-separated, or auto:K (export/layers.py)
    output: str | None = None           # the explained output, when the graph has several
    pre: Preprocess = field(default_factory=Preprocess)
    input_hw: tuple | None = None       # (H, W) when the file's spatial size is dynamic
    layout: str = "auto"                # auto | nchw | nhwc: the file's input layout
    resize_shorter: int | None = None   # torchvision's Resize(S) + CenterCrop; None: plain resize
    labels: str | None = None           # class names file
    out: str | None = None              # default runs/<file stem>/model.onnx
    samples: int = 4                    # random inputs for the self-check
    input_grads: bool = False           # also model.inputgrads.onnx: d score / d image (export/input_grads.py)


def default_out(model_path: str) -> str:
    stem = os.path.splitext(os.path.basename(model_path))[0]
    return os.path.join("runs", stem, "model.onnx")


def _info(main) -> dict:
    from explicam.export.autodiff import META_KEY

    return json.loads({p.key: p.value for p in main.metadata_props}[META_KEY])


def head_kind(head) -> str:
    """"gap" when the head is global average pooling followed by one linear layer (classic
    CAM's weights are then exactly the summed gradients), else "other"."""
    if head is None:
        return "other"
    ops = [n.op_type for n in head.graph.node if n.op_type not in LAYOUT_ONLY and n.op_type != "Softmax"]
    pooled = ops[:1] in (["GlobalAveragePool"], ["ReduceMean"])
    return "gap" if pooled and ops[1:] in (["Gemm"], ["MatMul"], ["MatMul", "Add"]) else "other"


def _prologue_error(before, after, pre: Preprocess, hw) -> float:
    """Largest relative difference between the graph fed the user's preprocessing in numpy
    and the graph with that preprocessing inside it, on random images."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    u = rng.random((2, *hw, 3), dtype=np.float32)
    info = _info(before)
    s0 = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"])
    want = s0.run(["logits", "grads"], {info["input"]: pre.numpy(u)})
    got = s1.run(["logits", "grads"], {"image": u})
    return max(float(np.abs(g - w).max() / max(1.0, np.abs(w).max())) for g, w in zip(got, want))


def _load(cfg: ExportConfig, log):
    """(prepared Graph, ONNX source proto, [(name, feature tensor)]: the primary first) for
    any supported file."""
    from explicam.export.graph import GraphError, prepare
    from explicam.export.layers import named_layers, parse_layers, resolve_layers
    from explicam.export.sources import SourceError, load_keras, open_keras_as_onnx

    ext = os.path.splitext(cfg.model)[1].lower()
    try:
        items = parse_layers(cfg.layer)
        if ext in (".keras", ".h5", ".hdf5"):
            keras_model = load_keras(cfg.model)
            names = named_layers(items)
            source, tensors = open_keras_as_onnx(keras_model, cfg.input_hw, names or None)
            g = prepare(source, output="explicam_scores")
            return g, source, resolve_layers(g, items, dict(zip(names, tensors or [])))
        if ext != ".onnx":
            raise ExportError(f"{cfg.model}: unsupported model file (expected .onnx, .keras or .h5)")
        g = prepare(cfg.model, input_size=cfg.input_hw, layout=cfg.layout, output=cfg.output)
        return g, cfg.model, resolve_layers(g, items)  # the self-check compares with the user's own file
    except (GraphError, SourceError) as exc:
        msg = str(exc)
        raise ExportError(msg if cfg.model in msg else f"{cfg.model}: {msg}") from None


def export_any(cfg: ExportConfig, log=print) -> dict:
    from explicam import __version__
    from explicam.export.autodiff import gradient_model, self_check
    from explicam.export.geometry import geometry_for_metadata
    from explicam.export.graph import GraphError

    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # a default `target` input is on purpose: no warning per session
    g, source, layers = _load(cfg, log)   # [(name, tensor)], the primary first
    features = layers[0][1]
    shape = g.shapes[features]
    lay = g.layouts.get(features, "NCHW")
    hw = tuple(int(d) for d in (g.shapes[g.input][2:4] if g.layout == "NCHW" else g.shapes[g.input][1:3]))
    channels = int(g.shapes[g.input][1 if g.layout == "NCHW" else 3])
    log(f"feature tensor: {features} {list(shape)} ({lay}); score: {g.score}"
        + (f" (input of the final {g.activation})" if g.activation else ""))
    pre = Preprocess(**{**cfg.pre.__dict__, "layout": g.layout.lower()})
    try:
        pre.check(channels)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    try:
        main = gradient_model(g, features, [t for _, t in layers[1:]])
    except GraphError as exc:  # an op without a gradient rule on the path, ...
        raise ExportError(f"{cfg.model}: {exc}") from None
    report, bad = self_check(source, main, samples=cfg.samples)
    before = main
    main = _with_prologue(before, pre, hw)
    report["prologue"] = _prologue_error(before, main, pre, hw)
    if not report["prologue"] <= 1e-5:
        bad.append(f"prologue differs by {report['prologue']:.2e} (tolerance 1e-05)")
    head = head_model(main)
    sides, head_meta = [], {}   # model.headgrad.onnx, model.recipro.onnx: each must agree with model.onnx and its head
    if head is not None:
        sides, checks, head_meta = head_side_files(main, head, np.random.default_rng(3).random((4, *hw, 3)))
        report.update(checks)
        bad += [f"{k} differs by {v:.2e} (tolerance 1e-04)" for k, v in checks.items() if not v <= 1e-4]
    log("self-check with onnxruntime, every check: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
    if bad:
        raise ExportError(f"{cfg.model}: the exported graph disagrees with the original, nothing written: "
                          + "; ".join(bad))

    info = _info(main)
    out = cfg.out or default_out(cfg.model)
    names = read_labels(cfg.labels, info["classes"]) if cfg.labels else [f"class_{i}" for i in range(info["classes"])]
    meta = {
        "explicam_version": __version__,
        "source_file": os.path.basename(cfg.model),
        # where the source is, relative to the model's folder (no user's home in a shared file): `bench` times it
        "source_path": os.path.relpath(os.path.abspath(cfg.model), os.path.dirname(os.path.abspath(out))),
        "class_names": names,
        "input_name": "image",
        "input_size": hw[0] if hw[0] == hw[1] else list(hw),
        "input_layout": "NHWC",
        "channel_order": "RGB",
        "value_range": [0.0, 1.0],
        "resize": "shorter" if cfg.resize_shorter else "bilinear",
        "resize_shorter": int(cfg.resize_shorter) if cfg.resize_shorter else None,
        "preprocess": pre.as_meta(),
        "kernel": None,
        "head": head_kind(head),
        "feature_layer": features,
        "feature_shape": info["feature_shape"],
        "score": info["score"],
        "gradient": "grads = d score[target] / d features (exact, explicam's ONNX differentiation; "
                    "negative target = top-1)",
        "head_file": os.path.basename(head_path_for(out)) if head is not None else "",
        "forward_file": os.path.basename(forward_path_for(out)),
        **{key: os.path.basename(path_for(out)) for key, path_for, _ in sides},
        **head_meta,
        "blocks_file": "",
        "blocks": {},
        "export_id": uuid.uuid4().hex,
        "self_check": report,
    }
    meta["geometry"] = geometry_for_metadata(main, log=log)
    meta.update(more_metadata(main, [name for name, _ in layers], cfg.input_grads,
                              np.random.default_rng(2).random((4, *hw, 3), dtype=np.float32), "random images", out, log))
    set_metadata(main, meta)
    grads = side_files(main, meta, out, log) if cfg.input_grads else []
    forward = classifier_only(main)
    checks = _forward_check(main, forward, hw)   # the same nodes as model.onnx: the same numbers expected
    log("model.forward.onnx against model.onnx: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    bad = [f"{k} differs by {v:.2e} (tolerance 1e-04)" for k, v in checks.items() if not v <= 1e-4]
    if bad:
        raise ExportError(f"{cfg.model}: the pruned classifier disagrees with model.onnx, nothing written: "
                          + "; ".join(bad))
    report.update(checks)
    set_metadata(main, meta)   # the self-check's report with them
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    written = []
    if head is not None:
        set_metadata(head, {"role": "head", "export_id": meta["export_id"]})
        write_atomic(head.SerializeToString(), head_path_for(out))
        written.append(head_path_for(out))
    for key, path_for, proto in sides:
        set_metadata(proto, {"role": key[:-len("_file")], "export_id": meta["export_id"]})
        write_atomic(proto.SerializeToString(), path_for(out))
        written.append(path_for(out))
    write_atomic(forward.SerializeToString(), forward_path_for(out))
    written.append(forward_path_for(out))
    for path, proto in grads:
        write_atomic(proto.SerializeToString(), path)
        written.append(path)
    write_atomic(main.SerializeToString(), out)  # last: a model.onnx never names files that are not there yet
    log(f"wrote {out}, " + ", ".join(written))
    return {"onnx": out, "head": head_path_for(out) if head is not None else None, "forward": forward_path_for(out),
            "parity": report, "metadata": meta, "features": features}


def _forward_check(main, forward, hw) -> dict:
    """forward_probabilities, forward_features (export/onnx.py forward_parity) on two random images."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (main, forward)]
    return forward_parity(*sessions, np.random.default_rng(4).random((2, *hw, 3), dtype=np.float32))


def _with_prologue(main, pre: Preprocess, hw):
    import copy

    new = copy.deepcopy(main)
    add_prologue(new, _info(main)["input"], pre, hw)
    info = _info(main)
    info["input"] = "image"
    for p in new.metadata_props:
        if p.key == "explicam_autodiff":
            p.value = json.dumps(info)
    return new
