"""The video loop: files frame by frame, cameras newest-frame-first, outputs finished on every
kind of ending, and the MJPEG server spoken to with a real HTTP client."""
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from explicam.runtime import overlay as ov
from explicam.runtime.video.capture import Source
from explicam.runtime.video.mjpeg import MjpegServer
from explicam.runtime.video.sinks import VideoFileSink
from explicam.runtime.video import StreamConfig, explain_stream, run_stream
from explicam.runtime.video.bench import bench_video
from tests.conftest import ROOT, cli_in_process, run_cli


def write_clip(path, frames, size=(160, 120), fps=10.0):
    """A clip made here with cv2.VideoWriter: a red disc moving over a colour ramp."""
    w, h = size
    ramp = np.zeros((h, w, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, w)[None, :]
    ramp[..., 1] = np.linspace(255, 0, h)[:, None]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(frames):
        frame = ramp.copy()
        cv2.circle(frame, (10 + i * 5 % (w - 20), h // 2), 15, (0, 0, 255), -1)
        writer.write(frame)
    writer.release()
    return path


class Collect:
    """A sink that keeps the frames it is given (in `got`)."""
    stop_requested = False

    def __init__(self, got: list):
        self.got = got

    def write(self, bgr):
        self.got.append(bgr.copy())

    def close(self):
        pass


def read_frames(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return frames, fps


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clips") / "clip.avi", 20)


@pytest.fixture(scope="module")
def explainer(onnx_model):
    from explicam.runtime import Explainer
    return Explainer(onnx_model, batch_size=1)


def test_video_file_every_frame_explained_and_recorded(tmp_path, onnx_model, explainer, clip):
    out = tmp_path / "out.mp4"
    res = run_cli("explain", "--video", clip, "--output", out, "--model", onnx_model)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "20 frame(s)" in res.stdout
    written, fps = read_frames(out)
    source, _ = read_frames(clip)
    assert len(written) == len(source) == 20
    assert written[0].shape == (120, 160, 3) and fps == pytest.approx(10.0, abs=0.01)
    assert not os.path.exists(tmp_path / "out.partial.mp4")
    for i in (3, 17):  # each frame is the overlay of its own heatmap (mp4v is lossy: a tolerance)
        rgb = cv2.cvtColor(source[i], cv2.COLOR_BGR2RGB)
        expected = ov.overlay(rgb, explainer.explain(rgb).heatmaps[0])
        got = cv2.cvtColor(written[i], cv2.COLOR_BGR2RGB).astype(int)
        assert np.abs(got[50:] - expected[50:]).mean() < 6  # below the labels
        assert np.abs(got[50:] - rgb[50:]).mean() > 3 * np.abs(got[50:] - expected[50:]).mean()


def test_a_video_with_no_output_option_is_still_saved_and_realtime_paces_it(tmp_path, explainer, clip):
    res = explain_stream(Source(str(clip), str(clip), "file"), StreamConfig(out=str(tmp_path)), explainer=explainer)
    assert res.frames == 20 and res.reason == "end"
    assert len(read_frames(tmp_path / "clip_gradcam.mp4")[0]) == 20
    fast = write_clip(tmp_path / "fast.avi", 10, fps=20.0)
    res = run_stream(Source(str(fast), "fast", "file", realtime=True), explainer, sinks=[])
    assert res.seconds > 0.4 and res.read == 10  # 10 frames at 20 fps take half a second


class FakeCamera:
    """A camera delivering a frame every `period` s, each filled with its index, for
    `frames` frames; then read() fails, as when a USB camera is pulled out."""

    def __init__(self, frames, period=0.004, size=(120, 160)):
        self.frames, self.period, self.size, self.count, self.released = frames, period, size, 0, False

    def read(self):
        if self.count >= self.frames:
            time.sleep(0.01)
            return False, None
        time.sleep(self.period)
        frame = np.full((*self.size, 3), self.count % 250, np.uint8)
        self.count += 1
        return True, frame

    def get(self, prop):
        return 30.0

    def release(self):
        self.released = True


class SlowExplainer:
    """Wraps the real explainer, 25 ms slower, noting how far behind the camera each frame is."""

    def __init__(self, inner, camera):
        self.inner, self.camera, self.lags = inner, camera, []
        self.input_size, self.resolve_targets = inner.input_size, inner.resolve_targets
        self.input_hw, self.model = inner.input_hw, inner.model

    def explain(self, image, method, target=None):
        self.lags.append(self.camera.count - 1 - int(image[0, 0, 0]))
        time.sleep(0.025)
        return self.inner.explain(image, method, target)


def test_camera_gives_the_newest_frame_and_a_lost_camera_finishes_the_recording(tmp_path, explainer):
    camera = FakeCamera(frames=150)
    slow = SlowExplainer(explainer, camera)
    sink = VideoFileSink(str(tmp_path / "cam.mp4"), None)
    res = run_stream(Source(0, "camera 0", "camera"), slow, StreamConfig(lost_after=0.3), sinks=[sink], cap=camera)
    assert res.reason == "lost" and "camera 0 stopped delivering frames" in res.message
    assert res.read == 150 and res.dropped > 50 and res.frames < 60
    assert max(slow.lags[1:]) <= 2  # never more than a frame or two behind: no growing lag
    assert camera.released
    written, fps = read_frames(tmp_path / "cam.mp4")
    assert len(written) == res.frames and res.outputs == [(str(tmp_path / "cam.mp4"), res.frames)]
    assert 10 < fps < 60  # the rate the loop achieved, not the camera's claimed 30


def test_a_camera_that_never_delivers_is_a_clear_error(explainer):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="camera 3: no frames could be read .it opened, but no frame came within"):
        run_stream(Source(3, "camera 3", "camera"), explainer, StreamConfig(first_frame_timeout=0.5), sinks=[],
                   cap=FakeCamera(0))
    assert time.perf_counter() - t0 < 5


def test_missing_camera_bad_video_and_no_display_are_one_line_errors(tmp_path, onnx_model, clip):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    cases = [
        (("--webcam", "99"), "camera 99"),
        (("--video", tmp_path / "missing.mp4"), "missing.mp4: no such file"),
        (("--video", text), "notes.mp4: not a readable video"),
        (("--video", clip, "--show"), "--output"),
    ]
    for args, expected in cases:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "explain", *map(str, args), "--model",
                              str(onnx_model)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 1 and expected in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert time.perf_counter() - t0 < 15
    assert "--serve" in res.stderr  # the no-display message names both alternatives


def test_ctrl_c_finishes_the_video_file(tmp_path, onnx_model):
    long_clip = write_clip(tmp_path / "long.avi", 100)  # 10 s at --realtime
    out = tmp_path / "live.mp4"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "explain", "--video", str(long_clip), "--output",
                             str(out), "--realtime", "--model", str(onnx_model)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not os.path.exists(tmp_path / "live.partial.mp4") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "stopped by Ctrl-C" in stdout
    frames, _ = read_frames(out)
    n = int(re.search(r"wrote .*live.mp4 \((\d+) frames\)", stdout).group(1))
    assert 0 < len(frames) == n < 100
    assert not os.path.exists(tmp_path / "live.partial.mp4")


def read_part(resp):
    """One part of a multipart/x-mixed-replace body: (headers, body)."""
    line = resp.fp.readline()
    while line.strip() == b"":
        line = resp.fp.readline()
    assert line.strip() == b"--explicamframe", line
    headers = {}
    while True:
        line = resp.fp.readline().strip()
        if not line:
            break
        key, value = line.decode().split(":", 1)
        headers[key.strip().lower()] = value.strip()
    return headers, resp.fp.read(int(headers["content-length"]))


def test_mjpeg_server_paths_frames_and_clients_that_leave():
    server = MjpegServer(0)
    assert server.address[0] == "127.0.0.1" and server.url == f"http://127.0.0.1:{server.port}/"  # no token
    stop = threading.Event()

    def publish():
        i = 0
        while not stop.is_set():
            server.publish(np.full((48, 64, 3), (i * 40) % 256, np.uint8))
            i += 1
            time.sleep(0.02)

    pump = threading.Thread(target=publish, daemon=True)
    pump.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/")
        page = conn.getresponse()
        body = page.read().decode()
        assert page.status == 200 and page.getheader("Content-Type").startswith("text/html")
        assert '<img id="stream" src="/stream"' in body
        for path in ("/favicon.ico", "/etc/passwd", "/stream/../x"):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            conn.request("GET", path)
            assert conn.getresponse().status == 404
        for _ in range(3):  # clients that leave abruptly, mid-stream
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.0 200")
            s.close()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/stream")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "multipart/x-mixed-replace; boundary=explicamframe"
        values = []
        for _ in range(4):
            headers, jpeg = read_part(resp)
            assert headers["content-type"] == "image/jpeg"
            img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (48, 64, 3)
            values.append(int(img.mean()))
        assert len(set(values)) > 1  # new frames keep coming
        conn.close()
    finally:
        stop.set()
        server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with pytest.raises(ValueError, match=r"--serve \d+: cannot listen on 127.0.0.1:\d+ \(already in use\)"):
        MjpegServer(taken.getsockname()[1])
    taken.close()
    everywhere = MjpegServer(0, host="0.0.0.0")  # --host 0.0.0.0: the network may watch
    try:
        assert everywhere.address[0] == "0.0.0.0"
        # off loopback a token comes by default, in the URL, and nothing is served without it
        assert everywhere.public_url == f"http://{socket.gethostname()}:{everywhere.port}/"
        assert re.fullmatch(re.escape(everywhere.public_url) + r"\?token=[\w-]{22}", everywhere.url)
        conn = http.client.HTTPConnection("127.0.0.1", everywhere.port, timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().status == 401
    finally:
        everywhere.close()


def test_serve_streams_the_explained_video_to_an_http_client(tmp_path, onnx_model):
    long_clip = write_clip(tmp_path / "long.avi", 100)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "explain", "--video", str(long_clip), "--serve", "0",
                             "--realtime", "--model", str(onnx_model)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = int(re.search(r"live view: http://127\.0\.0\.1:(\d+)/", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/stream")
        resp = conn.getresponse()
        for _ in range(3):
            _, jpeg = read_part(resp)
            frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert frame.shape == (120, 160, 3)
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr


def test_the_capture_threads_fast_resize_is_the_models_resize():
    from explicam.runtime.images import resize_rgb
    from explicam.runtime.video.loop import shrink_to_input

    rng = np.random.default_rng(0)
    for h, w, size in ((480, 640, 128), (720, 1280, 224), (120, 160, 64), (1080, 1920, 64)):
        frame = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        cv2.rectangle(frame, (w // 5, h // 7), (w // 2, h // 2), (255, 0, 40), -1)  # sharp edges too
        diff = np.abs(shrink_to_input(frame, size).astype(int) - resize_rgb(frame, size))
        assert diff.max() <= 1, (h, w, size)
        rgb = cv2.cvtColor(resize_rgb(frame, size), cv2.COLOR_BGR2RGB)  # what the capture thread hands on
        assert np.abs(shrink_to_input(frame, size, rgb=True).astype(int) - rgb).max() <= 1, (h, w, size)


def test_bench_video_reports_loop_and_forward_rates(onnx_model):
    res = bench_video(onnx_model, frames=30, size=(160, 120), rounds=3)
    assert res["frames"] == 30 and res["rounds"] == 3 and res["loop_fps"] > 0
    assert res["forward_fps"] > 0 and res["gradcam_call_fps"] > 0
    forward = [float(f) for f in res["forward_fps_per_measurement"].split()]
    per_round = [float(r) for r in res["loop_vs_forward_per_round"].split()]
    assert len(forward) == 4 and len(per_round) == 3  # forward, loop, forward, loop, forward, loop, forward
    assert res["forward_fps"] == pytest.approx(sum(forward) / 4, abs=0.2)
    assert res["loop_vs_forward"] == sorted(per_round)[1]  # the median round
    assert res["rss_start_mb"] > 0 and res["rss_end_mb"] > 0


def test_cli_bench_video_prints_the_ratio_and_refuses_zero_rounds(onnx_model):
    res = run_cli("bench", "--video", "--model", onnx_model, "--frames", "12", "--rounds", "2")
    assert res.returncode == 0, res.stderr
    values = dict(line.split(None, 1) for line in res.stdout.splitlines() if line.strip() and " " in line.strip())
    assert values["frames"].strip() == "12" and values["rounds"].strip() == "2"
    assert len(values["loop_vs_forward_per_round"].split()) == 2 and float(values["loop_vs_forward"]) > 0
    bad = cli_in_process("bench", "--video", "--model", onnx_model, "--rounds", "0")
    assert bad.returncode != 0 and "--rounds" in bad.stderr and "Traceback" not in bad.stderr


def test_two_frames_in_flight_keep_a_files_order(tmp_path, onnx_model):
    # Two explain threads finish out of order; a file's frames must still come out in order,
    # every one of them, each the overlay of its own frame.
    from explicam.runtime.video.capture import Source
    from explicam.runtime.video.loop import make_explainers

    clip = write_clip(tmp_path / "moving.avi", 25)  # 25 distinct disc positions (the clip wraps at 28)
    source, _ = read_frames(clip)
    got = []
    res = run_stream(Source(str(clip), "clip", "file"), make_explainers(onnx_model, 2),
                     StreamConfig(method="gradcam", labels=False, alpha=0.2), sinks=[Collect(got)])
    assert res.frames == len(got) == 25
    for i, frame in enumerate(got):  # the moving disc: frame i is nearest to source frame i
        dist = [np.abs(frame.astype(int) - s.astype(int)).mean() for s in source]
        assert int(np.argmin(dist)) == i
