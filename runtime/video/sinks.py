"""Frames out: a video file, a window, a live MJPEG stream. Each sink has write(bgr),
close() and a `stop_requested` flag (a closed window, the q key)."""
from __future__ import annotations

import os
import sys
import time

import cv2

# container -> FourCC that opencv-python's FFmpeg can always write (no H.264 encoder in the wheels)
CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}


class VideoFileSink:
    """Writes frames to a video under a temporary name (`out.partial.mp4`), renamed into
    place by close(): the finished name only ever holds a complete, playable file.

    fps: the source's rate for a file (so the result plays at the original speed); None
    for a live source, whose rate is measured over the first frames (a camera reporting
    30 fps while the explainer manages 12 would otherwise give a video playing 2.5x fast).
    """

    MEASURE_FRAMES, MEASURE_SECONDS = 15, 1.5

    def __init__(self, path: str, fps: float | None):
        root, ext = os.path.splitext(path)
        if ext.lower() not in CODECS:
            raise ValueError(f"--output {path}: use a .mp4, .avi, .mkv or .mov file name")
        self.path, self.partial, self.fourcc = path, f"{root}.partial{ext}", CODECS[ext.lower()]
        self.fps = fps
        try:  # fail now, before the model loads, when the folder cannot be written
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(self.partial, "wb"):
                pass
            os.remove(self.partial)
        except OSError as exc:
            raise ValueError(f"--output {path}: cannot write there ({exc.strerror or exc})") from None
        self.writer, self.size, self.frames = None, None, 0
        self._pending, self._t0 = [], None
        self.stop_requested = False

    def write(self, bgr) -> None:
        if self.writer is None and self.fps is None:  # live: measure the rate first
            self._t0 = self._t0 or time.monotonic()
            self._pending.append(bgr)
            if len(self._pending) < self.MEASURE_FRAMES and time.monotonic() - self._t0 < self.MEASURE_SECONDS:
                return
            self._flush_pending()
            return
        self._write(bgr)

    def _flush_pending(self) -> None:
        n, elapsed = len(self._pending), time.monotonic() - (self._t0 or time.monotonic())
        self.fps = min(60.0, max(1.0, (n - 1) / elapsed)) if n > 1 and elapsed > 0 else 10.0
        pending, self._pending = self._pending, []
        for frame in pending:
            self._write(frame)

    def _write(self, bgr) -> None:
        if self.writer is None:
            h, w = bgr.shape[:2]
            self.size = (w, h)
            self.writer = cv2.VideoWriter(self.partial, cv2.VideoWriter_fourcc(*self.fourcc), float(self.fps or 25.0),
                                          self.size)
            if not self.writer.isOpened():
                self.writer = None
                raise ValueError(f"--output {self.path}: OpenCV cannot write {self.fourcc} video here")
        if bgr.shape[1::-1][:2] != self.size:  # a camera that changed resolution mid-stream
            bgr = cv2.resize(bgr, self.size)
        self.writer.write(bgr)
        self.frames += 1

    def close(self) -> str | None:
        """Finish the file; returns its path, or None when no frame ever came."""
        if self._pending:
            self._flush_pending()
        if self.writer is None:
            return None
        self.writer.release()
        self.writer = None
        os.replace(self.partial, self.path)
        return self.path


def opencv_gui() -> str:
    """The GUI backend OpenCV was built with ("NONE" for opencv-python-headless)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            return line.split(":", 1)[1].strip() or "NONE"
    return "unknown"


def no_display_reason() -> str | None:
    """Why a window cannot open here, or None when one probably can."""
    if opencv_gui().upper() == "NONE":
        # The base install is opencv-python-headless (boards and servers have no screen).
        return ("this OpenCV build has no GUI (opencv-python-headless); for windows run: pip uninstall -y "
                "opencv-python-headless && pip install opencv-python")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display here ($DISPLAY is not set: a headless machine or an SSH session without -X)"
    return None


class WindowSink:
    """An OpenCV window; q or Esc, or closing the window, stops the loop."""

    def __init__(self, title: str = "explicam"):
        reason = no_display_reason()
        if reason is None:
            try:
                cv2.namedWindow(title, cv2.WINDOW_NORMAL)
            except cv2.error as exc:
                reason = f"OpenCV cannot open a window ({str(exc).strip().splitlines()[-1][:120]})"
        if reason:
            raise ValueError(f"--show: {reason}; instead record with --output out.mp4 or watch in a browser "
                             "with --serve 8080")
        self.title, self.shown, self.stop_requested = title, False, False

    def write(self, bgr) -> None:
        cv2.imshow(self.title, bgr)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            self.stop_requested = True
        elif self.shown and cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            self.stop_requested = True  # the user closed the window
        self.shown = True

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass


class ServeSink:
    """Hands frames to the MJPEG server (mjpeg.py): a reference swap, never a wait.
    `url` carries the token when there is one."""

    def __init__(self, port: int, host: str = "127.0.0.1", title: str = "explicam live", options=None):
        from explicam.runtime.video.mjpeg import MjpegServer

        self.server = MjpegServer(port, host, title, options)
        self.url = self.server.url
        self.stop_requested = False

    def write(self, bgr) -> None:
        self.server.publish(bgr)

    def close(self) -> None:
        self.server.close()


class NullSink:
    """Takes frames and does nothing (the benchmark's loop without output costs)."""
    stop_requested = False

    def __init__(self, on_frame=None):
        self.on_frame, self.frames = on_frame, 0

    def write(self, bgr) -> None:
        self.frames += 1
        if self.on_frame:
            self.on_frame(self.frames)

    def close(self) -> None:
        pass


def make_sinks(source, cfg, serving=None, fps=None, log=None) -> list:
    """The sinks a StreamConfig asks for. A video file with none writes
    out/<name>_<method>.mp4 (its work is kept); a camera with none opens a window where
    there is a display. serving: the live server's ServeOptions (token resolved)."""
    log = log or (lambda msg: None)
    sinks, show, output = [], cfg.show, cfg.output
    if not (show or output or cfg.serve is not None):
        if source.kind == "file":
            output = os.path.join(cfg.out, f"{os.path.splitext(os.path.basename(source.target))[0]}_{cfg.method}.mp4")
        elif no_display_reason() is None:
            show = True
        else:
            raise ValueError(f"{source.name}: say where the frames should go: --show (needs a display; "
                             f"{no_display_reason()}), --output out.mp4, or --serve 8080 for a browser")
    try:
        if show:
            try:
                sinks.append(WindowSink(f"explicam - {source.name}"))
            except ValueError as exc:
                if not (output or cfg.serve is not None):
                    raise
                log(f"warning: {exc}")
        if output:
            sinks.append(VideoFileSink(output, None if source.live else (fps if fps and 1 <= fps <= 240 else 25.0)))
        if cfg.serve is not None:
            sinks.append(ServeSink(cfg.serve, cfg.host, f"explicam live: {source.name} ({cfg.method})", serving))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
