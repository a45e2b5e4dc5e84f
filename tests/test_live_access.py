"""Who may watch the live view: the token on both paths (none, wrong, right; query and
Bearer), the constant-time compare, the loopback rules, HTTPS, and the command line's
token handling (printed once, from the environment, --no-token's warning, bad options)."""
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from explicam.runtime.video import access
from explicam.runtime.video.access import Access, is_loopback, resolve_token
from explicam.runtime.video.mjpeg import MjpegServer, ServeOptions
from tests.conftest import ROOT

TOKEN = "right-token-0123456789"


def self_signed(folder):
    """A certificate for 127.0.0.1 and its key (PEM), made with openssl or `cryptography`."""
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    if shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        return cert, key
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        pytest.skip("neither the openssl command nor the cryptography package is here to make a test certificate")
    pkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pkey.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False).sign(pkey, hashes.SHA256()))
    with open(cert, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key, "wb") as f:
        f.write(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption()))
    return cert, key


class Pump:
    """Publishes a changing 64x48 frame every 20 ms into a server, until stopped."""

    def __init__(self, server):
        self.server, self.stop = server, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        i = 0
        while not self.stop.is_set():
            self.server.publish(np.full((48, 64, 3), (i * 40) % 256, np.uint8))
            i += 1
            time.sleep(0.02)

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.server.close()


def get(port, path, headers=None, context=None):
    """(status, headers, first bytes of the body) of one GET."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context) if context
            else http.client.HTTPConnection("127.0.0.1", port, timeout=5))
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read(400) if resp.status == 200 and path.startswith("/stream") else resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_token_rules():
    assert resolve_token("127.0.0.1", env={}) is None  # loopback: open, as before
    assert resolve_token("localhost", env={}) is None and resolve_token("::1", env={}) is None
    made = {resolve_token("0.0.0.0", env={}) for _ in range(3)}
    assert len(made) == 3 and all(re.fullmatch(r"[\w-]{22}", t) for t in made)  # 128 random bits each
    assert resolve_token("0.0.0.0", "given-token", env={}) == "given-token"
    assert resolve_token("127.0.0.1", "given-token", env={}) == "given-token"  # a given token always counts
    assert resolve_token("0.0.0.0", env={"EXPLICAM_TOKEN": "from-the-env"}) == "from-the-env"
    assert resolve_token("0.0.0.0", "given-token", env={"EXPLICAM_TOKEN": "from-the-env"}) == "given-token"
    assert resolve_token("0.0.0.0", no_token=True, env={"EXPLICAM_TOKEN": "from-the-env"}) is None
    with pytest.raises(ValueError, match="^--no-token: cannot be combined with --token"):
        resolve_token("0.0.0.0", "given-token", no_token=True, env={})
    with pytest.raises(ValueError, match="^--token: use at least 8"):
        resolve_token("0.0.0.0", "short", env={})
    with pytest.raises(ValueError, match="^EXPLICAM_TOKEN: use at least 8"):
        resolve_token("0.0.0.0", env={"EXPLICAM_TOKEN": "has space"})
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("::")
    assert not is_loopback("192.168.1.20") and not is_loopback("no-such-host.invalid")


def test_both_paths_need_the_token_and_the_page_passes_it_on():
    server = MjpegServer(0, options=ServeOptions(token=TOKEN))
    pump = Pump(server)
    try:
        for path in ("/", "/stream"):
            for query, headers in (("", {}), ("?token=wrong-token-0123456789", {}), ("?token=", {}),
                                   ("", {"Authorization": "Bearer wrong"}), ("?token=" + TOKEN[:-1], {})):
                status, head, body = get(server.port, path + query, headers)
                assert status == 401, (path, query, headers)
                assert head["www-authenticate"].startswith("Bearer")
                assert TOKEN.encode() not in body and TOKEN not in str(head)  # says how, never what
        status, head, page = get(server.port, "/?token=" + TOKEN)
        assert status == 200 and head["cache-control"] == "no-store" and head["referrer-policy"] == "no-referrer"
        stream_src = re.search(r'<img id="stream" src="([^"]+)"', page.decode()).group(1)
        assert stream_src == "/stream?token=" + TOKEN
        status, head, body = get(server.port, stream_src)
        assert status == 200 and head["content-type"] == "multipart/x-mixed-replace; boundary=explicamframe"
        assert body.startswith(b"--explicamframe\r\nContent-Type: image/jpeg")
        status, _, page = get(server.port, "/", {"Authorization": "Bearer " + TOKEN})  # scripts: the header
        assert status == 200 and b"/stream?token=" + TOKEN.encode() in page
        assert get(server.port, "/stream", {"Authorization": "Bearer " + TOKEN})[0] == 200
        assert get(server.port, "/favicon.ico?token=" + TOKEN)[0] == 404
    finally:
        pump.close()


def test_the_compare_is_constant_time(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((len(a), len(b)))
        return a == b
    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    rules = Access(TOKEN)
    assert rules.allowed("token=" + TOKEN, {}) and not rules.allowed("token=x", {}) and not rules.allowed("", {})
    assert not rules.allowed("token=" + TOKEN + "-and-more", {})
    # every check, right, short, missing or long, went through compare_digest on equal-length digests
    assert calls == [(32, 32)] * 4


def test_https(tmp_path):
    cert, key = self_signed(tmp_path)
    options = ServeOptions(token=TOKEN, tls=access.tls_context(cert, key), request_timeout=1.0)
    server = MjpegServer(0, options=options)
    pump = Pump(server)
    try:
        assert server.url == f"https://127.0.0.1:{server.port}/?token={TOKEN}"
        client = ssl.create_default_context(cafile=cert)  # verifies the certificate and the address
        assert get(server.port, "/stream", context=client)[0] == 401
        status, _, body = get(server.port, "/stream?token=" + TOKEN, context=client)
        assert status == 200 and body.startswith(b"--explicamframe")
        plain = socket.create_connection(("127.0.0.1", server.port), timeout=5)  # plain HTTP gets no frames
        plain.sendall(b"GET /stream?token=" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert b"explicamframe" not in plain.recv(1000)
        except OSError:
            pass  # reset by the server: also no frames
        plain.close()
    finally:
        pump.close()
    with pytest.raises(ValueError, match="^--keyfile: needs --certfile"):
        access.tls_context(None, key)
    with pytest.raises(ValueError, match="^--certfile .*nothere.pem: no such file"):
        access.tls_context(str(tmp_path / "nothere.pem"), None)
    with pytest.raises(ValueError, match="^--certfile: cannot load"):
        access.tls_context(cert, None)  # the key is elsewhere


def finish(proc):
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    return stdout, stderr


def test_cli_on_the_network_makes_a_token_prints_it_once_and_requires_it(tmp_path, onnx_model):
    from tests.test_video import write_clip

    clip = write_clip(tmp_path / "long.avi", 100)
    env = {k: v for k, v in os.environ.items() if k != "EXPLICAM_TOKEN"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "explain", "--video", str(clip), "--serve", "0",
                             "--host", "0.0.0.0", "--realtime", "--model", str(onnx_model)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()
    try:
        m = re.search(r"live view: http://[^:/]+:(\d+)/\?token=([\w-]{22})\s", line)
        assert m, line
        port, token = int(m.group(1)), m.group(2)
        assert get(port, "/")[0] == 401 and get(port, "/stream")[0] == 401
        assert get(port, "/stream?token=" + token)[0] == 200
    finally:
        stdout, stderr = finish(proc)
    assert (line + stderr + stdout).count(token) == 1  # printed once, nowhere else


def test_cli_token_from_the_environment_and_no_token_warning(tmp_path, onnx_model):
    from tests.test_video import write_clip

    clip = write_clip(tmp_path / "long.avi", 100)
    base = [sys.executable, str(ROOT / "cli.py"), "explain", "--video", str(clip), "--serve", "0", "--realtime",
            "--model", str(onnx_model)]
    proc = subprocess.Popen(base, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EXPLICAM_TOKEN": "env-token-abcdef"})
    line = proc.stderr.readline()
    try:  # loopback, but a token is given (through the environment): it is required
        port = int(re.search(r"live view: http://127\.0\.0\.1:(\d+)/\?token=env-token-abcdef\s", line).group(1))
        assert get(port, "/stream")[0] == 401 and get(port, "/stream?token=env-token-abcdef")[0] == 200
    finally:
        finish(proc)
    proc = subprocess.Popen(base + ["--host", "0.0.0.0", "--no-token"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = [proc.stderr.readline(), proc.stderr.readline()]
    try:
        port = int(re.search(r"live view: http://[^:/]+:(\d+)/\s", lines[0]).group(1))
        assert "?token" not in lines[0]
        assert lines[1].startswith("warning: --no-token:") and "open to anyone who can reach this port" in lines[1]
        assert get(port, "/stream")[0] == 200
    finally:
        finish(proc)


def test_bad_serve_options_are_one_line_errors_naming_the_option(tmp_path):
    from tests.test_video import write_clip

    clip = write_clip(tmp_path / "clip.avi", 5)
    cert, key = self_signed(tmp_path)
    cases = [
        (["--serve", "0", "--keyfile", key], "--keyfile: needs --certfile"),
        (["--serve", "0", "--certfile", tmp_path / "none.pem"], "--certfile"),
        (["--serve", "0", "--certfile", cert], "--certfile: cannot load"),
        (["--serve", "0", "--token", "short"], "--token: use at least 8"),
        (["--serve", "0", "--token", "long-enough-token", "--no-token"], "--no-token: cannot be combined"),
        (["--serve", "0", "--max-clients", "0"], "--max-clients: must be at least 1"),
        (["--token", "long-enough-token"], "--token: only with --serve"),
        (["--reconnect"], "--reconnect: "),
        (["--max-retries", "3"], "--max-retries: only with --reconnect"),
    ]
    for args, expected in cases:
        # a model that does not exist: every one of these must be refused before it is looked for
        res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "explain", "--video", str(clip), "--model",
                              str(tmp_path / "no-model.onnx"), *map(str, args)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 1 and expected in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "explain", str(tmp_path), "--token",
                          "long-enough-token"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "--token: only for video" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
