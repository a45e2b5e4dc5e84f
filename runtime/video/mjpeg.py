"""A live MJPEG stream of the explained frames, for a headless board on the network.

Two paths only: `/` (a small HTML page) and `/stream` (multipart/x-mixed-replace JPEG,
which every browser shows in a plain <img>). Anything else is a 404; who may open the two
is decided in access.py (the token).

How it holds many viewers and hostile connections on a small board:
  * One asyncio event loop, on one thread, serves every connection: TLS handshakes,
    reading requests, writing frames. A connection costs a few KB of memory, not a
    thread: the standard library's ThreadingHTTPServer gave every socket a thread for
    as long as its timeout, so 500 sockets that never send a request meant 500 threads.
    Here such a socket is closed after `request_timeout` seconds (a TLS handshake is
    bounded by the same time), and beyond `max_pending` of them the oldest is closed
    first: a real browser sends its request at once, so it is never the oldest.
  * One encoder thread encodes each frame to JPEG once, whatever the number of viewers,
    and not at all while nobody watches (cv2.imencode releases the GIL, so it runs
    beside the explain threads).
  * The explain loop only swaps a reference and sets an event (publish): it never waits
    for a viewer. A viewer is sent the newest frame once its previous one has left the
    process (drain), so a slow viewer skips frames instead of queueing them, and one that
    takes nothing for `write_timeout` seconds is dropped.
  * At most `max_clients` viewers at once; one more is answered 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import collections
import html
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import cv2

from explicam.runtime.video.access import Access, is_loopback, resolve_token

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
  <img id="stream" src="/stream{query}" alt="live explanation stream">
  <p>{title}</p>
  <script>
    // a full server (503) or a restart: try again every few seconds instead of a broken image
    const img = document.getElementById("stream"), src = img.src;
    img.addEventListener("error", () => setTimeout(() => {{
      img.src = src + (src.includes("?") ? "&" : "?") + "retry=" + Date.now(); }}, 3000));
  </script>
</body></html>
"""
SEND_BUFFER = 256 * 1024   # per viewer socket: a few frames of lag at most, not the kernel's megabytes
MAX_REQUEST_BYTES = 16384  # request line and headers; a browser sends well under 2 KB
BACKLOG = 1024             # connections the kernel queues before they are accepted


@dataclass
class ServeOptions:
    token: str | None = None            # required from every request when set (access.py)
    tls: object = None                  # an ssl.SSLContext: HTTPS
    max_clients: int = 16               # viewers of /stream at once
    request_timeout: float = 5.0        # a connection must have sent its request (and TLS handshake) by then
    write_timeout: float = 15.0         # a viewer that takes nothing for this long is dropped
    max_pending: int | None = None      # connections still to send a request; beyond, the oldest is closed
                                        # [default: half the process's file limit, 64 to 1024]
    retry_after: int = 5                # seconds, told to the viewer turned away
    quality: int = 80                   # JPEG quality


class FrameHub:
    """The newest frame, from the loop to one encoder thread to every viewer.

    publish() runs on the loop's thread; encode_forever() on its own thread; the rest on
    the server's event loop (viewers, part, next_part)."""

    def __init__(self, quality: int = 80):
        self.quality = int(quality)
        self._lock = threading.Lock()
        self._frame, self.published = None, 0
        self._wake = threading.Event()
        self.closed = False
        self.encoded = 0                  # JPEG encodings so far: at most one per published frame
        self.viewers = 0                  # changed on the event loop only
        self.part, self.part_seq = None, 0
        self._loop, self._new = None, None

    def bind(self, loop) -> None:
        self._loop, self._new = loop, asyncio.Event()

    def publish(self, bgr) -> None:
        with self._lock:
            self._frame, self.published = bgr, self.published + 1
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._deliver, self.part_seq, self.part)
            except RuntimeError:
                pass  # the loop has already stopped

    def encode_forever(self) -> None:
        done = 0
        while True:
            self._wake.wait()
            self._wake.clear()
            if self.closed:
                return
            if not self.viewers:
                continue  # nobody watches: no encoding at all
            with self._lock:
                frame, seq = self._frame, self.published
            if frame is None or seq == done:
                continue
            ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
            done = seq
            if not ok:
                continue
            jpeg = buf.tobytes()
            self.encoded += 1
            # header and frame in one bytes object, built once and written as is to every viewer
            part = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                    + jpeg + b"\r\n")
            try:
                self._loop.call_soon_threadsafe(self._deliver, seq, part)
            except RuntimeError:
                return  # the server's loop is gone

    def _deliver(self, seq, part) -> None:
        self.part, self.part_seq = part, seq
        new, self._new = self._new, asyncio.Event()
        new.set()

    async def next_part(self, after: int):
        """(seq, part) of a frame newer than `after`; (after, None) once closed."""
        while self.part_seq <= after and not self.closed:
            await self._new.wait()
        return (after, None) if self.closed else (self.part_seq, self.part)


def _default_max_pending() -> int:
    """Half the file descriptors this process may open (the rest stay for viewers, the
    model, the recording), within 64..1024: silent sockets never starve the process."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        soft = 4096 if soft == resource.RLIM_INFINITY else soft
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(64, min(1024, soft // 2))


def _quiet_client_errors(loop, context):
    """Clients that vanish, time out or fail the TLS handshake are normal on a network:
    no traceback on the console the loop reports on. Anything else is shown."""
    if isinstance(context.get("exception"), (OSError, asyncio.TimeoutError, asyncio.CancelledError)):
        return
    loop.default_exception_handler(context)


class MjpegServer:
    """Serve the newest published frame to browsers; `url` says where (with the token)."""

    def __init__(self, port: int, host: str = "127.0.0.1", title: str = "explicam live",
                 options: ServeOptions | None = None):
        # no options: secure by default, as on the command line (a random token off loopback)
        self.options = opts = options or ServeOptions(token=resolve_token(host, env={}))
        if opts.max_clients < 1:
            raise ValueError(f"--max-clients: must be at least 1 (got {opts.max_clients})")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:  # bound here, on the caller's thread, so a taken port is a clear error at once
            sock = socket.create_server((host, int(port)), family=family, backlog=BACKLOG)
        except OSError as exc:
            why = "already in use" if exc.errno in (98, 48, 10048) else (exc.strerror or str(exc))
            raise ValueError(f"--serve {port}: cannot listen on {host}:{port} ({why}); "
                             "pick another port (0 picks a free one)") from None
        self.address = sock.getsockname()
        self.host, self.port, self.title = host, self.address[1], title
        self.access = Access(opts.token, is_loopback(host))
        self.hub = FrameHub(opts.quality)
        self._pending = collections.OrderedDict()  # writer -> None, oldest first
        self._max_pending = opts.max_pending or _default_max_pending()
        self.refused = 0                           # 503s so far
        self._loop = asyncio.new_event_loop()
        self._started, self._error = threading.Event(), None
        self._thread = threading.Thread(target=self._run, args=(sock,), name="mjpeg-server", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error
        self._encoder = threading.Thread(target=self.hub.encode_forever, name="mjpeg-encoder", daemon=True)
        self._encoder.start()
        self._closed = False

    # ------------------------------------------------------------------ addresses
    @property
    def public_url(self) -> str:
        """The address without the token (safe to log)."""
        host = self.host
        if host in ("0.0.0.0", "", "::"):  # reachable from the network: say which name to use
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.options.tls else 'http'}://{host}:{self.port}/"

    @property
    def url(self) -> str:
        return self.public_url + self.access.query()

    # ------------------------------------------------------------------ the loop's side
    def publish(self, bgr) -> None:
        self.hub.publish(bgr)

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.hub.close()
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        except Exception:  # a stuck shutdown must not keep the loop's outputs from finishing
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._encoder.join(timeout=2)

    # ------------------------------------------------------------------ the server's thread
    def _run(self, sock) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_quiet_client_errors)
        self.hub.bind(loop)
        extra = {"ssl": self.options.tls, "ssl_handshake_timeout": self.options.request_timeout} \
            if self.options.tls else {}
        try:
            self._server = loop.run_until_complete(
                # backlog again: asyncio listens anew with its own (100), and a burst of connections
                # beyond it waits a second per dropped SYN
                asyncio.start_server(self._client, sock=sock, limit=MAX_REQUEST_BYTES, backlog=BACKLOG, **extra))
        except BaseException as exc:
            sock.close()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        self._server.close()  # the port is free from here on
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, reader, writer) -> None:
        self._pending[writer] = None
        if len(self._pending) > self._max_pending:
            oldest, _ = self._pending.popitem(last=False)
            oldest.transport.abort()
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.options.request_timeout)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                return  # silent, too slow, too long, or gone: closed without an answer
            finally:
                self._pending.pop(writer, None)
            await self._answer(head, reader, writer)
        except (OSError, asyncio.TimeoutError):
            pass  # the client went away or stopped reading
        finally:
            await self._close_gently(writer)

    async def _close_gently(self, writer) -> None:
        if writer.transport.is_closing():
            return
        writer.close()  # flushes the short answer, then closes (TLS: with its close_notify)
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (OSError, asyncio.TimeoutError, asyncio.CancelledError):
            writer.transport.abort()

    async def _answer(self, head: bytes, reader, writer) -> None:
        """Route one request."""
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            await self._send(writer, 400, "Bad Request", "not an HTTP request\n")
            return
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        parts = urlsplit(target)
        body = method != "HEAD"
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, "Method Not Allowed", "only GET\n", {"Allow": "GET, HEAD"})
        elif parts.path not in ("/", "/index.html", "/stream"):
            await self._send(writer, 404, "Not Found", "only / and /stream are served here\n", body=body)
        elif not self.access.allowed(parts.query, headers):
            # says how to get in, never what the token is
            await self._send(writer, 401, "Unauthorized", "401: this live view needs its token: open the URL "
                             "explicam printed when it started (...?token=...)\n",
                             {"WWW-Authenticate": 'Bearer realm="explicam"'}, body=body)
        elif parts.path != "/stream":
            page = PAGE.format(title=html.escape(self.title), query=html.escape(self.access.query()))
            await self._send(writer, 200, "OK", page, content_type="text/html; charset=utf-8", body=body)
        elif self.hub.viewers >= self.options.max_clients:
            self.refused += 1
            await self._send(writer, 503, "Service Unavailable",
                             f"{self.options.max_clients} viewers are watching already (--max-clients); "
                             f"try again in {self.options.retry_after} s\n",
                             {"Retry-After": str(self.options.retry_after)}, body=body)
        elif not body:
            await self._send(writer, 200, "OK", "", content_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                             body=False)
        else:
            await self._stream(reader, writer)

    async def _send(self, writer, status: int, reason: str, text: str, extra: dict | None = None,
                    content_type: str = "text/plain; charset=utf-8", body: bool = True) -> None:
        data = text.encode()
        fields = {"Server": "explicam", "Content-Type": content_type, "Content-Length": str(len(data)),
                  "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                  "X-Content-Type-Options": "nosniff", "Connection": "close", **(extra or {})}
        head = f"HTTP/1.0 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        writer.write(head.encode() + (data if body else b""))
        await asyncio.wait_for(writer.drain(), self.options.write_timeout)

    async def _stream(self, reader, writer) -> None:
        hub = self.hub
        hub.viewers += 1
        hub.wake()  # the first viewer after a quiet spell: the encoder starts on the newest frame
        # others watching: the current part is fresh, send it at once; else wait for the next one
        seq = hub.part_seq - 1 if hub.viewers > 1 and hub.part is not None else hub.part_seq
        task = asyncio.current_task()
        watcher = asyncio.ensure_future(_until_eof(reader))

        def left(_):  # a viewer that closes its side frees its place at once, even while no frame comes
            task.cancel()
        watcher.add_done_callback(left)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            writer.transport.set_write_buffer_limits(high=0)  # drain() waits until the part is in the kernel
            writer.write((f"HTTP/1.0 200 OK\r\nServer: explicam\r\n"
                          f"Content-Type: multipart/x-mixed-replace; boundary={BOUNDARY}\r\n"
                          "Cache-Control: no-store, no-cache, must-revalidate\r\nPragma: no-cache\r\n"
                          "Referrer-Policy: no-referrer\r\nConnection: close\r\n\r\n").encode())
            while True:
                seq, part = await hub.next_part(seq)
                if part is None:
                    return
                writer.write(part)
                await asyncio.wait_for(writer.drain(), self.options.write_timeout)
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():  # the server is shutting down, not the viewer leaving
                raise
        finally:
            hub.viewers -= 1
            watcher.remove_done_callback(left)
            watcher.cancel()
            writer.transport.abort()  # a viewer may have stopped reading: nothing more is flushed to it


async def _until_eof(reader) -> None:
    """Returns when the viewer closes its side (what it sends is ignored)."""
    try:
        while await reader.read(4096):
            pass
    except OSError:
        pass
