"""The live view as a user sees it: the page served by `explain --serve`, opened in headless
Chromium while the loop explains a (fake) camera, must show the stream's frames; with a
token, only when the page was opened with it (the page passes it on to the stream), also
over HTTPS."""
import os
import shutil
import subprocess
import tempfile
import threading
import time

import cv2
import numpy as np
import pytest

from explicam.runtime.video.capture import Source
from explicam.runtime.video.loop import run_stream
from explicam.runtime.video.mjpeg import ServeOptions
from explicam.runtime.video.sinks import ServeSink
from tests.test_live_access import self_signed

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="headless Chromium not installed (apt-get install chromium)")


class Camera:
    """A live camera: a colour ramp with a moving disc, 25 frames per second, until closed."""

    def __init__(self):
        self.closed, self.count = False, 0
        yy, xx = np.mgrid[0:240, 0:320]
        self.base = np.stack([xx * 255 // 319, yy * 255 // 239, (xx + yy) % 256], -1).astype(np.uint8)

    def read(self):
        if self.closed:
            return False, None
        time.sleep(0.04)
        frame = self.base.copy()
        cv2.circle(frame, (40 + self.count * 7 % 240, 120), 30, (20, 20, 230), -1)
        self.count += 1
        return True, frame

    def get(self, prop):
        return 25.0

    def release(self):
        self.closed = True


class Stopper:
    stop_requested = False

    def write(self, frame):
        pass

    def close(self):
        pass


def screenshot(url, path, *flags):
    """Chromium's rendering of `url` after 3 s of virtual time, as a BGR image."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        res = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", *flags,
             f"--user-data-dir={profile}", f"--screenshot={path}", "--window-size=800,600",
             "--virtual-time-budget=3000", url],
            capture_output=True, text=True, timeout=90)
        assert os.path.exists(path), res.stderr[-2000:]
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    page = cv2.imread(str(path))
    assert page.shape[:2] == (600, 800)
    return page


def frame_box(page):
    """The part of the page that differs from its dark grey (#111) background, or None."""
    foreground = np.abs(page.astype(int) - 17).sum(axis=2) > 30
    rows = np.nonzero(foreground.sum(axis=1) > 200)[0]  # image rows, not the short caption below it
    if not len(rows):
        return None
    cols = np.nonzero(foreground[rows].any(axis=0))[0]
    return page[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def assert_shows_the_frame(page):
    box = frame_box(page)
    assert box is not None, "nothing drawn: the stream never reached the page"
    assert (box.shape[1], box.shape[0]) == pytest.approx((320, 240), abs=4)  # the frame at its own size
    colours = len(np.unique(box.reshape(-1, 3), axis=0))
    assert colours > 1000, f"only {colours} colours in the image area: no explained frame arrived"


class Live:
    """The loop explaining the fake camera into a ServeSink, on a thread, until stopped."""

    def __init__(self, onnx_model, options=None):
        from explicam.runtime import Explainer

        explainer = Explainer(onnx_model, batch_size=1)
        self.serve, self.stopper, self.done = ServeSink(0, options=options), Stopper(), {}
        self.thread = threading.Thread(target=lambda: self.done.setdefault("result", run_stream(
            Source(0, "camera 0", "camera"), explainer, sinks=[self.serve, self.stopper], cap=Camera())),
            daemon=True)
        self.thread.start()

    def stop(self):
        self.stopper.stop_requested = True
        self.thread.join(timeout=20)
        return self.done["result"]


def test_live_page_shows_the_stream_in_chromium(onnx_model, tmp_path):
    live = Live(onnx_model)
    try:
        page = screenshot(live.serve.url, tmp_path / "page.png")
    finally:
        result = live.stop()
    assert result.frames > 0 and result.reason == "stopped"
    assert_shows_the_frame(page)
    # no socket left behind: the server shut down with the loop
    with pytest.raises(OSError):
        import socket
        socket.create_connection(("127.0.0.1", live.serve.server.port), timeout=2)


def test_with_a_token_the_page_shows_the_stream_only_when_opened_with_it(onnx_model, tmp_path):
    live = Live(onnx_model, ServeOptions(token="page-token-1234"))
    try:
        url = live.serve.url
        assert url.endswith("/?token=page-token-1234")
        with_token = screenshot(url, tmp_path / "with.png")
        wrong = screenshot(url.replace("1234", "1235"), tmp_path / "wrong.png")
        without = screenshot(live.serve.server.public_url, tmp_path / "without.png")
    finally:
        live.stop()
    assert_shows_the_frame(with_token)  # the page passed the token on to /stream
    for page in (wrong, without):  # Chromium shows the 401's text, black on white: no colour of a frame
        coloured = (page.max(axis=2).astype(int) - page.min(axis=2)) > 30
        assert coloured.mean() < 0.001 and np.median(page) == 255


def test_the_page_over_https_shows_the_stream(onnx_model, tmp_path):
    import ssl

    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    live = Live(onnx_model, ServeOptions(token="tls-token-12345", tls=context))
    try:
        assert live.serve.url.startswith("https://127.0.0.1:")
        page = screenshot(live.serve.url, tmp_path / "tls.png", "--ignore-certificate-errors")
    finally:
        live.stop()
    assert_shows_the_frame(page)
