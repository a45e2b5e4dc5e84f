"""Explaining video: `python cli.py explain --webcam`, `--video FILE`, shown, recorded, served.

One loop for every source, in three threads so that reading, explaining and drawing
overlap (on a 2-core board that is what keeps the loop near the model's own rate):

    capture thread    read a frame, shrink it to the model input   (runtime/capture.py)
    explain thread    one onnxruntime call + the CAM kernels
    main thread       overlay, FPS and top-1 label, sinks          (runtime/sinks.py)

The main thread owns the sinks because GUI windows must live there and because Ctrl-C
arrives there: whatever ends the stream (end of file, camera loss, q, Ctrl-C, SIGTERM),
the `finally` below finishes the video file and shuts the server down.
"""
from __future__ import annotations

import collections
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import cv2

from explicam import camkernels
from explicam.runtime import overlay as ov
from explicam.runtime.images import resize_rgb
from explicam.runtime.video.capture import Capture, End, Mailbox, Source, open_capture
from explicam.runtime.video.config import StreamConfig
from explicam.runtime.video.sinks import ServeSink, VideoFileSink, WindowSink, make_sinks


@dataclass
class StreamResult:
    source: str
    frames: int = 0              # frames explained and written to every sink
    read: int = 0                # frames read from the source
    dropped: int = 0             # frames a live source delivered faster than they could be explained
    seconds: float = 0.0
    reason: str = "end"          # end, lost, stopped (q / window closed / --max-frames), interrupted
    message: str = ""
    outputs: list = field(default_factory=list)   # (path, frames) of finished video files
    url: str | None = None       # the live view's address, without its token
    reconnects: int = 0          # times a network source came back after a gap

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


class FpsMeter:
    """Frames per second over the last ~30 frames: responsive, yet steady enough to read."""

    def __init__(self, window: int = 30):
        self.times = collections.deque(maxlen=window)

    def tick(self) -> float:
        self.times.append(time.perf_counter())
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


def shrink_to_input(image, size, rgb: bool = False):
    """resize_rgb(image, size), faster, and BGR -> RGB in the same pass when rgb=True.
    size: the side of a square input, or (h, w).
    Shrinking a camera frame by area averaging was the loop's largest cost after the model
    (cv2 INTER_AREA plus cvtColor: 0.7 ms at 640x480 -> 128); camkernels.shrink_area gives
    the same pixels (to one level) in 0.28 ms. Without numba: cv2, width then height
    (area averaging is separable, and that order is cheaper). Bilinear cases go to resize_rgb."""
    h, w = image.shape[:2]
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if h <= 2 * out_h or w <= 2 * out_w:
        out = resize_rgb(image, (out_h, out_w))
    elif camkernels.BACKEND == "numba" and image.ndim == 3 and image.dtype == "uint8":
        return camkernels.shrink_area(image, out_h, out_w, swap_rb=rgb)
    else:
        narrow = cv2.resize(image, (out_w, h), interpolation=cv2.INTER_AREA)
        out = cv2.resize(narrow, (out_w, out_h), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB) if rgb else out


class Workers:
    """The explain threads of one stream. Each has its own Explainer (its own onnxruntime
    session): on a small CPU two frames in flight on one thread each keep the cores busier
    than one frame split over two threads, whose halves wait for each other whenever
    capture or drawing takes a core. The last thread to finish hands the End on."""

    def __init__(self, count: int):
        self.left, self.end = count, None
        self.input_ended = threading.Event()
        self.lock = threading.Lock()

    def finish(self, outbox: Mailbox) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            outbox.put(self.end or End("stopped"))


def _explain_thread(explainer, cfg: StreamConfig, inbox: Mailbox, outbox: Mailbox, stop: threading.Event,
                    group: Workers):
    """Explain the frames the capture hands over until an End comes through, with the stream's
    method, target and method options (cfg.options, over the explainer's own)."""
    method, target, options = cfg.method, cfg.target, cfg.options
    try:
        while not stop.is_set():
            item = inbox.get(timeout=0.05)
            if item is None:
                if group.input_ended.is_set():  # another thread took the End: nothing more will come
                    break
                continue
            if isinstance(item, End):
                group.end = item
                group.input_ended.set()
                break
            index, bgr, small = item
            res = explainer.explain(small, method, target, **options)
            name, prob = res.top_k(1)[0][0]
            # a centre-cropped input's heatmap goes back over the part of the frame it came from
            heat = res.heatmap_on(0, bgr.shape) if res.resize_shorter else res.heatmaps[0]
            if not outbox.put((index, bgr, heat, name, prob, res.target_names[0])):
                return
    except BaseException as exc:  # re-raised by the main thread
        outbox.put(End("error", str(exc), exc))
        return
    group.finish(outbox)


def make_explainers(model_path, in_flight: int = 2, kernels: str = "auto", threads: int | None = None,
                    **explainer_options) -> list:
    """`in_flight` Explainers sharing the cores (threads each: all cores / in_flight);
    explainer_options: placement, feature_layer, options (the Explainer's)."""
    from explicam.runtime.explainer import Explainer

    per = threads or max(1, (os.cpu_count() or 1) // max(1, in_flight))
    return [Explainer(model_path, kernels=kernels, threads=per, batch_size=1, **explainer_options)
            for _ in range(max(1, in_flight))]


def run_stream(source: Source, explainer, config: StreamConfig | None = None, sinks=(), cap=None,
               log=None) -> StreamResult:
    """Explain `source` frame by frame into `sinks` until it ends or is stopped.
    `explainer`: one Explainer, or a list of them for several frames in flight. `config`
    gives the method, target, method options, overlay, --max-frames and reconnection (the
    sinks are made by the caller: make_sinks; placement and feature layer are the explainer's:
    explain_stream builds it with config's)."""
    cfg = config or StreamConfig()
    log = log or (lambda msg: None)
    explainers = list(explainer) if isinstance(explainer, (list, tuple)) else [explainer]
    explainer = explainers[0]
    blender = ov.Blender(cfg.alpha, cfg.colormap)  # colour map and alpha fixed once per stream
    size, crop = explainer.input_hw, explainer.model.resize_shorter
    explainer.resolve_targets(cfg.target, 1)

    def prepare(bgr):  # the model's resize and RGB; on the capture thread
        if crop:  # torchvision's Resize + CenterCrop, as the export recorded
            return cv2.cvtColor(explainer.model.fit(bgr), cv2.COLOR_BGR2RGB)
        return shrink_to_input(bgr, size, rgb=True)

    capture = Capture(cap if cap is not None else open_capture(source), source, prepare, cfg.lost_after,
                      cfg.reconnect_policy(source), log)
    results = Mailbox(2 * len(explainers), drop_oldest=False)
    stop = threading.Event()
    group = Workers(len(explainers))
    workers = [threading.Thread(target=_explain_thread, name=f"explain {i}", daemon=True,
                                args=(e, cfg, capture.frames, results, stop, group))
               for i, e in enumerate(explainers)]
    result = StreamResult(source.name)
    result.url = next((s.server.public_url for s in sinks if isinstance(s, ServeSink)), None)
    meter, t0 = FpsMeter(), time.perf_counter()
    restore = _sigterm_as_interrupt()
    # Each stage has its own thread already; OpenCV's pool on top would only fight
    # onnxruntime's threads for the same cores (a single-threaded resize is faster here).
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        capture.start()
        for worker in workers:
            worker.start()
        end = _loop(capture, results, sinks, blender, meter, cfg, result)
        result.reason, result.message = end.reason, end.message
        if end.error is not None:  # raised once the outputs below are finished
            raise end.error
    except KeyboardInterrupt as exc:
        result.reason = "interrupted"
        result.message = "stopped by SIGTERM" if isinstance(exc, Terminated) else "stopped by Ctrl-C"
    finally:
        ignore = _ignore_signals()  # a second Ctrl-C must not cut the file being finished
        try:
            stop.set()
            capture.release()
            results.close()
            for worker in workers:
                worker.join(timeout=5)
            result.seconds = time.perf_counter() - t0
            result.read, result.dropped = capture.read_count, capture.frames.dropped
            result.reconnects = capture.reconnects
            _close_sinks(sinks, result, log)
        finally:
            ignore()
            restore()
            cv2.setNumThreads(cv_threads)
    if result.frames == 0 and result.reason in ("end", "lost", "error"):
        raise ValueError(f"{source.name}: no frames could be read" + (f" ({result.message})" if result.message
                                                                       else " (empty or unreadable video)"))
    return result


def _in_order(capture):
    """Frames come back from several explain threads; a file's are put back in order, a
    live source's are shown as they come and a late one (older than the last shown) is
    dropped, so the view never steps back in time."""
    pending, state = {}, {"next": 0, "last": -1}

    def ready(item):
        index = item[0]
        if capture.source.live:
            if index <= state["last"]:
                capture.frames.dropped += 1
                return []
            state["last"] = index
            return [item]
        pending[index] = item
        out = []
        while state["next"] in pending:
            out.append(pending.pop(state["next"]))
            state["next"] += 1
        return out
    return ready


def _loop(capture, results, sinks, blender, meter, cfg: StreamConfig, result) -> End:
    order = _in_order(capture)
    method, target, max_frames = cfg.method, cfg.target, cfg.max_frames
    first_frame_timeout, lost_after = cfg.first_frame_timeout, cfg.lost_after
    while True:
        item = results.get(timeout=0.25)
        if item is None:  # nothing yet: is the camera still alive?
            silent = time.monotonic() - capture.last_frame
            if not capture.source.live or capture.reconnect is not None:
                continue  # a file is read at the explainer's pace; a reconnecting source decides itself
            if not capture.read_count and silent > first_frame_timeout:
                return End("lost", f"it opened, but no frame came within {first_frame_timeout:g} s")
            if capture.read_count and silent > lost_after:
                return End("lost", f"{capture.source.name} stopped delivering frames (nothing for {silent:.0f} s)")
            continue
        if isinstance(item, End):
            return item
        for _index, bgr, heat, name, prob, target_name in order(item):
            frame = blender.blend(bgr, heat)
            fps = meter.tick()
            if cfg.labels:
                ov.draw_labels(frame, [f"{name} {prob:.1%}", f"{method}"
                                       f"{' -> ' + target_name if target is not None else ''}  {fps:.1f} FPS"])
            for sink in sinks:
                sink.write(frame)
            result.frames += 1
            if any(s.stop_requested for s in sinks):
                return End("stopped", "stopped from the window")
            if max_frames and result.frames >= max_frames:
                return End("stopped", f"stopped after --max-frames {max_frames}")


def _close_sinks(sinks, result: StreamResult, log) -> None:
    for sink in sinks:
        try:
            if isinstance(sink, VideoFileSink):
                path = sink.close()
                if path:
                    result.outputs.append((path, sink.frames))
            else:
                sink.close()
        except Exception as exc:  # one sink failing to close must not stop the others
            log(f"warning: could not finish {getattr(sink, 'path', type(sink).__name__)}: {exc}")


def _sigterm_as_interrupt():
    """SIGTERM (systemd, docker stop, kill) ends the loop like Ctrl-C: outputs are finished."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _ignore_signals():
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def explain_stream(source: Source, config: StreamConfig | None = None, explainer=None, log=None) -> StreamResult:
    """What `cli.py explain --webcam/--video` runs: check everything, then the loop.
    Options are checked before the camera opens, the camera before the model loads."""
    from explicam.runtime.methods import METHODS
    from explicam.runtime.model import newest_model

    cfg = config or StreamConfig()
    log = log or (lambda msg: None)
    if cfg.method not in METHODS:
        raise ValueError(f"--method: video takes one method, one of {', '.join(METHODS)} (got {cfg.method!r})")
    ov.Blender(cfg.alpha, cfg.colormap)  # bad --alpha / --colormap fail before the camera opens
    cfg.check(source)
    serving = cfg.serve_options() if cfg.serve is not None else None
    cap = open_capture(source)
    sinks = []
    try:
        # a file's recording plays at the original speed; a live one's rate is measured
        sinks = make_sinks(source, cfg, serving, cap.get(cv2.CAP_PROP_FPS), log)
        given = explainer is not None
        if not given:
            in_flight = cfg.in_flight or (2 if (os.cpu_count() or 1) >= 2 else 1)
            explainer = make_explainers(cfg.model or newest_model(), in_flight, cfg.kernels, cfg.threads,
                                        placement=cfg.placement, feature_layer=cfg.feature_layer,
                                        options=cfg.options)
        first = explainer[0] if isinstance(explainer, list) else explainer
        placed = first.placement.get("name") if isinstance(first.placement, dict) else first.placement
        if given and (cfg.placement not in (None, placed) or cfg.feature_layer not in (None, first.feature_layer)):
            raise ValueError("placement and feature_layer are the given explainer's: build it with them "
                             "(or pass none and explain_stream makes it from the config)")
        first.resolve_targets(cfg.target, 1)  # an unknown --target: said now, not after the first frame
        for s in sinks:
            if isinstance(s, ServeSink):
                _announce(s.server, cfg, log)
        log(f"explaining {source.name} with {cfg.method}; " + ("press q in the window or " if any(
            isinstance(s, WindowSink) for s in sinks) else "") + "Ctrl-C to stop")
    except BaseException:
        cap.release()
        for s in sinks:
            s.close()
        raise
    return run_stream(source, explainer, cfg, sinks, cap=cap, log=log)


def _announce(server, cfg: StreamConfig, log) -> None:
    """The one line that carries the token (nothing else prints it), and the warning an
    open server on the network deserves."""
    log(f"live view: {server.url}  (only / and /stream are served; at most {server.options.max_clients} viewers)")
    if cfg.no_token:
        where = "this machine" if server.access.loopback else "anyone who can reach this port"
        log(f"warning: --no-token: the live camera at {server.public_url} is open to {where}, without a token")
