"""The live view as a user sees it: the page served by `explain --serve`, opened in headless
Chromium while the loop explains a (fake) camera, must show the stream's frames."""
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
from explicam.runtime.video.sinks import ServeSink
from explicam.runtime.video.loop import run_stream

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


def test_live_page_shows_the_stream_in_chromium(onnx_model, tmp_path):
    from explicam.runtime import Explainer

    explainer = Explainer(onnx_model, batch_size=1)
    serve, stopper = ServeSink(0), Stopper()
    done = {}
    loop = threading.Thread(target=lambda: done.setdefault("result", run_stream(
        Source(0, "camera 0", "camera"), explainer, sinks=[serve, stopper], cap=Camera())), daemon=True)
    loop.start()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    shot = tmp_path / "page.png"
    try:
        res = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=800,600",
             "--virtual-time-budget=3000", serve.url],
            capture_output=True, text=True, timeout=90)
        assert shot.exists(), res.stderr[-2000:]
    finally:
        stopper.stop_requested = True
        loop.join(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)
    assert done["result"].frames > 0 and done["result"].reason == "stopped"
    page = cv2.imread(str(shot))
    assert page.shape[:2] == (600, 800)
    # the page is dark grey (#111) around the <img>; the frame must be drawn inside it
    foreground = np.abs(page.astype(int) - 17).sum(axis=2) > 30
    rows = np.nonzero(foreground.sum(axis=1) > 200)[0]  # image rows, not the short caption below it
    assert len(rows), "nothing drawn: the stream never reached the page"
    cols = np.nonzero(foreground[rows].any(axis=0))[0]
    box = page[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert (box.shape[1], box.shape[0]) == pytest.approx((320, 240), abs=4)  # the frame at its own size
    colours = len(np.unique(box.reshape(-1, 3), axis=0))
    assert colours > 1000, f"only {colours} colours in the image area: no explained frame arrived"
    # no socket left behind: the server shut down with the loop
    with pytest.raises(OSError):
        import socket
        socket.create_connection(("127.0.0.1", serve.server.port), timeout=2)
