"""`python cli.py bench`: milliseconds per image for every method, side by side with
the plain forward pass, in one run on the same images. Ratios, not absolute times, are
the figures to read: they survive a change of machine.

Rows: the plain onnxruntime forward pass (the graph pruned to logits and
probabilities), every CAM method with the numba and the numpy kernels, the INT8 model
where model.int8.onnx exists, beside a user's original ONNX file that file's call and each
method again from the file's own preprocessed input, and any baselines the caller passes
(the command adds the keras.io Grad-CAM tutorial, tf.GradientTape, where TensorFlow and
model.keras are there: the runtime itself never imports TensorFlow).
"""
from __future__ import annotations

import os
import platform
import random
import statistics
import time

import numpy as np
import onnxruntime as ort

from explicam.runtime.explainer import Explainer
from explicam.runtime.model import session_options

SLOW = {"scorecam", "rise", "smoothgrad", "integrated-gradients"}  # many passes per image: fewer repetitions
RISE_MASKS = 64  # RISE is timed on this many masks (its cost is linear in them); "rise, per mask" divides
# SmoothGrad and Integrated Gradients are timed on this many samples (their cost is linear in them);
# "..., per sample" divides and compares with saliency (one forward and backward pass) in the same rounds
GRAD_SAMPLES = 8
# Beside a user's original ONNX file, each method is also timed from the preprocessed tensor that
# the original's bare call is given (explain takes float input as preprocessed): its "x original"
# then compares the method with the plain forward on one input, the photo's resize left out of both
TENSOR_ROW = ", from the tensor"
SAMPLE_OPTIONS = {"smoothgrad": "smoothgrad_samples", "integrated-gradients": "ig_steps"}
# Saliency at batch > 1 a second time with every input-gradient call on the model's one session
# (input_grads_pipelines=1), beside the default one-thread pipelines (methods_input.run_calls)
ONE_SESSION = "saliency, one session"
RERUN = "ablationcam, head re-runs"   # the paper's way, beside the gradient's where the head allows it


def _interleaved(fns: dict, n_images: int, min_seconds: float = 1.0, min_rounds: int = 3,
                 max_rounds: int = 200) -> dict:
    """Median milliseconds per image of each callable, timed in interleaved rounds (one
    call of each per round, after a warm-up call each): a machine that slows down for a
    moment slows every row alike, so the ratios stay honest on a busy box.

    Each round runs the callables in a fresh order (seeded), never starting with the one that
    ended the round before: a call right after itself finds its code and data still in the
    caches. (With every other round reversed, as before, the first and the last row ran twice
    in a row at each turn, so half of their samples were warm ones.)"""
    order = list(fns.items())
    for _, fn in order:
        fn()
    times = {name: [] for name in fns}
    rng, last = random.Random(0), order[-1][0]
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < min_seconds * len(fns)):
        rng.shuffle(order)
        if len(order) > 1 and order[0][0] == last:
            order.append(order.pop(0))
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        last = order[-1][0]
        rounds += 1
    return {name: statistics.median(t) * 1000.0 / n_images for name, t in times.items()}


def rise_per_mask(ex: dict, image, plain, x, min_seconds: float) -> dict:
    """{kernels: (ms per mask, ms per plain forward pass)}: one image explained by RISE on
    RISE_MASKS masks beside RISE_MASKS plain forward passes of that image (batches of 32,
    as RISE runs its masked copies), in rounds of a fraction of a second each; the
    explanation's own main-graph pass counts in (1/RISE_MASKS of the work). Timed apart
    from the bench batch's row: one RISE call on 32 images lasts long enough for this box's
    speed to change under it, and the ratio is per image anyway."""
    x32 = np.ascontiguousarray(np.repeat(x, 32, axis=0))
    calls = -(-RISE_MASKS // 32)
    fns = {"forward": lambda: [plain.run(["probabilities"], {"image": x32}) for _ in range(calls)],
           **{k: (lambda e=e: e.explain(image, "rise", rise_masks=RISE_MASKS)) for k, e in ex.items()}}
    ms = _interleaved(fns, RISE_MASKS, max(min_seconds, 2.0))
    return {k: (ms[k], ms["forward"] * RISE_MASKS / (32 * calls)) for k in ex}


PER_SAMPLE_IMAGES = 4   # the per-sample rows' images: at 224 px two input-gradient calls of 2, as a batch of 32 makes


def per_sample(e: Explainer, images, method: str, min_seconds: float) -> tuple:
    """(ms per sample of `method`, ms per image of saliency): SmoothGrad or IG on GRAD_SAMPLES
    samples of a few images (PER_SAMPLE_IMAGES, fewer in a smaller batch) beside saliency of
    the same images, in interleaved rounds of a fraction of a second. Timed apart from the
    batch's row, as RISE's per mask: the row's rounds last seconds at batch 32, long enough
    for this box's speed to change between the two calls of a round, and the ratio is per
    image anyway (each image's samples are its own calls)."""
    kw = {SAMPLE_OPTIONS[method]: GRAD_SAMPLES}
    fns = {"method": lambda: e.explain(images, method, **kw), "saliency": lambda: e.explain(images, "saliency")}
    ms = _interleaved(fns, len(images), 2 * min_seconds, min_rounds=5)   # 2 s a row by default
    return ms["method"] / GRAD_SAMPLES, ms["saliency"]


def plain_forward_session(model_path: str, threads: int | None):
    """The classifier alone (image -> logits, probabilities): the baseline every method is
    compared with. The export's model.forward.onnx where it exists; else the main graph
    pruned with onnx when installed; else the full graph, said so."""
    from explicam.runtime.model import OnnxModel

    model = OnnxModel(model_path, threads)
    if model.forward_session() is not None:
        return model.forward_session(), "pruned graph (model.forward.onnx)"
    try:
        import onnx
        from onnx.utils import Extractor

        pruned = Extractor(onnx.load(model_path)).extract_model(["image"], ["logits", "probabilities"])
        return ort.InferenceSession(pruned.SerializeToString(), session_options(threads),
                                    providers=["CPUExecutionProvider"]), "pruned graph"
    except ImportError:
        return ort.InferenceSession(model_path, session_options(threads),
                                    providers=["CPUExecutionProvider"]), "full graph (onnx not installed)"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numba  # noqa: F401  (version for the record; camkernels falls back without it)
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {ort.__version__}, "
            f"numba {numba.__version__}, numpy {np.__version__}")


def run_bench(model_path: str, methods=None, batches=(1, 32), threads: int | None = None, images=None,
              min_seconds: float = 1.0, log=print, baselines: dict | None = None, original=None) -> dict:
    """Measure everything on the same images; returns {"rows": [...], "settings": {...}}.
    baselines: {row name: fn(preprocessed batch)}, timed apart against the forward pass.
    original: (row name, bind[, bind_photos]) for the user's original ONNX file
    (export/baselines.py): bind(preprocessed batch) -> the call to time, interleaved with the
    methods; every row then also gets its ratio to it ("x original"). bind_photos(uint8
    batch, preprocess) -> the same file's call with its preprocessing from the photos timed
    too (its own row: what a user who runs the original on photos pays)."""
    ex = {"numba": Explainer(model_path, kernels="numba", threads=threads),
          "numpy": Explainer(model_path, kernels="numpy", threads=threads)}
    model = ex["numba"].model
    (in_h, in_w) = model.input_hw
    rng = np.random.default_rng(0)
    if images is None:  # a fixed set of structured images (smooth blobs): same inputs for every row
        base = rng.random((max(batches), 8, 8, 3))
        images = np.stack([np.asarray(__import__("cv2").resize(b, (in_w, in_h)) * 255, np.uint8) for b in base])
    from explicam.runtime.methods_input import INPUT_GRAD_METHODS, PIPELINE_PIXELS

    methods = [m for m in (methods or ex["numba"].methods) if not (m == "cam" and model.head_kind != "gap")
               and (model.has_input_grads or m not in INPUT_GRAD_METHODS)]
    plain, how = plain_forward_session(model_path, threads)
    rows, original_ms, photos_ms = [], {}, {}

    def add(name, kernels, batch, ms, forward_ms):
        rows.append({"name": name, "kernels": kernels, "batch": batch, "ms_per_image": ms,
                     "ratio": ms / forward_ms})
        orig, photos = original_ms.get(batch), photos_ms.get(batch)
        if orig:
            rows[-1]["ratio_original"] = ms / orig
        if photos and not name.endswith(TENSOR_ROW):   # like for like: both start from the same uint8 photos
            rows[-1]["ratio_photos"] = ms / photos
        log(f"  {name:24s} {kernels:6s} batch {batch:3d}: {ms:9.2f} ms/image  {ms / forward_ms:8.2f}x forward"
            + (f"  {ms / orig:8.2f}x original" if orig else "")
            + (f"  {ms / photos:8.2f}x original from the photos" if "ratio_photos" in rows[-1] else ""))

    int8 = os.path.join(os.path.dirname(os.path.abspath(model_path)), "model.int8.onnx")
    q = Explainer(int8, threads=threads) if os.path.exists(int8) else None
    for batch in batches:
        x_u8 = images[:batch]
        x = model.preprocess(x_u8)
        x_u8 = x_u8 if isinstance(x_u8, np.ndarray) else list(x_u8)
        # the plain forward pass in the explainer's own calls (Explainer.batch_size images
        # each): at batch 32 one call of 32 ran slower per image than calls of 4 (CALL_PIXELS)
        step = ex["numba"].batch_size
        forward = lambda: [plain.run(["probabilities"], {"image": x[s:s + step]}) for s in range(0, len(x), step)]  # noqa: E731
        fast = {("forward (onnxruntime)", "-"): forward}
        if original is not None:
            fast[(original[0], "-")] = original[1](x)
            if len(original) > 2:   # the same, from the uint8 photos: the preprocessing timed, as explain's is
                fast[(original[0] + ", from the photos", "-")] = original[2](x_u8, model.preprocess)
        if q is not None:
            fast[("forward INT8", "-")] = lambda: q.model.run(x, np.full(batch, -1), ["probabilities"])
            fast[("gradcam INT8", q.kernels)] = lambda: q.explain(x_u8, "gradcam")
        for method in methods:
            for kernels, e in ex.items():
                if method not in SLOW:
                    fast[(method, kernels)] = lambda e=e, m=method: e.explain(x_u8, m)
            if method == "saliency" and batch > 1 and model.workers > 1:   # the pipelines' gain, side by side
                fast[(ONE_SESSION, "numba")] = lambda: ex["numba"].explain(x_u8, "saliency", input_grads_pipelines=1)
            if method == "ablationcam" and model.meta.get("head_ablation") == "linear":
                fast[(RERUN, "numba")] = lambda: ex["numba"].explain(x_u8, "ablationcam", ablation_rerun=True)
            if original is not None and method not in SLOW:   # the bare call's own input: see TENSOR_ROW
                fast[(method + TENSOR_ROW, "numba")] = lambda m=method: ex["numba"].explain(x, m)
        ms = _interleaved(fast, batch, min_seconds)
        fwd = ms[("forward (onnxruntime)", "-")]
        if original is not None:
            original_ms[batch] = ms[(original[0], "-")]
            photos_ms[batch] = ms.get((original[0] + ", from the photos", "-"))
        for (name, kernels), value in ms.items():
            add(name, kernels, batch, value, fwd)
        for method in [m for m in methods if m in SLOW]:  # a few rounds, each beside its own forward pass
            # ten forward calls per round: one call beside a half-second explanation is too noisy
            kw = {"rise_masks": RISE_MASKS} if method == "rise" else {}
            kinds = ex
            if method in SAMPLE_OPTIONS:  # no per-pixel kernel work to compare: numba alone, beside saliency
                kw, kinds = {SAMPLE_OPTIONS[method]: GRAD_SAMPLES}, {"numba": ex["numba"]}
            slow = {"forward": lambda: [forward() for _ in range(10)],
                    **{k: (lambda e=e, m=method: e.explain(x_u8, m, **kw)) for k, e in kinds.items()}}
            if method == "scorecam" and model.masked_forward() is not None:  # before/after receptive-field crops
                slow["whole"] = lambda m=method: ex["numba"].explain(x_u8, m, scorecam_crop=False)
            # at batch 32 a round of SmoothGrad or IG lasts seconds, long enough for this VM to drift: 4
            rounds = (5 if batch <= 4 else 4) if method in SAMPLE_OPTIONS else (3 if batch <= 4 else 1)
            ms = _interleaved(slow, batch, 0.0, min_rounds=rounds)
            ms["forward"] /= 10
            label = {"rise": f"rise ({RISE_MASKS} masks)", **{m: f"{m} ({GRAD_SAMPLES} samples)" for m in SAMPLE_OPTIONS}}
            for kernels in kinds:
                add(label.get(method, method), kernels, batch, ms[kernels], ms["forward"])
            if method in SAMPLE_OPTIONS:  # x forward here reads as "x saliency" (one forward + backward)
                add(f"{method}, per sample (x saliency)", "numba", batch,
                    *per_sample(ex["numba"], x_u8[:PER_SAMPLE_IMAGES], method, min_seconds))
            if method == "rise":  # x forward here reads as "x N forward passes": see rise_per_mask
                for kernels, value in rise_per_mask(ex, x_u8[:1], plain, x[:1], min_seconds).items():
                    add("rise, per mask", kernels, batch, *value)
            if "whole" in ms:
                add(f"{method}, whole images", "numba", batch, ms["whole"], ms["forward"])
        for name, fn in (baselines or {}).items():  # apart: TensorFlow's idle threads would slow the other rows
            ms = _interleaved({"forward": forward, "baseline": lambda fn=fn: fn(x)}, batch, min_seconds)
            add(name, "-", batch, ms["baseline"], ms["forward"])
    settings = {"model": model_path, "input_size": f"{in_h}x{in_w}", "kernel": model.kernel, "plain_forward": how,
                "onnxruntime": "ORT_ENABLE_ALL, sequential, intra_op_num_threads="
                               f"{threads or os.cpu_count()}, inter_op 1, spinning inside a call only (force_spinning_stop), "
                               f"{ex['numba'].batch_size} images per call"
                               + (f"; input gradients: {model.workers} one-thread pipelines of "
                                  f"{max(1, PIPELINE_PIXELS // (in_h * in_w))} image(s) per call from two calls on"
                                  if model.has_input_grads and model.workers > 1 else ""),
                "machine": machine()}
    if original is not None:
        settings["original"] = original[0]
    masked = model.masked_forward()
    if masked is not None:
        settings["scorecam"] = (f"masked images run only where each mask reaches (model.blocks.onnx), "
                                f"{masked.workers} one-thread pipelines")
        if masked.work[1]:
            settings["scorecam"] += f", {masked.work_fraction:.0%} of the convolution work of whole images"
    return {"rows": rows, "settings": settings}


def to_markdown(result: dict) -> str:
    orig = any("ratio_original" in r for r in result["rows"])
    photos = any("ratio_photos" in r for r in result["rows"])

    def cell(r, key, shown):
        return (f" {r[key]:.2f} |" if key in r else " |") if shown else ""

    lines = ["| what | kernels | batch | ms / image | x forward |" + (" x original |" if orig else "")
             + (" x original from the photos |" if photos else ""),
             "|---|---|---:|---:|---:|" + ("---:|" if orig else "") + ("---:|" if photos else "")]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['kernels']} | {r['batch']} | {r['ms_per_image']:.2f} | {r['ratio']:.2f} |"
                     + cell(r, "ratio_original", orig) + cell(r, "ratio_photos", photos))
    s = result["settings"]
    about = f"kernel {s['kernel']}, {s['input_size']}" if s["kernel"] else s["input_size"]
    lines += ["", f"Model: {s['model']} ({about}); plain forward: {s['plain_forward']}; onnxruntime: {s['onnxruntime']}"
              + (f"; Score-CAM: {s['scorecam']}" if "scorecam" in s else "")
              + ("; x original: against the plain forward of the ONNX file the export read, timed in the same "
                 f"rounds (rows '{TENSOR_ROW[2:]}': the method started from that call's own preprocessed input)"
                 if orig else "")
              + ("; x original from the photos: against that file's call with its own preprocessing of the same "
                 "uint8 photos (resize, normalisation, layout) timed too, as every explanation row's is" if photos else "")
              + ".", f"Machine: {s['machine']}."]
    return "\n".join(lines)
