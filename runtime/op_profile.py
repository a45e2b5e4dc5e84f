"""`python cli.py bench --profile`: where one onnxruntime call's time goes, per op type, for
each graph of an export (model.forward.onnx, model.onnx, model.inputgrads.onnx where they
are there), from onnxruntime's own profiler: the kernel time of every node over many calls,
summed by op type and divided by the calls. The graph profiled is the one onnxruntime runs
after its optimisations, so the op types include its own (ReorderInput and ReorderOutput,
the moves into and out of its blocked NCHWc layout; fused Conv). Timings under the profiler
run a little slower than without it; read the shares, and the bench's ratios for speed.
"""
from __future__ import annotations

import collections
import json
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort

from explicam.runtime.model import OnnxModel, session_options

FILES = (("forward_file", "the classifier alone"), (None, "the main graph (features and gradients)"),
         ("input_grads_file", "d score / d image (saliency, SmoothGrad, IG)"))


def profile_file(path: str, x: np.ndarray, input_name: str, threads: int | None, calls: int = 30) -> dict:
    """{"file", "call_ms", "kernel_ms", "ops": [(op type, ms per call, nodes), ...] slowest
    first} of `calls` runs of the file on x (after three warm-up runs, not counted)."""
    opts = session_options(threads)
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="explicam-profile-") as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feeds = {input_name: x}
        for _ in range(3):
            session.run(None, feeds)
        start = time.perf_counter()
        for _ in range(calls):
            session.run(None, feeds)
        wall = (time.perf_counter() - start) * 1000.0 / calls
        with open(session.end_profiling()) as f:
            events = json.load(f)
    # the profiler records the warm-up runs too (the first one allocates): count what follows them
    runs = sorted((e["ts"] + e["dur"] for e in events if e.get("name") == "model_run"))
    after = runs[2] if len(runs) > 3 else -1
    total, nodes = collections.defaultdict(float), collections.defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] > after:
            op = e.get("args", {}).get("op_name", "?")
            total[op] += e["dur"] / 1000.0
            nodes[op].add(e["name"])
    counted = calls if after >= 0 else calls + 3
    ops = sorted(((op, ms / counted, len(nodes[op])) for op, ms in total.items()), key=lambda r: -r[1])
    return {"file": os.path.basename(path), "call_ms": wall, "kernel_ms": sum(r[1] for r in ops), "ops": ops}


def profile_export(model_path: str, batch: int = 1, threads: int | None = None, calls: int = 30) -> list:
    """profile_file of each graph the export has, on `batch` random images in its value range."""
    model = OnnxModel(model_path, threads)
    lo, hi = model.value_range
    x = np.random.default_rng(0).uniform(lo, hi, (batch, *model.input_hw, 3)).astype(np.float32)
    folder = os.path.dirname(os.path.abspath(model_path))
    out = []
    for key, what in FILES:
        name = model.meta.get(key) if key else os.path.basename(model_path)
        if name and os.path.isfile(os.path.join(folder, name)):
            out.append({**profile_file(os.path.join(folder, name), x, model.input_name, threads, calls), "what": what})
    return out


def to_markdown(results: list, batch: int, threads: int | None, top: int = 12) -> str:
    lines = []
    for r in results:
        lines += [f"{r['file']}, {r['what']}: {r['call_ms']:.2f} ms per call of {batch} image(s) under the "
                  f"profiler, {r['kernel_ms']:.2f} ms in kernels, {threads or os.cpu_count()} thread(s)", "",
                  "| op type | ms per call | share | nodes |", "|---|---:|---:|---:|"]
        for op, ms, n in r["ops"][:top]:
            lines.append(f"| {op} | {ms:.3f} | {ms / r['kernel_ms']:.0%} | {n} |")
        if len(r["ops"]) > top:
            rest = r["ops"][top:]
            lines.append(f"| {len(rest)} more op type(s) | {sum(o[1] for o in rest):.3f} | "
                         f"{sum(o[1] for o in rest) / r['kernel_ms']:.0%} | {sum(o[2] for o in rest)} |")
        lines.append("")
    return "\n".join(lines)
