"""The live server under load, on loopback, against bounded clients: 64 streaming viewers
(16 more than the cap) and 500 sockets that never send a request, all at once.

The clients run in a child process (loadtest.clients_main, one selectors loop), the
server and a synthetic frame producer at a camera's 30 frames/s in this one, so the
producer's rate, threads and memory measured here are the server's alone."""
import socket
import threading

from explicam.runtime.video.loadtest import run_load

VIEWERS, IDLE, CAP, SECONDS, FPS = 64, 500, 48, 3.0, 30.0


def probe_full_server(server):
    """This test's own client while the cap is full: a 503 with a retry hint, at once."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(4096)
        if not data:
            break
        answer += data
    sock.close()
    return {"answer": answer.decode("latin-1"), "threads": threading.active_count(),
            "refused_so_far": server.refused}


def test_many_viewers_and_idle_sockets_at_once():
    res = run_load(VIEWERS, IDLE, CAP, SECONDS, FPS, size=(320, 240), during=probe_full_server)
    # the viewers under the cap stream, the rest are told to come back later
    assert res["held"] == res["held_by_server"] == CAP and res["refused_503"] == VIEWERS - CAP, res
    assert res["refused_with_retry_after"] == VIEWERS - CAP and res["other_status"] == []
    assert res["probes"]["answer"].startswith("HTTP/1.0 503") and "Retry-After: 5" in res["probes"]["answer"]
    assert res["probes"]["refused_so_far"] == VIEWERS - CAP + 1
    # every held viewer gets (nearly) every frame; a new one gets its first within 2 s
    assert res["fps_per_viewer_min"] >= 0.8 * res["producer_fps_loaded"], res
    assert res["first_frame_max_s"] < 2 and res["fresh_first_frame_s"] is not None and res["fresh_first_frame_s"] < 2
    # the loop does not wait for viewers: its rate stays within 10% of its rate alone
    assert res["producer_fps_alone"] > 0.9 * FPS and res["producer_drop"] < 0.10, res
    # one JPEG per frame, whatever the number of viewers
    assert 0 < res["jpeg_encoded"] <= res["frames_published"]
    assert res["frames_sent"] > 0.8 * CAP * res["jpeg_encoded"]
    # silent sockets: closed by the server after its request timeout (6 s here), none held longer,
    # and no thread each: the server's threads are the same few with 500 sockets open
    low, high = res["idle_closed_after_s"]
    assert res["idle_closed"] == IDLE and 5.9 <= low and high <= 7.5, res
    assert res["threads_at_load"] <= res["threads_start"] + 1 and res["probes"]["threads"] <= res["threads_start"] + 1
    # and once everyone has left, the memory is back (within 20 MB)
    assert res["everyone_left"] and res["rss_after_mb"] - res["rss_start_mb"] < 20, res
