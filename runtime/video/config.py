"""What one video stream is asked to do (`cli.py explain --webcam/--video ...`), in one value.

StreamConfig gathers the options of the explain loop (method, placement, feature layer and
method options, as runtime/files.py's FilesConfig has them), its sinks, the live server's access
rules and the network camera's reconnection, and checks them before anything opens: a bad
option is one line naming it, said before the camera or the model is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from explicam.runtime.video.access import resolve_token, tls_context
from explicam.runtime.video.capture import Reconnect, Source
from explicam.runtime.video.mjpeg import ServeOptions

SERVE_ONLY = ("token", "no_token", "certfile", "keyfile", "max_clients")


@dataclass
class StreamConfig:
    model: str | None = None          # ONNX model [default: the newest runs/*/model.onnx]
    method: str = "gradcam"
    target: object = None             # class name or index [default: top-1]
    # how it is explained: the Explainer's own options, as FilesConfig has them (runtime/files.py)
    placement: str | None = None      # geometric / naive / effective [default: the model's, runtime/placement.py]
    feature_layer: str | None = None  # which feature layer single-layer methods read (export --layer a,b)
    options: dict = field(default_factory=dict)  # method options: rise_masks, finercam_k, ... (runtime/methods*.py)
    # where the frames go
    show: bool = False
    output: str | None = None         # a video file
    serve: int | None = None          # MJPEG port
    host: str = "127.0.0.1"
    out: str = "out"                  # a file's default recording goes to out/<name>_<method>.mp4
    # who may watch (--serve)
    token: str | None = None          # [default: $EXPLICAM_TOKEN, or random off loopback]
    no_token: bool = False
    certfile: str | None = None
    keyfile: str | None = None
    max_clients: int | None = None    # [default: 16]
    # network cameras
    reconnect: bool | None = None     # [default: on for network streams, off for cameras and files]
    max_retries: int | None = None    # reopen attempts in a row without a frame [default: no limit]
    backoff: float = 1.0              # first wait before reopening; doubles up to backoff_max
    backoff_max: float = 30.0
    # the overlay
    alpha: float = 0.5
    colormap: str = "jet"
    labels: bool = True
    # the loop
    max_frames: int | None = None
    kernels: str = "auto"
    threads: int | None = None
    in_flight: int | None = None      # frames explained at once [default: 2 with 2 cores or more]
    lost_after: float = 3.0           # a live source silent this long has stopped
    first_frame_timeout: float = 10.0

    def reconnects(self, source: Source) -> bool:
        return source.kind == "stream" if self.reconnect is None else bool(self.reconnect)

    def reconnect_policy(self, source: Source) -> Reconnect | None:
        if not self.reconnects(source):
            return None
        return Reconnect(self.max_retries, self.backoff, self.backoff_max)

    def check(self, source: Source) -> None:
        """ValueError, naming the option, for anything that cannot work."""
        if self.serve is None:
            given = [name for name in SERVE_ONLY if getattr(self, name) not in (None, False)]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')}: only with --serve PORT")
        elif not 0 <= int(self.serve) <= 65535:
            raise ValueError(f"--serve: a port number from 0 to 65535 (got {self.serve})")
        if self.max_clients is not None and self.max_clients < 1:
            raise ValueError(f"--max-clients: must be at least 1 (got {self.max_clients})")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"--max-frames: must be at least 1 (got {self.max_frames})")
        if self.reconnect and source.kind == "file":
            raise ValueError(f"--reconnect: {source.name} is a file, which ends; reconnecting is for cameras "
                             "and network streams (rtsp://, http://)")
        if self.max_retries is not None:
            if self.max_retries < 1:
                raise ValueError(f"--max-retries: must be at least 1 (got {self.max_retries}); "
                                 "--no-reconnect turns reconnecting off")
            if not self.reconnects(source):
                raise ValueError("--max-retries: only with --reconnect (on by default for rtsp:// and http:// "
                                 "streams)")
        if not (self.backoff > 0 and self.backoff_max >= self.backoff):
            raise ValueError(f"backoff: needs 0 < first ({self.backoff}) <= longest ({self.backoff_max})")

    def serve_options(self, env=None) -> ServeOptions:
        """The live server's settings, the token resolved (given, from the environment or random)."""
        token = resolve_token(self.host, self.token, self.no_token, env)
        return ServeOptions(token=token, tls=tls_context(self.certfile, self.keyfile),
                            max_clients=16 if self.max_clients is None else int(self.max_clients))
