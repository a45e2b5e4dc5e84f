"""model.onnx -> model.int8.onnx: onnxruntime static quantization (QDQ, per-channel weights),
then FP32 vs INT8 measured in the same run on the validation split.

What is quantized, and why only that: the body, image -> conv4 features (Conv, Relu,
MaxPool), which holds nearly all the arithmetic. Everything after the `features` output
stays float: the Dense head, and the hand-written gradient graph (ArgMax/OneHot routing
through the 2x2 max pool, the MatMul with the transposed Dense kernel). Quantizing that
part would gain little time and break what the explanations rely on: ArgMax on rounded
values picks other pool elements, and a rounded one-hot/MatMul is no longer the gradient.
So `grads` is the exact gradient of the INT8 model's own (float) head at its own
(dequantized) features, and `features` and `grads` stay float32 tensors.

Activations are uint8 and weights int8 (onnxruntime's advice for x86 CPUs, and what ARM
runs well too), weights symmetric per output channel; calibration is MinMax over
training images. The file is written under a temporary name and renamed only after the
comparison ran, so a failure anywhere leaves no model.int8.onnx behind.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from explicam.export.headgrad import headgrad_path_for
from explicam.export.recipro import recipro_path_for
from explicam.export.onnx import ExportError, head_path_for

FLOAT_AFTER = "features"        # the output where quantization stops
BODY_OPS = ("Conv", "Relu", "MaxPool")
DESCRIPTION = ("int8 static QDQ per-channel (uint8 activations, int8 symmetric weights per output channel, "
               "MinMax calibration; body image->features only, head and gradient graph float)")


def int8_path_for(onnx_path: str) -> str:
    root, _ = os.path.splitext(onnx_path)
    return root + ".int8.onnx"


def _pick(split, count: int | None) -> list[int]:
    """Indices of `count` images taken one class after another (all when count is None), so a
    small calibration set still covers every class."""
    ranks, picks = {}, []
    for idx, label in enumerate(split.labels.tolist()):
        ranks[label] = ranks.get(label, -1) + 1
        picks.append((ranks[label], idx))
    chosen = [i for _, i in sorted(picks)]
    return sorted(chosen[:count] if count else chosen)


def load_split(summary: dict, size: int, split: str, count: int | None = None):
    """(uint8 images (N, S, S, 3), labels) of the run's dataset; ExportError when it is gone."""
    from explicam.train.data import DataError, Split, find_dataset, load_images

    data = summary.get("data")
    if not data:
        raise ExportError("summary.json names no dataset folder: INT8 calibration needs the training images")
    try:
        ds = find_dataset(data)
    except DataError as exc:
        raise ExportError(f"INT8 calibration needs the run's dataset: {exc}") from None
    part = ds.train if split == "train" else ds.val
    idx = _pick(part, count)
    x, y, _ = load_images(Split([part.paths[i] for i in idx], part.labels[idx]), size)
    if not len(x):
        raise ExportError(f"no readable {split} images in {data}")
    return x, y


def body_nodes(model) -> list[str]:
    """Names of the Conv/Relu/MaxPool nodes that compute the `features` output."""
    producer = {out: node for node in model.graph.node for out in node.output}
    seen, stack, names = set(), [FLOAT_AFTER], []
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in BODY_OPS:
            names.append(node.name)
        stack.extend(node.input)
    return names


class _Calibration(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over preprocessed training images, target = top-1."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self.images, self.batch, self.pos = images, batch, 0

    def get_next(self):
        if self.pos >= len(self.images):
            return None
        x = np.ascontiguousarray(self.images[self.pos:self.pos + self.batch], np.float32)
        self.pos += self.batch
        return {"image": x, "target": np.full(len(x), -1, np.int64)}

    def rewind(self):
        self.pos = 0


def quantize_to_bytes(onnx_path: str, calib: np.ndarray, meta: dict) -> bytes:
    """The INT8 model as bytes, with the FP32 file's metadata updated by `meta`."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = onnx.load(onnx_path)
    with tempfile.TemporaryDirectory(prefix="explicam-int8-") as tmp:
        pre, q = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "int8.onnx")
        # onnxruntime's advised first step (shape inference): the quantizer leaves tensors of
        # unknown type alone. tf2onnx already records the body's shapes, so today it changes
        # nothing there (same figures with or without); it guards other graphs.
        quant_pre_process(onnx_path, pre, skip_symbolic_shape=True)
        prepared = onnx.load(pre)
        nodes = body_nodes(prepared)
        if not any(n.op_type == "Conv" and n.name in nodes for n in prepared.graph.node):
            raise ExportError(f"{onnx_path}: no Conv computes the '{FLOAT_AFTER}' output; nothing to quantize")
        quantize_static(pre, q, _Calibration(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(BODY_OPS), nodes_to_quantize=nodes,
                        extra_options={"WeightSymmetric": True})
        model = onnx.load(q)
    # The quantizer does not carry metadata over; the runtime needs all of it.
    merged = {**{e.key: e.value for e in src.metadata_props}, **meta}
    del model.metadata_props[:]
    for key, value in merged.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_note(fp32_ms: float, int8_ms: float) -> str:
    flags = cpu_flags()
    vnni = sorted(f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp") if f in flags)
    have = f"this CPU ({platform.machine()}) has {', '.join(vnni)}" if vnni else \
        f"this CPU ({platform.machine()}) reports no VNNI / dot-product flags (avx512_vnni, avx_vnni)"
    if int8_ms > fp32_ms:
        return (f"INT8 is SLOWER here ({int8_ms:.2f} vs {fp32_ms:.2f} ms): {have}; at batch 1 the quantize/"
                "dequantize steps and the float head/gradient graph outweigh the cheaper int8 convolutions")
    return f"INT8 is {fp32_ms / int8_ms:.2f}x faster here; {have}"


def _session(path: str):
    import onnxruntime as ort

    from explicam.runtime.model import session_options

    return ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])


def predict(session, x: np.ndarray, batch: int = 32) -> np.ndarray:
    out = [session.run(["logits"], {"image": x[i:i + batch], "target": np.full(len(x[i:i + batch]), -1, np.int64)})[0]
           for i in range(0, len(x), batch)]
    return np.concatenate(out).argmax(1)


def latency_ms(sessions: list, x: np.ndarray, runs: int = 100, warmup: int = 10) -> list[float]:
    """Median batch-1 latency of each session (the full forward: every output, as the
    Explainer calls it). The sessions take turns, so drift of the machine hits both alike."""
    times = [[] for _ in sessions]
    for i in range(warmup + runs):
        feed = {"image": x[i % len(x)][None], "target": np.full(1, -1, np.int64)}
        for s, session in enumerate(sessions):
            t0 = time.perf_counter()
            session.run(None, feed)
            if i >= warmup:
                times[s].append(time.perf_counter() - t0)
    return [1000.0 * float(np.median(t)) for t in times]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps; two flat maps agree (1), one flat map does not (0)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    na, nb = np.sqrt((a * a).sum()), np.sqrt((b * b).sum())
    if na < 1e-12 or nb < 1e-12:
        return 1.0 if na < 1e-12 and nb < 1e-12 else 0.0
    return float((a * b).sum() / (na * nb))


def gradcam_agreement(fp32_path: str, int8_path: str, images: np.ndarray, targets: np.ndarray):
    """Per-image Pearson correlations of the Grad-CAM maps, both models explaining the same
    class: (on the (h, w) cams at feature resolution, on the upsampled normalised heatmaps).
    The cams are the primary figure: upsampling smooths differences away."""
    from explicam.runtime.explainer import Explainer

    exps = [Explainer(p, warmup=False).explain(images, "gradcam", target=list(targets)) for p in (fp32_path, int8_path)]
    cams = np.array([pearson(a, b) for a, b in zip(exps[0].cams, exps[1].cams)])
    heat = np.array([pearson(a, b) for a, b in zip(exps[0].heatmaps, exps[1].heatmaps)])
    return cams, heat


def compare(fp32_path: str, int8_path: str, x_val_u8: np.ndarray, y_val: np.ndarray, runs: int = 100) -> dict:
    x = x_val_u8.astype(np.float32) / 255.0
    fp32, int8 = _session(fp32_path), _session(int8_path)
    pred32, pred8 = predict(fp32, x), predict(int8, x)
    ms32, ms8 = latency_ms([fp32, int8], x, runs)
    corr, heat = gradcam_agreement(fp32_path, int8_path, x_val_u8, pred32)
    return {"n_val": int(len(x)), "accuracy_fp32": float((pred32 == y_val).mean()),
            "accuracy_int8": float((pred8 == y_val).mean()), "top1_agreement": float((pred32 == pred8).mean()),
            "latency_ms_fp32": ms32, "latency_ms_int8": ms8, "gradcam_pearson_mean": float(corr.mean()),
            "gradcam_pearson_min": float(corr.min()), "heatmap_pearson_mean": float(heat.mean())}


def report_lines(r: dict) -> list[str]:
    return [
        f"INT8 vs FP32 on {r['n_val']} validation images (same run, this machine):",
        f"  {'':<28}{'FP32':>10}{'INT8':>10}",
        f"  {'top-1 accuracy (%)':<28}{100 * r['accuracy_fp32']:>10.2f}{100 * r['accuracy_int8']:>10.2f}",
        f"  {'latency, batch 1 (ms)':<28}{r['latency_ms_fp32']:>10.2f}{r['latency_ms_int8']:>10.2f}",
        f"  Grad-CAM Pearson FP32 vs INT8, same class, per image: (h x w) cams mean {r['gradcam_pearson_mean']:.4f} "
        f"(min {r['gradcam_pearson_min']:.4f}), {r['heatmap_pearson_mean']:.4f} on the upsampled heatmaps",
        f"  top-1 agreement FP32 vs INT8 {100 * r['top1_agreement']:.1f}%",
        f"  accuracy drop {100 * (r['accuracy_fp32'] - r['accuracy_int8']):+.2f} points (goal < 1); "
        f"heatmap correlation goal > 0.95: {'met' if r['gradcam_pearson_mean'] > 0.95 else 'NOT met'}",
        "  " + cpu_note(r["latency_ms_fp32"], r["latency_ms_int8"]),
    ]


def quantize_model(onnx_path: str, summary: dict, log=print, calib_images: int = 200, out: str | None = None,
                   latency_runs: int = 100) -> dict:
    """Write model.int8.onnx beside `onnx_path` (or at `out`) and return the FP32 vs INT8 figures."""
    from explicam.runtime.model import OnnxModel

    out = out or int8_path_for(onnx_path)
    size = int(summary.get("image_size") or OnnxModel(onnx_path).input_size)
    calib, _ = load_split(summary, size, "train", calib_images)
    x_val, y_val = load_split(summary, size, "val")
    log(f"quantizing {onnx_path} to INT8 (static QDQ, per-channel), calibrated on {len(calib)} training images ...")
    out_dir = os.path.dirname(os.path.abspath(out))
    # Ablation-CAM re-runs the head alone; the INT8 file reuses the FP32 head graph.
    head = os.path.relpath(os.path.abspath(head_path_for(onnx_path)), out_dir)
    data = quantize_to_bytes(onnx_path, calib.astype(np.float32) / 255.0,
                             {"quantization": DESCRIPTION, "head_file": head, "forward_file": "", "blocks_file": "",
                              **{key: os.path.relpath(os.path.abspath(path_for(onnx_path)), out_dir)
                                 for key, path_for in (("headgrad_file", headgrad_path_for),
                                                       ("recipro_file", recipro_path_for))}})
    os.makedirs(out_dir, exist_ok=True)
    tmp = out + ".partial"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        result = compare(onnx_path, tmp, x_val, y_val, latency_runs)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    result["path"] = out
    result["calibration_images"] = int(len(calib))
    for line in report_lines(result):
        log(line)
    log(f"wrote {out}")
    return result
