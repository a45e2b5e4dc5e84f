"""explicam.runtime.video: frames in, explained frames out.

    capture.py   sources (camera, file, stream) read on their own thread; network reconnection
    config.py    StreamConfig: every option of one stream, checked before anything opens
    loop.py      the explain loop: two frames in flight, overlays, sinks; explain_stream()
    sinks.py     window, video file, MJPEG server, null; make_sinks()
    mjpeg.py     the live page and stream over HTTP(S): one event loop, one encoder
    access.py    who may watch: token, TLS, loopback rules
    bench.py     the video benchmark (`cli.py bench --video`); imports loop, never the reverse
    loadtest.py  the live server under many viewers and idle sockets (README figures)
"""
from explicam.runtime.video.config import StreamConfig
from explicam.runtime.video.loop import StreamResult, explain_stream, make_explainers, run_stream

__all__ = ["StreamConfig", "StreamResult", "explain_stream", "make_explainers", "run_stream"]
