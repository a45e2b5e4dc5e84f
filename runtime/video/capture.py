"""Frames in: webcams, video files and network streams, read on their own thread.

A live source (camera, rtsp/http stream, or a file with --realtime) goes through a
one-frame mailbox that always holds the newest frame: when explaining is slower than the
camera, old frames are dropped instead of piling up, so the view never lags behind. A
video file goes through a short blocking queue instead: every frame is explained, none
is skipped, and reading simply waits for the explainer.

The capture thread also shrinks each frame to the model's input (the same resize the
model would apply), so that work runs in parallel with the explainer.

A network camera that stops delivering (Wi-Fi drop, camera reboot) is reopened by the same
thread with a growing wait (Reconnect: 1, 2, 4 ... 30 s), one log line per attempt; the
loop and its sinks never notice more than a pause, so a recording and the live page go on
across the gap. A local camera or a file ends as before.
"""
from __future__ import annotations

import collections
import glob
import os
import sys
import threading
import time
from dataclasses import dataclass

import cv2

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass
class Source:
    target: object      # camera index (int) or path / URL (str)
    name: str           # what messages call it: "camera 0", "clip.mp4", the URL
    kind: str           # "camera", "file" or "stream"
    realtime: bool = False

    @property
    def live(self) -> bool:
        """Newest-frame semantics (drop what the explainer cannot keep up with)."""
        return self.kind != "file" or self.realtime


@dataclass
class Reconnect:
    """How a source that stops delivering is reopened."""
    max_retries: int | None = None   # attempts in a row without a frame; None: for ever
    first: float = 1.0               # seconds before the first attempt; doubled each time
    longest: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.longest, self.first * 2 ** (attempt - 1))


@dataclass
class End:
    """The last item through the pipeline: why the stream ended."""
    reason: str                 # "end", "lost", "error"
    message: str = ""
    error: BaseException | None = None


def stream_source(paths=(), webcam=None, video=None, realtime=False) -> Source | None:
    """The video source the command line asks for, or None when it asks for images.

    Besides --webcam N and --video FILE, a lone positional `0` (a camera, as in
    ultralytics' source=0), a video file or a stream URL is understood too."""
    paths = [os.fspath(p) for p in paths]
    chosen = [x for x in (webcam is not None, video is not None) if x]
    if len(chosen) > 1 or (chosen and paths):
        raise ValueError("explain one source at a time: images/folders, --video FILE or --webcam [N]")
    if webcam is not None:
        return Source(int(webcam), f"camera {int(webcam)}", "camera", realtime)
    if video is not None:
        kind = "stream" if str(video).startswith(STREAM_PREFIXES) else "file"
        return Source(str(video), str(video), kind, realtime)
    streams = [p for p in paths if _is_video(p)]
    if not streams:
        return None
    if len(paths) > 1:
        raise ValueError(f"{streams[0]}: explain one video at a time (images and folders may be mixed freely)")
    p = paths[0]
    if p.isdigit() and not os.path.exists(p):
        return Source(int(p), f"camera {p}", "camera", realtime)
    return Source(p, p, "stream" if p.startswith(STREAM_PREFIXES) else "file", realtime)


def _is_video(p: str) -> bool:
    return p.lower().endswith(VIDEO_EXTENSIONS) or p.startswith(STREAM_PREFIXES) or (
        p.isdigit() and not os.path.exists(p))


def quiet_opencv() -> None:
    """OpenCV and FFmpeg print their own warnings for a missing camera or a bad file; the
    messages raised here say it once, clearly, instead."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def open_capture(source: Source):
    """An opened cv2.VideoCapture, or ValueError saying clearly what is wrong."""
    quiet_opencv()
    if source.kind == "camera":
        index = source.target
        if sys.platform.startswith("linux") and not os.path.exists(f"/dev/video{index}"):
            found = sorted(glob.glob("/dev/video*"))
            raise ValueError(f"camera {index}: not found (no /dev/video{index}; cameras here: "
                             f"{', '.join(found) if found else 'none'}); try --webcam N or --video FILE")
        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            raise ValueError(f"camera {index}: cannot be opened (missing, or busy in another program)")
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # where the driver allows it: less latency
        return cap
    if source.kind == "file":
        path = source.target
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file")
        if os.path.isdir(path):
            raise ValueError(f"{path}: is a folder, not a video (to explain the images in it, drop --video)")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path}: empty file (0 bytes)")
    # One decoder thread: the capture thread is already one stage of a pipeline that keeps
    # every core busy, and FFmpeg's own threads only add hand-offs (-20% decode CPU here).
    params = [cv2.CAP_PROP_N_THREADS, 1]
    if source.kind == "stream" and hasattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC"):
        # a camera that vanishes mid-read must not hang the read for ever: it is reconnected
        params += [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000]
    cap = cv2.VideoCapture(source.target, cv2.CAP_ANY, params)
    if not cap.isOpened():
        what = "not a readable video (corrupt or unsupported format)" if source.kind == "file" else \
            "cannot connect to the stream"
        raise ValueError(f"{source.name}: {what}")
    return cap


class Mailbox:
    """A small thread-safe buffer. drop_oldest=True: put() never waits and the oldest item
    makes room (a camera's newest frame); False: put() waits for room (every frame of a file).
    An End item is never dropped, and nothing is accepted after it.

    Two conditions on one lock, so a put wakes one getter and a get one putter: with one
    condition and notify_all, every frame woke every waiting thread (two explain threads,
    the capture thread), and on 2 cores those wake-ups cost a few percent of the loop."""

    def __init__(self, capacity: int, drop_oldest: bool):
        self.capacity, self.drop_oldest = max(1, capacity), drop_oldest
        self._items = collections.deque()
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)
        self._not_full = threading.Condition(lock)
        self.closed = False
        self.dropped = 0
        self._ended = False

    def put(self, item) -> bool:
        """False when the mailbox was closed (the consumer is gone)."""
        with self._not_full:
            if self._ended:
                return False
            end = isinstance(item, End)
            if not end:
                if self.drop_oldest:
                    while len(self._items) >= self.capacity:
                        self._items.popleft()
                        self.dropped += 1
                else:
                    self._not_full.wait_for(lambda: self.closed or len(self._items) < self.capacity)
            if self.closed:
                return False
            self._ended = end
            self._items.append(item)
            if end:  # everyone waiting must learn that the stream is over
                self._not_empty.notify_all()
            else:
                self._not_empty.notify()
            return True

    def get(self, timeout: float):
        """The next item, or None after `timeout` seconds (or once closed and empty)."""
        with self._not_empty:
            if not self._not_empty.wait_for(lambda: self._items or self.closed, timeout) or not self._items:
                return None
            item = self._items.popleft()
            self._not_full.notify()
            return item

    def close(self) -> None:
        with self._not_empty:
            self.closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()


class _Closed:
    """Stands in for a source that could not be reopened yet: every read fails."""

    def read(self):
        return False, None

    def release(self):
        pass


class Capture(threading.Thread):
    """Reads frames into a Mailbox as (index, bgr, model_input_rgb) until the source ends.

    prepare(bgr) -> the model's input, computed here, off the explainer's thread.
    lost_after: a live source that fails to deliver for this long counts as lost, or,
    with `reconnect`, is reopened (log says so, one line per attempt)."""

    def __init__(self, cap, source: Source, prepare, lost_after: float = 3.0, reconnect: Reconnect | None = None,
                 log=None):
        super().__init__(name=f"capture {source.name}", daemon=True)
        self.cap, self.source, self.prepare, self.lost_after = cap, source, prepare, lost_after
        self.reconnect, self.log = reconnect, log or (lambda msg: None)
        self.frames = Mailbox(1 if source.live else 4, drop_oldest=source.live)
        self.read_count = 0
        self.retries = 0        # attempts since the last frame
        self.reconnects = 0     # times the source came back
        self._why = ""          # why the last attempt failed
        self.last_frame = time.monotonic()
        self.fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        if not 1.0 <= self.fps <= 240.0:
            self.fps = 0.0  # unknown or nonsense (some webcams and streams report 0 or 90000)
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.frames.close()

    def run(self) -> None:
        try:
            self.frames.put(self._read_all())
        except BaseException as exc:  # surfaced in the main thread, not lost in this one
            self.frames.put(End("error", f"{self.source.name}: {exc}", exc))

    def _read_all(self) -> End:
        pace = 1.0 / self.fps if (self.source.realtime and self.source.kind == "file" and self.fps) else 0.0
        start = time.monotonic()
        failing_since = None
        while not self._halt.is_set():
            ok, bgr = self.cap.read()
            if not ok or bgr is None:
                if not self.source.live or self.source.kind == "file":
                    return End("end")
                # a camera or stream may hiccup; only a lasting silence means it is gone
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since <= self.lost_after and not self._why:
                    time.sleep(0.02)
                    continue
                if self.reconnect is None:
                    return End("lost", f"{self.source.name} stopped delivering frames")
                end = self._retry()
                if end is not None:
                    return end
                failing_since = None
                continue
            failing_since = None
            if self.retries:
                self.log(f"{self.source.name}: back after {self.retries} retr{'y' if self.retries == 1 else 'ies'} "
                         f"({time.monotonic() - self.last_frame:.1f} s without frames)")
                self.retries, self.reconnects = 0, self.reconnects + 1
            if bgr.ndim == 2:
                bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
            if pace:  # --realtime: a file plays at its own speed, like a camera would deliver it
                delay = start + self.read_count * pace - time.monotonic()
                if delay > 0:
                    self._halt.wait(delay)
            self.read_count += 1
            self.last_frame = time.monotonic()
            if not self.frames.put((self.read_count - 1, bgr, self.prepare(bgr))):
                break
        return End("stopped")

    def _retry(self) -> End | None:
        """One reopening attempt, after its wait; an End when it is time to give up."""
        policy, name = self.reconnect, self.source.name
        if policy.max_retries is not None and self.retries >= policy.max_retries:
            return End("lost", f"{name} stopped delivering frames; gave up after {self.retries} "
                               f"retr{'y' if self.retries == 1 else 'ies'} (--max-retries {policy.max_retries})")
        self.retries += 1
        delay = policy.delay(self.retries)
        of = f"/{policy.max_retries}" if policy.max_retries is not None else ""
        self.log(f"{name}: no frames for {time.monotonic() - self.last_frame:.1f} s; reconnecting in {delay:g} s "
                 f"(retry {self.retries}{of}{'; last try: ' + self._why if self._why else ''})")
        if self._halt.wait(delay):
            return End("stopped")
        self.cap.release()
        try:
            self.cap = open_capture(self.source)
            self._why = ""
        except ValueError as exc:  # not back yet: the next attempt follows its wait at once
            self.cap, self._why = _Closed(), str(exc).split(": ", 1)[-1]
        return None

    def release(self, timeout: float = 2.0) -> None:
        """Stop reading and free the device; a thread stuck in a driver call is left to
        die with the process rather than released under its feet."""
        self.stop()
        self.join(timeout)
        if not self.is_alive():
            self.cap.release()
