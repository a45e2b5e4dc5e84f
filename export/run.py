"""`python cli.py export`: find the trained model, convert, prove parity, write atomically."""
from __future__ import annotations

import json
import os
import uuid

import numpy as np

from explicam.export.blocks import build_blocks
from explicam.export.geometry import geometry_for_metadata
from explicam.export.headgrad import head_side_files
from explicam.export.more import more_metadata, side_files
from explicam.export.onnx import (ExportError, blocks_path_for, build_onnx, classifier_only, forward_parity,
                                  forward_path_for, head_path_for, load_keras_model, make_metadata, set_metadata,
                                  write_atomic)


def resolve_model_path(kernel: int = 4, run_dir: str | None = None, model: str | None = None) -> str:
    if model:
        if not os.path.isfile(model):
            raise ExportError(f"no model file at {model}")
        return model
    run_dir = run_dir or os.path.join("runs", f"k{kernel}")
    if not os.path.isdir(run_dir):
        raise ExportError(f"run folder {run_dir} not found; train first: python cli.py train --data DIR "
                          f"--kernel {kernel}")
    path = os.path.join(run_dir, "model.keras")
    if not os.path.isfile(path):
        raise ExportError(f"{run_dir} has no model.keras (training not started or not finished an epoch yet)")
    return path


def sample_images(summary: dict, size: int, count: int = 8, split: str = "val"):
    """A few real images of the run's own dataset (one per class in turn), or None."""
    from explicam.train.data import DataError, Split, find_dataset, load_images

    data = summary.get("data")
    if not data or not os.path.isdir(data):
        return None
    try:
        ds = find_dataset(data)
    except DataError:
        return None
    part = ds.val if split == "val" else ds.train
    # round-robin over classes: the i-th image of each class before the (i+1)-th of any
    ranks, picks = {}, []
    for idx, label in enumerate(part.labels.tolist()):
        ranks[label] = ranks.get(label, -1) + 1
        picks.append((ranks[label], idx))
    chosen = [i for _, i in sorted(picks)][:count]
    x, _, _ = load_images(Split([part.paths[i] for i in chosen], part.labels[chosen]), size)
    return x.astype(np.float32) / 255.0 if len(x) else None


def check_parity(model, main_bytes: bytes, head_bytes: bytes, images, layer: str, forward_bytes: bytes = b"",
                 blocks_bytes: bytes = b"", blocks: dict | None = None, extra=(), input_grads_bytes: bytes = b"") -> dict:
    import onnxruntime as ort

    from explicam.export.parity import compare, keras_features_logits_grads

    opts = ort.SessionOptions()
    session = ort.InferenceSession(main_bytes, opts, providers=["CPUExecutionProvider"])
    report = compare(model, session, images, layer)
    head = ort.InferenceSession(head_bytes, opts, providers=["CPUExecutionProvider"])
    feats, logits, _ = keras_features_logits_grads(model, layer, images, 0)
    head_logits = head.run(["logits"], {"features": feats})[0]
    report["head_logits"] = float(np.abs(head_logits - logits).max())
    if forward_bytes:  # the pruned classifier: the same nodes, so the same probabilities and features
        forward = ort.InferenceSession(forward_bytes, opts, providers=["CPUExecutionProvider"])
        report.update(forward_parity(session, forward, images))
    if blocks_bytes:  # masked images run block by block, only where the mask reaches
        report["blocks_features"] = _blocks_parity(session, head, blocks_bytes, blocks, images)
    report.update(_more_parity(model, session, images, extra, input_grads_bytes))
    return report


def _more_parity(model, session, images, extra, input_grads_bytes) -> dict:
    """Earlier feature layers' gradients (export --layer conv4,conv3) and the input gradients
    (--input-grads) against tf.GradientTape, relative to their largest value, a few classes.
    On random images: these gradients cross max pools, and the built-in dataset's flat regions
    give windows of values equal up to rounding, where TensorFlow (oneDNN) and onnxruntime
    can round one way and the other and send the gradient to different (equally valid)
    elements; random pixels leave no such ties."""
    import onnxruntime as ort
    import tensorflow as tf

    from explicam.export.parity import keras_features_logits_grads

    x = np.random.default_rng(5).random(np.shape(images), dtype=np.float32)
    classes = sorted({0, int(model.output_shape[-1]) - 1})
    report = {}
    for k, name in enumerate(extra, 1):
        worst = 0.0
        for c in classes:
            got = session.run([f"grads_{k}"], {"image": x, "target": np.full(len(x), c, np.int64)})[0]
            want = keras_features_logits_grads(model, name, x, c)[2]
            worst = max(worst, float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12))
        report[f"grads_rel_{name}"] = worst
    if input_grads_bytes:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3   # (the `target` input's default is an initializer: a warning per session)
        side = ort.InferenceSession(input_grads_bytes, opts, providers=["CPUExecutionProvider"])
        worst = 0.0
        for c in classes:
            got = side.run(["input_grads"], {"image": x, "target": np.full(len(x), c, np.int64)})[0]
            t = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(t)
                score = tf.reduce_sum(model(t, training=False)[:, c])
            want = tape.gradient(score, t).numpy()
            worst = max(worst, float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12))
        report["input_grads_rel"] = worst
    return report


def _blocks_parity(session, head, blocks_bytes: bytes, blocks: dict, images) -> float:
    """Largest difference between the conv4 maps of MaskedForward and of the main graph,
    each image under a full mask and under smooth masks zero over part of the image (conv4
    rather than probabilities: a confident model's probabilities hide small errors)."""
    import onnxruntime as ort

    from explicam.runtime.masked import MaskedForward

    x = np.asarray(images, np.float32)
    size = x.shape[1]
    masked = MaskedForward(ort.InferenceSession(blocks_bytes, providers=["CPUExecutionProvider"]), head, blocks,
                           size, workers=1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    masks = np.stack([np.ones((size, size)), np.maximum(0, 0.5 - np.hypot(yy - 0.3, xx - 0.6)),
                      np.where(xx < 0.2, 1 - yy, 0), np.maximum(0, yy - 0.9) * xx]).astype(np.float32)
    worst = 0.0
    for image in x:
        inputs = image[None] * masks[..., None]
        want = session.run(["features"], {"image": inputs, "target": np.full(len(masks), -1, np.int64)})[0]
        got = np.stack([masked.features(image.transpose(2, 0, 1), m)[0].transpose(1, 2, 0) for m in masks])
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def seed_layers(spec: str) -> list[str]:
    """--layer for an explicam run: Keras layer names; auto is conv4, auto:K conv4 and the K - 1
    convolutions before it (each the end of one resolution stage of the seed network)."""
    from explicam.export.layers import parse_layers
    from explicam.train.model import FEATURE_LAYER, FILTERS

    out = []
    for item in parse_layers(spec):
        if item.startswith("auto:"):
            out += [f"conv{i}" for i in range(len(FILTERS) - 1, -1, -1)][:int(item[5:])]
        else:
            out.append(FEATURE_LAYER if item == "auto" else item)
    return out


def export_model(kernel: int = 4, run_dir: str | None = None, model_path: str | None = None,
                 layer: str = "conv4", out: str | None = None, int8: bool = False, samples: int = 8,
                 log=print, extra_layers=(), input_grads: bool = False) -> dict:
    from explicam.export.parity import failures

    model_path = resolve_model_path(kernel, run_dir, model_path)
    out = out or os.path.join(os.path.dirname(model_path) or ".", "model.onnx")
    summary_path = os.path.join(os.path.dirname(model_path) or ".", "summary.json")
    summary = {}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    model = load_keras_model(model_path)
    log(f"converting {model_path} (feature layer {layer}) ...")
    main, head = build_onnx(model, layer, extra=extra_layers)
    blocks, geometry = build_blocks(model, layer)
    meta = make_metadata(model, layer, summary, os.path.basename(head_path_for(out)),
                         os.path.basename(forward_path_for(out)), os.path.basename(blocks_path_for(out)), geometry)
    meta["export_id"] = uuid.uuid4().hex  # ties the files together (runtime/model.py checks it)
    meta["geometry"] = geometry_for_metadata(main, log=log)  # where each feature cell looks (export/geometry.py)
    size = int(model.input_shape[1])
    images = sample_images(summary, size, samples)
    source = "validation images"
    if images is None:
        images = np.random.default_rng(0).random((samples, size, size, 3), dtype=np.float32)
        source = "random images (the run's dataset was not found)"
    meta.update(more_metadata(main, [layer, *extra_layers], input_grads, images[:4], source, out, log))
    sides, checks, head_meta = head_side_files(main, head, images)   # each must agree with model.onnx and its head
    meta.update({key: os.path.basename(path_for(out)) for key, path_for, _ in sides}, **head_meta)
    set_metadata(main, meta)
    set_metadata(head, {**meta, "role": "head"})
    main_bytes, head_bytes = main.SerializeToString(), head.SerializeToString()
    forward_bytes = classifier_only(main).SerializeToString()
    blocks_bytes = b""
    if blocks is not None:
        set_metadata(blocks, {"role": "blocks", "export_id": meta["export_id"], "blocks": geometry})
        blocks_bytes = blocks.SerializeToString()
    grads = [(path, proto.SerializeToString()) for path, proto in side_files(main, meta, out, log)] if input_grads else []
    side_bytes = grads[0][1] if grads else b""

    report = check_parity(model, main_bytes, head_bytes, images, layer, forward_bytes, blocks_bytes, geometry,
                          extra_layers, side_bytes)
    report.update(checks)
    log(f"parity on {len(images)} {source}, every class: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
    bad = failures(report)
    if bad:
        raise ExportError("ONNX disagrees with Keras, nothing written: " + "; ".join(bad))

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    write_atomic(head_bytes, head_path_for(out))
    write_atomic(forward_bytes, forward_path_for(out))
    written = [head_path_for(out), forward_path_for(out)]
    for key, path_for, proto in sides:
        set_metadata(proto, {"role": key[:-len("_file")], "export_id": meta["export_id"]})
        write_atomic(proto.SerializeToString(), path_for(out))
        written.append(path_for(out))
    for path, data in grads:
        write_atomic(data, path)
        written.append(path)
    if blocks_bytes:
        write_atomic(blocks_bytes, blocks_path_for(out))
        written.append(blocks_path_for(out))
    write_atomic(main_bytes, out)  # last: a model.onnx never names files that are not there yet
    result = {"onnx": out, "head": head_path_for(out), "forward": forward_path_for(out),
              "blocks": blocks_path_for(out) if blocks_bytes else None, "parity": report, "metadata": meta}
    log(f"wrote {out}, " + ", ".join(written[:-1]) + f" and {written[-1]}")
    if int8:
        from explicam.export.quantize import quantize_model

        result["int8"] = quantize_model(out, summary, log=log)
    return result
