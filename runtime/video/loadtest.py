"""The live server under load: `python -m explicam.runtime.video.loadtest` (the README's figures).

On loopback only (127.0.0.1), bounded in count and time:
  * this process: the MJPEG server and a synthetic frame producer standing in for the
    explain loop (a camera's pace, a blend per frame like the overlay, then publish);
  * a child process: the viewers (`--viewers` streaming clients) and `--idle` sockets
    that connect and never send a request, driven by one selectors loop, so the clients'
    own work does not share this process's GIL or its memory figures.

Measured: the producer's frame rate without viewers and under load (the explain loop must
not wait for viewers), how many viewers are held and refused (503), frames per second per
viewer, the time a fresh viewer waits for its first frame under load, when the idle
sockets are closed, the threads and resident memory of the server's process at load and
after everyone has left.
"""
from __future__ import annotations

import gc
import json
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

import cv2
import numpy as np

from explicam.runtime.video.bench import rss_mb
from explicam.runtime.video.mjpeg import MjpegServer, ServeOptions

MARKER = b"--explicamframe\r\n"
REQUEST = b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# ---------------------------------------------------------------------------- the server's side
class Producer(threading.Thread):
    """Frames at a camera's pace (fps; 0: as fast as it can), each the blend of a moving
    disc over a textured background, published to the server. `rate(t0, t1)` is frames
    per second between two monotonic times."""

    def __init__(self, server, fps: float = 30.0, size=(640, 480)):
        super().__init__(name="producer", daemon=True)
        self.server, self.fps, self.halt = server, fps, threading.Event()
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        self.base = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * yy) % 251], -1).astype(np.uint8)
        self.heat = cv2.applyColorMap(((xx + yy) * 255 // (w + h)).astype(np.uint8), cv2.COLORMAP_JET)
        self.times = []

    def run(self):
        period = 1.0 / self.fps if self.fps else 0.0
        due, i = time.monotonic(), 0
        h, w = self.base.shape[:2]
        while not self.halt.is_set():
            frame = cv2.addWeighted(self.base, 0.5, self.heat, 0.5, 0.0)  # what the overlay costs
            cv2.circle(frame, (int(w / 2 + w / 3 * np.cos(i / 17)), int(h / 2 + h / 3 * np.sin(i / 11))), h // 8,
                       (40, 40, 230), -1)
            self.server.publish(frame)
            self.times.append(time.monotonic())
            i += 1
            if period:
                due = max(due + period, time.monotonic() - period)  # a late frame is not made up twice
                self.halt.wait(max(0.0, due - time.monotonic()))

    def rate(self, t0: float, t1: float) -> float:
        n = sum(1 for t in self.times if t0 <= t < t1)
        return n / (t1 - t0)


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_load(viewers: int = 64, idle: int = 500, max_clients: int = 64, seconds: float = 4.0, fps: float = 30.0,
             size=(640, 480), request_timeout: float | None = None, during=None, log=None) -> dict:
    """Serve a synthetic stream to `viewers` clients and `idle` silent sockets at once.
    request_timeout: the server's, for the idle sockets [default: long enough that they
    are all still open through the measurement window, 5 s at least, as in the server].
    during(server): called while the load is on (the test's own probes)."""
    log = log or (lambda msg: None)
    request_timeout = request_timeout or max(5.0, seconds + 3.0)
    server = MjpegServer(0, "127.0.0.1", "explicam load test",
                         ServeOptions(max_clients=max_clients, request_timeout=request_timeout))
    producer = Producer(server, fps, size)
    try:
        producer.start()
        time.sleep(0.5)  # warm: first frames, allocator
        gc.collect()
        rss_start, threads_start = rss_mb(), threading.active_count()
        t0, cpu0 = time.monotonic(), time.process_time()
        time.sleep(seconds)
        quiet_rate = producer.rate(t0, time.monotonic())
        cpu_alone = (time.process_time() - cpu0) / (time.monotonic() - t0)
        log(f"producer alone: {quiet_rate:.1f} frames/s; starting {viewers} viewers and {idle} idle sockets")
        child = subprocess.Popen([sys.executable, "-m", "explicam.runtime.video.loadtest", "--clients",
                                  str(server.port), str(viewers), str(idle), str(seconds), str(request_timeout)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            ready = child.stdout.readline()  # every viewer answered (frames or 503), idle sockets open
            if not ready.startswith("ready"):
                raise RuntimeError(f"the load clients did not start ({ready!r})")
            t1, cpu1 = time.monotonic(), time.process_time()
            encoded0, published0 = server.hub.encoded, server.hub.published
            probes = during(server) if during else None
            # counted inside the window, not at its end: there the clients start swapping one
            # held viewer for a fresh one, and the server may see the leaver before the newcomer
            held_now = server.hub.viewers
            time.sleep(max(0.0, seconds - (time.monotonic() - t1)))
            t2 = time.monotonic()
            loaded_rate = producer.rate(t1, t2)
            cpu_loaded = (time.process_time() - cpu1) / (t2 - t1)
            rss_load, threads_load = rss_mb(), threading.active_count()
            encoded, published = server.hub.encoded - encoded0, server.hub.published - published0
            report = json.loads(child.stdout.readline())
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
        left = _wait(lambda: server.hub.viewers == 0 and not server._pending, 10)
        time.sleep(0.5)
        gc.collect()
        rss_after = rss_mb()
    finally:
        producer.halt.set()
        producer.join(2)
        server.close()
    fps_each = [v["frames"] / report["window_s"] for v in report["viewers"] if v["status"] == 200]
    first = [v["first_frame_s"] for v in report["viewers"] if v["status"] == 200]
    return {
        "viewers": viewers, "idle_sockets": idle, "max_clients": max_clients, "frame_size": f"{size[0]}x{size[1]}",
        "producer_fps_alone": round(quiet_rate, 2), "producer_fps_loaded": round(loaded_rate, 2),
        "producer_drop": round(1 - loaded_rate / quiet_rate, 4) + 0.0 if quiet_rate else None,
        "held": sum(1 for v in report["viewers"] if v["status"] == 200), "held_by_server": held_now,
        "refused_503": sum(1 for v in report["viewers"] if v["status"] == 503),
        "refused_with_retry_after": sum(1 for v in report["viewers"] if v["status"] == 503 and v["retry_after"]),
        "other_status": sorted({v["status"] for v in report["viewers"]} - {200, 503}),
        "fps_per_viewer_min": round(min(fps_each), 2) if fps_each else 0.0,
        "fps_per_viewer_median": round(statistics.median(fps_each), 2) if fps_each else 0.0,
        "first_frame_max_s": round(max(first), 3) if first else None,
        "fresh_first_frame_s": report["fresh_first_frame_s"],
        "jpeg_encoded": encoded, "frames_published": published,
        "frames_sent": sum(v["frames"] for v in report["viewers"]),
        "idle_closed": report["idle_closed"], "idle_closed_after_s": report["idle_closed_after_s"],
        "mb_per_s_sent": round(report["bytes"] / report["window_s"] / 2**20, 1),
        "cpu_alone_pct_of_a_core": round(100 * cpu_alone, 1), "cpu_loaded_pct_of_a_core": round(100 * cpu_loaded, 1),
        "threads_start": threads_start, "threads_at_load": threads_load,
        "rss_start_mb": round(rss_start, 1), "rss_at_load_mb": round(rss_load, 1),
        "rss_after_mb": round(rss_after, 1), "everyone_left": left, "probes": probes,
    }


# ---------------------------------------------------------------------------- the clients (child process)
class _Viewer:
    def __init__(self, sock, t_connect):
        self.sock, self.t_connect = sock, t_connect
        self.head, self.status, self.retry_after = b"", None, False
        self.count, self.tail, self.bytes, self.first = 0, b"", 0, None

    def feed(self, data: bytes, now: float) -> None:
        if self.status is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, data = self.head.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            self.retry_after = any(line.lower().startswith("retry-after:") for line in lines[1:])
        self.bytes += len(data)
        joined = self.tail + data
        found = joined.count(MARKER)
        if found and self.first is None:
            self.first = now - self.t_connect
        self.count += found
        self.tail = joined[-(len(MARKER) - 1):]


def _raise_nofile(needed: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def _connect(port: int, request: bool):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if request:
        sock.sendall(REQUEST)
    sock.setblocking(False)
    return sock


def _pump(sel, until: float, idle_closed: dict, idle_opened: dict) -> None:
    while time.monotonic() < until:
        for key, _ in sel.select(timeout=max(0.0, min(0.1, until - time.monotonic()))):
            now = time.monotonic()
            try:
                data = key.fileobj.recv(1 << 18)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if isinstance(key.data, _Viewer):
                if data:
                    key.data.feed(data, now)
                else:
                    sel.unregister(key.fileobj)
            elif not data:  # an idle socket closed by the server
                idle_closed[key.fileobj] = now - idle_opened[key.fileobj]
                sel.unregister(key.fileobj)


def clients_main(port: int, viewers: int, idle: int, seconds: float, request_timeout: float) -> None:
    _raise_nofile(viewers + idle + 128)
    sel = selectors.DefaultSelector()
    idle_opened, idle_closed = {}, {}
    for _ in range(idle):  # first the silent ones: the viewers must get through them
        sock = _connect(port, False)
        idle_opened[sock] = time.monotonic()
        sel.register(sock, selectors.EVENT_READ, "idle")
    crowd = []
    for _ in range(viewers):
        view = _Viewer(None, time.monotonic())
        view.sock = _connect(port, True)
        sel.register(view.sock, selectors.EVENT_READ, view)
        crowd.append(view)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(v.status is None or (v.status == 200 and not v.count) for v in crowd):
        _pump(sel, time.monotonic() + 0.1, idle_closed, idle_opened)
    print("ready", flush=True)
    start = [v.count for v in crowd]
    bytes0 = sum(v.bytes for v in crowd)
    t0 = time.monotonic()
    _pump(sel, t0 + seconds, idle_closed, idle_opened)
    window = time.monotonic() - t0
    records = [{"status": v.status, "retry_after": v.retry_after, "frames": v.count - c, "first_frame_s": v.first}
               for v, c in zip(crowd, start)]
    sent = sum(v.bytes for v in crowd) - bytes0
    fresh = _fresh_viewer(sel, crowd, port, idle_closed, idle_opened)
    for view in crowd:  # everyone leaves
        try:
            sel.unregister(view.sock)
        except (KeyError, ValueError):
            pass
        view.sock.close()
    _pump(sel, max(time.monotonic(), min(idle_opened.values(), default=0) + request_timeout + 2.0), idle_closed,
          idle_opened)
    for sock in idle_opened:
        sock.close()
    closed = sorted(idle_closed.values())
    print(json.dumps({
        "window_s": window, "bytes": sent, "fresh_first_frame_s": fresh,
        "viewers": records,
        "idle_closed": len(closed),
        "idle_closed_after_s": [round(closed[0], 2), round(closed[-1], 2)] if closed else None,
    }), flush=True)


def _fresh_viewer(sel, crowd, port, idle_closed, idle_opened):
    """One held viewer leaves and a new one comes, with the idle sockets still open:
    seconds from its first try to its first frame (a 503 while the place is freed is retried)."""
    held = [v for v in crowd if v.status == 200]
    if held:
        sel.unregister(held[0].sock)
        held[0].sock.close()
        crowd.remove(held[0])
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        view = _Viewer(None, time.monotonic())
        view.sock = _connect(port, True)
        sel.register(view.sock, selectors.EVENT_READ, view)
        while view.status is None or (view.status == 200 and not view.count):
            _pump(sel, time.monotonic() + 0.02, idle_closed, idle_opened)
            if time.monotonic() - t0 > 10:
                break
        if view.status == 200 and view.count:
            crowd.append(view)
            return round(time.monotonic() - t0, 3)
        sel.unregister(view.sock)
        view.sock.close()
        time.sleep(0.02)
    return None


def main(argv=None) -> None:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--clients"]:
        port, viewers, idle = map(int, argv[1:4])
        clients_main(port, viewers, idle, float(argv[4]), float(argv[5]))
        return
    parser = argparse.ArgumentParser(prog="python -m explicam.runtime.video.loadtest",
                                     description="The live server under many viewers and idle sockets, on loopback.")
    parser.add_argument("--viewers", type=int, default=64, help="streaming clients (default 64)")
    parser.add_argument("--idle", type=int, default=500, help="sockets that never send a request (default 500)")
    parser.add_argument("--max-clients", type=int, default=64, help="the server's cap (default 64)")
    parser.add_argument("--seconds", type=float, default=4.0, help="each measurement window (default 4)")
    parser.add_argument("--fps", type=float, default=30.0, help="the producer's pace; 0: as fast as it can")
    parser.add_argument("--size", default="640x480", help="frame size (default 640x480)")
    args = parser.parse_args(argv)
    for name in ("viewers", "idle", "max_clients"):
        if not 0 <= getattr(args, name) <= 5000:
            parser.error(f"--{name.replace('_', '-')}: from 0 to 5000")
    try:
        size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(size) == 2 and min(size) >= 16
    except (ValueError, AssertionError):
        parser.error(f"--size: WIDTHxHEIGHT, e.g. 640x480 (got {args.size!r})")
    result = run_load(args.viewers, args.idle, max(1, args.max_clients), args.seconds, args.fps, size,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
