"""A network camera that drops and comes back: the capture reopens it with a growing wait,
one log line per attempt, and the recording and the served stream go on across the gap.

The camera is a tiny HTTP MJPEG server written here (independent of explicam's own), which
OpenCV's FFmpeg reads as it reads an IP camera's http:// stream; dropping it closes the
connection mid-stream and refuses new ones until it is started again on the same port."""
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from explicam.runtime.video import StreamConfig, run_stream
from explicam.runtime.video.capture import Source
from explicam.runtime.video.mjpeg import ServeOptions
from explicam.runtime.video.sinks import ServeSink, VideoFileSink
from tests.conftest import ROOT
from tests.test_video import read_frames

BLUE, GREEN = (255, 0, 0), (0, 255, 0)  # BGR: the colour of the frames before and after the gap


class Camera:
    """Serves 160x120 frames of one colour as multipart MJPEG at ~25 fps on a fixed port."""

    def __init__(self, colour, port=0):
        self.colour, self.clients, self.stopped = colour, [], threading.Event()
        camera = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                camera.clients.append(self.request)
                self.request.recv(4096)
                self.request.sendall(b"HTTP/1.0 200 OK\r\n"
                                     b"Content-Type: multipart/x-mixed-replace; boundary=cam\r\n\r\n")
                jpeg = cv2.imencode(".jpg", np.full((120, 160, 3), camera.colour, np.uint8))[1].tobytes()
                try:
                    while not camera.stopped.is_set():
                        self.request.sendall(b"--cam\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                             % len(jpeg) + jpeg + b"\r\n")
                        time.sleep(0.04)
                except OSError:
                    pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/video"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def drop(self):
        """The camera goes away mid-stream: connections closed, new ones refused."""
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()
        for client in self.clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()


class Collect:
    """Keeps the mean colour of each frame the loop writes; stops the loop when told."""

    def __init__(self):
        self.means, self.stop_requested = [], False

    def write(self, bgr):
        self.means.append(bgr.reshape(-1, 3).mean(axis=0))

    def close(self):
        pass

    def count(self, colour):
        return sum(1 for m in self.means if nearest(m) == colour)


def nearest(mean):
    """Which of the two camera colours a frame (overlay at alpha 0.3) comes from."""
    return BLUE if mean[0] - mean[1] > 0 else GREEN


def wait_for(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Viewer(threading.Thread):
    """One browser-like client of the served stream, on one connection for the whole test."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.colours, self.connections_closed = [], False
        self.start()

    def run(self):
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    self.connections_closed = True
                    return
                buf += data
                while True:
                    m = re.search(rb"Content-Length: (\d+)\r\n\r\n", buf)
                    if not m or len(buf) < m.end() + int(m.group(1)):
                        break
                    jpeg = buf[m.end():m.end() + int(m.group(1))]
                    buf = buf[m.end() + int(m.group(1)):]
                    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                    self.colours.append(nearest(frame.reshape(-1, 3).mean(axis=0)))
        except OSError:
            self.connections_closed = True


@pytest.fixture(scope="module")
def explainer(onnx_model):
    from explicam.runtime import Explainer
    return Explainer(onnx_model, batch_size=1)


def test_a_stream_that_drops_and_comes_back_is_recorded_and_served_across_the_gap(tmp_path, explainer):
    camera = Camera(BLUE)
    out = tmp_path / "cam.mp4"
    collect, lines, done = Collect(), [], {}
    serve = ServeSink(0, options=ServeOptions())
    cfg = StreamConfig(alpha=0.3, labels=False, lost_after=0.3, backoff=0.2, backoff_max=1.0)
    loop = threading.Thread(target=lambda: done.setdefault("res", run_stream(
        Source(camera.url, camera.url, "stream"), explainer, cfg, [VideoFileSink(str(out), None), serve, collect],
        log=lines.append)), daemon=True)
    loop.start()
    try:
        wait_for(lambda: collect.count(BLUE) >= 20, 30)
        viewer = Viewer(serve.server.port)
        wait_for(lambda: len(viewer.colours) >= 5, 10)
        camera.drop()
        time.sleep(2.0)  # refused all along: attempts after 0.2, 0.4, 0.8 s, then every 1 s
        before_gap = len(collect.means)
        camera = Camera(GREEN, camera.port)
        wait_for(lambda: collect.count(GREEN) >= 20, 30)
        wait_for(lambda: GREEN in viewer.colours, 10)
        viewer_stayed = not viewer.connections_closed  # before the loop stops and closes the server
    finally:
        collect.stop_requested = True
        loop.join(timeout=30)
        camera.drop()
    res = done["res"]
    assert res.reason == "stopped" and res.reconnects == 1, (res.reason, res.message)
    # the log: one line per attempt, numbered, the wait doubling up to the longest, then the return
    retries = [re.search(r"reconnecting in ([\d.]+) s \(retry (\d+)", line) for line in lines]
    retries = [(float(m.group(1)), int(m.group(2))) for m in retries if m]
    assert len(retries) >= 3 and [n for _, n in retries] == list(range(1, len(retries) + 1)), lines
    assert [d for d, _ in retries] == [min(1.0, 0.2 * 2 ** i) for i in range(len(retries))], lines
    assert all(camera.url in line for line in lines if "retry" in line)
    assert any(re.search(rf"{re.escape(camera.url)}: back after {len(retries)} retries", line) for line in lines)
    # the recording: frames from both sides of the gap, in order, in one file
    written, _ = read_frames(out)
    colours = [nearest(f.reshape(-1, 3).mean(axis=0)) for f in written]
    assert len(written) == res.frames == len(collect.means)
    first_green = colours.index(GREEN)
    assert first_green >= 20 and colours[:first_green] == [BLUE] * first_green
    assert colours[first_green:] == [GREEN] * (len(colours) - first_green) and len(colours) - first_green >= 20
    assert before_gap <= first_green + 2  # nothing explained while the camera was away
    # the viewer kept its connection through the gap and saw both sides
    assert viewer_stayed and viewer.colours[0] == BLUE and viewer.colours[-1] == GREEN


def test_max_retries_bounds_it_and_the_recording_is_kept(tmp_path, explainer):
    camera = Camera(BLUE)
    out, collect, lines = tmp_path / "cam.mp4", Collect(), []
    cfg = StreamConfig(alpha=0.3, labels=False, lost_after=0.3, backoff=0.1, max_retries=3)

    def drop_later():
        wait_for(lambda: collect.count(BLUE) >= 10, 30)
        camera.drop()
    threading.Thread(target=drop_later, daemon=True).start()
    t0 = time.monotonic()
    res = run_stream(Source(camera.url, camera.url, "stream"), explainer, cfg,
                     [VideoFileSink(str(out), None), collect], log=lines.append)
    assert time.monotonic() - t0 < 30
    assert res.reason == "lost" and "gave up after 3 retries (--max-retries 3)" in res.message
    assert [line for line in lines if "reconnecting in" in line] == [
        line for line in lines if re.search(r"reconnecting in (0\.1|0\.2|0\.4) s \(retry [123]/3", line)]
    assert len([line for line in lines if "reconnecting in" in line]) == 3
    assert "last try: cannot connect" in lines[-1]  # refused: said in the next attempt's line
    assert len(read_frames(out)[0]) == res.frames >= 10


def test_cli_reconnects_an_http_stream_by_default_and_max_retries_ends_it(tmp_path, onnx_model):
    camera = Camera(BLUE)
    out = tmp_path / "cam.mp4"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "explain", "--video", camera.url, "--output",
                             str(out), "--max-retries", "2", "--model", str(onnx_model)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    deadline = time.monotonic() + 60
    while not (tmp_path / "cam.partial.mp4").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    camera.drop()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    attempts = [line for line in stderr.splitlines() if "reconnecting in" in line]
    assert len(attempts) == 2 and "in 1 s (retry 1/2)" in attempts[0] and "in 2 s (retry 2/2" in attempts[1], stderr
    assert "gave up after 2 retries (--max-retries 2)" in stdout
    assert not [line for line in stderr.splitlines() if line.startswith("[")], stderr  # no FFmpeg chatter
    n = int(re.search(r"wrote .*cam.mp4 \((\d+) frames\)", stdout).group(1))
    assert n > 0 and len(read_frames(out)[0]) == n
