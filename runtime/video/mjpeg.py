"""A live MJPEG stream of the explained frames, for a headless board on the network.

Two paths only: `/` (a small HTML page) and `/stream` (multipart/x-mixed-replace JPEG,
which every browser shows in a plain <img>). Anything else is a 404. Each client has its
own thread and always gets the newest frame, so a slow client skips frames instead of
queueing them, and a client that leaves only ends its own thread. JPEG encoding happens
in the client threads, once per frame however many clients watch, and not at all when
nobody does: the explain loop only hands over a reference.
"""
from __future__ import annotations

import html
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import cv2

BOUNDARY = "explicamframe"
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  html, body {{ margin: 0; height: 100%; background: #111; color: #bbb; font: 14px system-ui, sans-serif; }}
  body {{ display: flex; flex-direction: column; align-items: center; justify-content: center; }}
  img {{ max-width: 100vw; max-height: calc(100vh - 2.5em); background: #222; }}
  p {{ margin: .6em; }}
</style></head>
<body>
  <img id="stream" src="/stream" alt="live explanation stream">
  <p>{title}</p>
</body></html>
"""


class FrameHub:
    """The newest frame, handed from the loop to any number of client threads."""

    def __init__(self, quality: int = 80):
        self.quality = int(quality)
        self._cond = threading.Condition()
        self._frame, self._seq, self._jpeg, self._jpeg_seq = None, 0, None, -1
        self.closed = False

    def publish(self, bgr) -> None:
        with self._cond:
            self._frame, self._seq = bgr, self._seq + 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def next_jpeg(self, after: int, timeout: float = 1.0):
        """(seq, JPEG bytes) of a frame newer than `after`, or None on timeout / close."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.closed or self._seq > after, timeout):
                return None
            if self.closed:
                return None
            seq, frame = self._seq, self._frame
            if self._jpeg_seq == seq:
                return seq, self._jpeg
        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        jpeg = buf.tobytes() if ok else b""
        with self._cond:
            if seq > self._jpeg_seq:
                self._jpeg, self._jpeg_seq = jpeg, seq
        return seq, jpeg


class _Handler(BaseHTTPRequestHandler):
    server_version = "explicam"
    timeout = 15  # a client that stops reading is dropped instead of holding its thread forever

    def do_GET(self):
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._page()
        elif path == "/stream":
            self._stream()
        else:
            self.send_error(404, "only / and /stream are served here")

    def _page(self):
        body = PAGE.format(title=html.escape(self.server.title)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self):
        hub = self.server.hub
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store, no-cache, must-revalidate")
        self.send_header("Pragma", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        seq = 0
        try:
            while not hub.closed:
                got = hub.next_jpeg(seq)
                if got is None:
                    continue
                seq, jpeg = got
                self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}"
                                 "\r\n\r\n".encode() + jpeg + b"\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            pass  # the viewer closed the tab or went away: only this thread ends

    def log_message(self, *args):  # no access log on the terminal the loop reports on
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # streaming clients never keep the process alive
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # a client vanishing mid-request is not worth a traceback on the console


class MjpegServer:
    """Serve the newest published frame to browsers; `url` says where."""

    def __init__(self, port: int, host: str = "127.0.0.1", title: str = "explicam live", quality: int = 80):
        server = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
        try:
            self.httpd = server((host, int(port)), _Handler)
        except OSError as exc:
            why = "already in use" if exc.errno in (98, 48, 10048) else (exc.strerror or str(exc))
            raise ValueError(f"--serve {port}: cannot listen on {host}:{port} ({why}); "
                             "pick another port (0 picks a free one)") from None
        self.hub = FrameHub(quality)
        self.httpd.hub, self.httpd.title = self.hub, title
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="mjpeg-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "", "::"):  # reachable from the network: say which name to use
            host = socket.gethostname()
        return f"http://{host}:{self.port}/"

    def publish(self, bgr) -> None:
        self.hub.publish(bgr)

    def close(self) -> None:
        self.hub.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=2)
