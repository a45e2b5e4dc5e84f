"""Who may watch the live view: the token, TLS, and the checks made on each request.

A board serving its camera on the network is a camera anyone on that network can open,
so a bind to anything but loopback gets a random token (128 bits from `secrets`) unless
one is given (`--token`, `$EXPLICAM_TOKEN`) or refused outright (`--no-token`, with a
warning). Loopback keeps serving without one, as before, unless a token is given.

The token is accepted three ways:
  * `?token=...` in the URL: what the printed URL carries and what a browser can open;
  * `Authorization: Bearer ...`: for scripts (`curl -H`), keeps it out of access logs;
  * the page passes it on to `/stream` in the <img> URL it serves, since an <img> cannot
    send a header.
No cookie: a browser sends a cookie to every port of the host, so the token would reach
whatever else the board serves.

Comparison: both sides are hashed with SHA-256 and the digests compared with
hmac.compare_digest, so a wrong token takes the same time as the right one, whatever its
length or how many leading characters it shares.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, quote

ENV_TOKEN = "EXPLICAM_TOKEN"
MIN_TOKEN_CHARS = 8


def is_loopback(host: str) -> bool:
    """True when `host` only listens on this machine (127.x, ::1, localhost)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:  # "" binds every interface
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # unresolvable: the bind will fail and say so; never assume loopback
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def resolve_token(host: str, token: str | None = None, no_token: bool = False, env=None) -> str | None:
    """The token the server will require, or None for an open server.

    Raises ValueError naming the option for contradictory or unusable input."""
    env = os.environ if env is None else env
    if no_token and token is not None:
        raise ValueError("--no-token: cannot be combined with --token")
    if no_token:
        return None
    source = "--token"
    if token is None and env.get(ENV_TOKEN):
        token, source = env[ENV_TOKEN], ENV_TOKEN
    if token is not None:
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
            raise ValueError(f"{source}: use at least {MIN_TOKEN_CHARS} printable characters without spaces "
                             "(or leave it out for a random one)")
        return token
    if is_loopback(host):
        return None  # this machine only: no token, as before
    return secrets.token_urlsafe(16)


def tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """A server-side TLS context from PEM files, or None when no --certfile is given."""
    if keyfile and not certfile:
        raise ValueError("--keyfile: needs --certfile (the certificate the key belongs to)")
    if not certfile:
        return None
    for option, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{option} {path}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2+, the library's safe defaults
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        what = "--certfile/--keyfile" if keyfile else "--certfile"
        raise ValueError(f"{what}: cannot load the certificate and key ({getattr(exc, 'reason', None) or exc}); "
                         "give a PEM certificate and its private key (--keyfile when they are separate)") from None
    return context


@dataclass
class Access:
    """The server's rules for one request: is it allowed?"""
    token: str | None = None       # None: anyone who can connect may watch
    loopback: bool = False         # the bind only reaches this machine

    def __post_init__(self):
        self._digest = hashlib.sha256(self.token.encode()).digest() if self.token is not None else None

    def allowed(self, query: str, headers: dict) -> bool:
        if self._digest is None:
            return True
        given = parse_qs(query).get("token", [None])[0]
        auth = headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        # always hash and compare, even with nothing given: the same work either way
        digest = hashlib.sha256((given or "").encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(digest, self._digest) and given is not None

    def query(self) -> str:
        """What the page appends to its stream URL (empty without a token)."""
        return "" if self.token is None else "?token=" + quote(self.token, safe="")
