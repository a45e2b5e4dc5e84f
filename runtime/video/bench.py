"""`cli.py bench --video` / `python -m explicam.runtime.video.bench --bench MODEL`: the whole video loop
against the plain forward pass, measured in the same run, and memory along the way.

The clip is generated (moving shapes on a textured 640x480 background, mp4v) so the
figures do not depend on a camera. The forward rate is the plain forward pass (the graph
pruned to the classifier, one session on every core, an already resized input): the
rate the network alone reaches. Beside it, the rate of the one onnxruntime call per frame
that gradcam needs (logits, features and exact gradients): the loop's true ceiling.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import cv2
import numpy as np

from explicam.runtime.bench import plain_forward_session
from explicam.runtime.images import resize_rgb
from explicam.runtime.video.capture import Source
from explicam.runtime.video.config import StreamConfig
from explicam.runtime.video.sinks import NullSink, VideoFileSink
from explicam.runtime.video.loop import make_explainers, run_stream


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


def _forward_fps(explainer, plain, frame_rgb, seconds: float) -> tuple[float, float]:
    """Rates of (the plain forward pass, the one onnxruntime call per frame that gradcam
    needs: logits, features and exact gradients), on an already preprocessed input, timed
    call by call in alternation so both see the same machine."""
    x = explainer.model.preprocess(frame_rgb)
    t = np.full(1, -1, np.int64)
    calls = [lambda: plain.run(["probabilities"], {"image": x}), lambda: explainer.model.run(x, t)]
    spent = [0.0, 0.0]
    for call in calls:
        call()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 20:
        for i, call in enumerate(calls):
            t1 = time.perf_counter()
            call()
            spent[i] += time.perf_counter() - t1
        n += 1
    return n / spent[0], n / spent[1]


def bench_video(model_path, frames: int = 3000, method: str = "gradcam", size=(640, 480), kernels: str = "auto",
                threads: int | None = None, output: bool = False, in_flight: int = 2, rounds: int = 3,
                log=None) -> dict:
    """Frames per second through the whole video loop (capture, resize, explain, overlay,
    labels; plus writing an mp4 when output=True) on a generated clip, against the plain
    forward rate, and the resident memory at start, early in the loop and at the end.

    The loop and the forward pass take turns: forward, loop, forward, loop, ..., forward,
    `rounds` loops over a clip of frames / rounds frames. Each loop is compared with the
    mean of the forward rates measured just before and just after it, and the ratio
    reported is the median over the rounds: on a shared machine whose speed drifts by 10-20%
    within a minute, one forward measurement before and one after a single long loop gave
    ratios that moved by as much as the drift. Rounds of ~1000 frames measure the steady
    state; at 200 frames each round's start and drain (threads, the first frames) cost a
    few percent of the rate."""
    from explicam.runtime.explainer import Explainer

    log = log or (lambda msg: None)
    rounds = max(1, int(rounds))
    per_round = max(1, frames // rounds)
    explainer = Explainer(model_path, kernels=kernels, threads=threads, batch_size=1)
    plain, how = plain_forward_session(os.fspath(model_path), threads)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"writing a {per_round}-frame {size[0]}x{size[1]} clip, played {rounds} times")
        clip = make_clip(os.path.join(tmp, "bench.mp4"), per_round, size)
        probe = cv2.VideoCapture(clip)
        ok, first = probe.read()
        probe.release()
        small = cv2.cvtColor(resize_rgb(first, explainer.input_hw), cv2.COLOR_BGR2RGB)
        seconds = max(0.5, min(3.0, frames / rounds / 300))
        samples = {}

        def sample(n):  # RSS early (pipeline warm) and along the way
            if n == max(1, frames // 10) or n % max(1, frames // 10) == 0:
                samples[n] = rss_mb()

        null = NullSink(sample)  # one sink for every round: its frame count runs on
        workers = make_explainers(model_path, in_flight, kernels, None) if in_flight > 1 else explainer
        forward, loops = [_forward_fps(explainer, plain, small, seconds)], []
        rss_start = rss_mb()
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}: the loop ({method}) over {per_round} frames, then the forward pass")
            sinks = [null] + ([VideoFileSink(os.path.join(tmp, f"out{r}.mp4"), 30.0)] if output else [])
            loops.append(run_stream(Source(clip, "bench clip", "file"), workers, StreamConfig(method=method), sinks))
            rss_end = rss_mb()
            forward.append(_forward_fps(explainer, plain, small, seconds))
    def ratios(k):  # each round's loop against the mean of the forward rates either side of it
        return [res.fps / ((forward[r][k] + forward[r + 1][k]) / 2) for r, res in enumerate(loops)]

    def mean(k):
        return round(sum(f[k] for f in forward) / len(forward), 1)

    done, spent = sum(res.frames for res in loops), sum(res.seconds for res in loops)
    early = samples.get(max(1, frames // 10), rss_start)
    return {
        "model": os.fspath(model_path), "input_size": list(explainer.input_hw), "method": method,
        "frame_size": f"{size[0]}x{size[1]}", "frames": done, "rounds": rounds,
        "threads": threads or os.cpu_count(), "kernels": explainer.kernels, "with_mp4_output": bool(output),
        "frames_in_flight": in_flight,
        "plain_forward": how, "forward_fps": mean(0), "gradcam_call_fps": mean(1), "loop_fps": round(done / spent, 1),
        "loop_vs_forward": round(statistics.median(ratios(0)), 3),
        "loop_vs_forward_per_round": " ".join(f"{r:.3f}" for r in ratios(0)),
        "loop_vs_gradcam_call": round(statistics.median(ratios(1)), 3),
        "forward_fps_per_measurement": " ".join(f"{f[0]:.1f}" for f in forward),
        "rss_start_mb": round(rss_start, 1), "rss_early_mb": round(early, 1), "rss_end_mb": round(rss_end, 1),
        "rss_max_in_loop_mb": round(max(samples.values(), default=rss_end), 1),
        "rss_growth_after_warmup_mb": round(rss_end - early, 1),
    }


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m explicam.runtime.video.bench", description="Benchmark the video loop.")
    parser.add_argument("--bench", metavar="MODEL", required=True, help="ONNX model to benchmark")
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", action="store_true", help="also write the overlays to an mp4")
    args = parser.parse_args(argv)
    result = bench_video(args.bench, args.frames, args.method, threads=args.threads, output=args.output,
                         rounds=args.rounds,
                         log=lambda m: print(m, flush=True))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
