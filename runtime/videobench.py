"""`cli.py bench --video` / `python -m runtime.video --bench MODEL`: the whole video loop
against the plain forward pass, measured in the same run, and memory along the way.

The clip is generated (moving shapes on a textured 640x480 background, mp4v) so the
figures do not depend on a camera. The forward rate is the one onnxruntime call per frame
that gradcam needs (logits, features and exact gradients) on an already resized input:
the ceiling the loop can approach. It is measured before and after the loop and averaged,
so a machine that speeds up or slows down during the run does not skew the ratio.
"""
from __future__ import annotations

import os
import tempfile
import time

import cv2
import numpy as np

from runtime.capture import Source
from runtime.images import resize_rgb
from runtime.sinks import NullSink, VideoFileSink
from runtime.video import make_explainers, run_stream


def make_clip(path: str, frames: int, size=(640, 480), fps: float = 30.0) -> str:
    """A synthetic clip (moving shapes on a textured background) written with cv2.VideoWriter."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    background = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                           ((xx + yy) * 3 % 256)], axis=-1).astype(np.uint8)
    fourcc = "MJPG" if path.lower().endswith(".avi") else "mp4v"
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    if not writer.isOpened():
        raise ValueError(f"{path}: OpenCV cannot write {fourcc} video")
    r = max(4, min(w, h) // 8)
    for i in range(frames):
        frame = background.copy()
        cx, cy = int(w / 2 + w / 3 * np.cos(i / 17)), int(h / 2 + h / 3 * np.sin(i / 11))
        cv2.circle(frame, (cx, cy), r, (40, 40, 230), -1)
        cv2.rectangle(frame, (w - cx - r, h - cy - r), (w - cx + r, h - cy + r), (230, 200, 30), -1)
        cv2.putText(frame, str(i), (8, h - 10), cv2.FONT_HERSHEY_SIMPLEX, max(0.4, h / 400), (255, 255, 255), 1)
        writer.write(frame)
    writer.release()
    return path


def rss_mb() -> float:
    """Resident memory now (Linux /proc; peak RSS elsewhere), in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _forward_fps(explainer, frame_rgb, seconds: float) -> float:
    """Rate of the one onnxruntime call per frame that gradcam needs (logits, features,
    exact gradients), on an already preprocessed input: the loop's ceiling."""
    x = explainer.model.preprocess(frame_rgb)
    t = np.full(1, -1, np.int64)
    explainer.model.run(x, t)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 20:
        explainer.model.run(x, t)
        n += 1
    return n / (time.perf_counter() - t0)


def bench_video(model_path, frames: int = 300, method: str = "gradcam", size=(640, 480), kernels: str = "auto",
                threads: int | None = None, output: bool = False, in_flight: int = 2, log=None) -> dict:
    """Frames per second through the whole video loop (capture, resize, explain, overlay,
    labels; plus writing an mp4 when output=True) on a generated clip, against the plain
    forward rate measured in the same run (before and after the loop, averaged), and the
    resident memory at start, early in the loop and at the end."""
    from runtime.explainer import Explainer

    log = log or (lambda msg: None)
    explainer = Explainer(model_path, kernels=kernels, threads=threads, batch_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"writing a {frames}-frame {size[0]}x{size[1]} clip")
        clip = make_clip(os.path.join(tmp, "bench.mp4"), frames, size)
        probe = cv2.VideoCapture(clip)
        ok, first = probe.read()
        probe.release()
        small = cv2.cvtColor(resize_rgb(first, explainer.input_size), cv2.COLOR_BGR2RGB)
        seconds = max(1.0, min(5.0, frames / 200))
        fwd_before = _forward_fps(explainer, small, seconds)
        samples = {}

        def sample(n):  # RSS early (pipeline warm) and along the way
            if n == max(1, frames // 10) or n % max(1, frames // 10) == 0:
                samples[n] = rss_mb()

        sinks = [NullSink(sample)]
        if output:
            sinks.append(VideoFileSink(os.path.join(tmp, "out.mp4"), 30.0))
        rss_start = rss_mb()
        log(f"running the loop ({method}) over {frames} frames")
        workers = make_explainers(model_path, in_flight, kernels, None) if in_flight > 1 else explainer
        res = run_stream(Source(clip, "bench clip", "file"), workers, method, sinks=sinks)
        rss_end = rss_mb()
        fwd_after = _forward_fps(explainer, small, seconds)
    forward = (fwd_before + fwd_after) / 2
    early = samples.get(max(1, frames // 10), rss_start)
    return {
        "model": os.fspath(model_path), "input_size": explainer.input_size, "method": method,
        "frame_size": f"{size[0]}x{size[1]}", "frames": res.frames, "threads": threads or os.cpu_count(),
        "kernels": explainer.kernels, "with_mp4_output": bool(output), "frames_in_flight": in_flight,
        "forward_fps": round(forward, 1), "loop_fps": round(res.fps, 1), "loop_vs_forward": round(res.fps / forward, 3),
        "forward_fps_before_after": f"{fwd_before:.1f} / {fwd_after:.1f}",
        "rss_start_mb": round(rss_start, 1), "rss_early_mb": round(early, 1), "rss_end_mb": round(rss_end, 1),
        "rss_max_in_loop_mb": round(max(samples.values(), default=rss_end), 1),
        "rss_growth_after_warmup_mb": round(rss_end - early, 1),
    }


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m runtime.video", description="Benchmark the video loop.")
    parser.add_argument("--bench", metavar="MODEL", required=True, help="ONNX model to benchmark")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", action="store_true", help="also write the overlays to an mp4")
    args = parser.parse_args(argv)
    result = bench_video(args.bench, args.frames, args.method, threads=args.threads, output=args.output,
                         log=lambda m: print(m, flush=True))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
