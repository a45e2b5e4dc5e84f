"""explicam.runtime.video: frames in, explained frames out.

    capture.py  sources (camera, file, stream) read on their own thread
    loop.py     the explain loop: two frames in flight, overlays, sinks; explain_stream()
    sinks.py    window, video file, MJPEG server, null
    mjpeg.py    the live page and stream over HTTP
    bench.py    the video benchmark (`cli.py bench --video`); imports loop, never the reverse
"""
from explicam.runtime.video.loop import StreamResult, explain_stream, make_explainers, run_stream

__all__ = ["StreamResult", "explain_stream", "make_explainers", "run_stream"]
