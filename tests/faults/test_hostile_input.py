"""Hostile and malformed requests over raw sockets: refused, connection closed, nothing upstream."""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers import (
    CLIENT_KEY,
    ProxyHandle,
    RawUpstream,
    exchange,
    raw_connect,
    read_response,
    request_bytes,
)

KEY_LINE = b"x-api-key: " + CLIENT_KEY.encode() + b"\r\n"

SMUGGLING = {
    "cl-and-te": b"POST /x HTTP/1.1\r\nHost: h\r\n"
    + KEY_LINE
    + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    + b"GET /smuggled HTTP/1.1\r\n\r\n",
    "te-and-cl": b"POST /x HTTP/1.1\r\nHost: h\r\n"
    + KEY_LINE
    + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "two-content-lengths": b"POST /x HTTP/1.1\r\nHost: h\r\n"
    + KEY_LINE
    + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "content-length-list": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"Content-Length: 5, 5\r\n\r\nhello",
    "content-length-sign": b"POST /x HTTP/1.1\r\n" + KEY_LINE + b"Content-Length: +5\r\n\r\nhello",
    "te-chunked-identity": b"POST /x HTTP/1.1\r\nHost: h\r\n"
    + KEY_LINE
    + b"Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te-identity": b"POST /x HTTP/1.1\r\n" + KEY_LINE + b"Transfer-Encoding: identity\r\n\r\nhello",
    "te-obfuscated": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"Transfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te-in-folded-line": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"X-A: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
    "bad-chunk-size": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "bad-chunk-extension": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"Transfer-Encoding: chunked\r\n\r\n5;\x01x\r\nhello\r\n0\r\n\r\n",
    "chunk-missing-crlf": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    "bare-lf-headers": b"POST /x HTTP/1.1\nHost: h\n" + KEY_LINE + b"Content-Length: 0\n\n",
    "bare-cr": b"POST /x HTTP/1.1\rHost: h\r\n" + KEY_LINE + b"Content-Length: 0\r\n\r\n",
    "obs-fold": b"POST /x HTTP/1.1\r\nHost: h\r\n"
    + KEY_LINE
    + b"X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "nul-in-header": b"POST /x HTTP/1.1\r\nHost: h\r\n"
    + KEY_LINE
    + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "control-in-header": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"X-A: a\x07b\r\nContent-Length: 0\r\n\r\n",
    "space-in-header-name": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"X A: b\r\nContent-Length: 0\r\n\r\n",
    "invalid-method": b"P\x00ST /x HTTP/1.1\r\n" + KEY_LINE + b"\r\n",
    "lowercase-method": b"post /x HTTP/1.1\r\n" + KEY_LINE + b"Content-Length: 0\r\n\r\n",
    "bad-version": b"POST /x HTTP/9.9\r\n" + KEY_LINE + b"Content-Length: 0\r\n\r\n",
    "space-in-target": b"POST /x y HTTP/1.1\r\n" + KEY_LINE + b"Content-Length: 0\r\n\r\n",
    "absolute-form": b"POST http://attacker.example/v1/messages HTTP/1.1\r\nHost: h\r\n"
    + KEY_LINE
    + b"Content-Length: 0\r\n\r\n",
    "absolute-form-https": b"GET https://127.0.0.1:1/ HTTP/1.1\r\n" + KEY_LINE + b"\r\n",
    "authority-form": b"CONNECT attacker.example:443 HTTP/1.1\r\nHost: attacker.example\r\n\r\n",
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    "at-sign-target": b"GET @attacker.example/ HTTP/1.1\r\n" + KEY_LINE + b"\r\n",
    "upgrade-with-body": b"POST / HTTP/1.1\r\n"
    + KEY_LINE
    + b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
    "expect-other": b"POST /x HTTP/1.1\r\n"
    + KEY_LINE
    + b"Expect: 200-ok\r\nContent-Length: 0\r\n\r\n",
}


# Bodies whose framing breaks after a valid head: the head was fine, so the exchange had begun.
BODY_LEVEL = {"chunk-size-overflow", "bad-chunk-extension", "chunk-missing-crlf"}


@pytest.mark.parametrize("warm", [False, True], ids=["cold-pool", "warm-pool"])
@pytest.mark.parametrize("raw", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_refused_closed_and_never_forwarded(
    upstream: RawUpstream, proxy: ProxyHandle, raw: bytes, warm: bool
) -> None:
    name = next(k for k, v in SMUGGLING.items() if v == raw)
    if warm:  # a pooled upstream connection is ready: the request would go out at once
        exchange(proxy.port, request_bytes("POST", "/warm", [("x-api-key", CLIENT_KEY)], b"{}"))
        upstream.wait_for(lambda: len(upstream.requests) == 1)
    before = upstream.raw
    with raw_connect(proxy.port) as sock:
        sock.sendall(raw)
        resp = read_response(sock)
        assert resp.status == 400, resp.raw[:200]
        assert resp.header("connection") == b"close"
        assert sock.recv(100) == b""  # closed: nothing after it is read as a request
    if warm or name not in BODY_LEVEL:
        # not a byte: what the request had batched for the upstream was dropped
        assert upstream.raw == before
        assert upstream.connections == (1 if warm else 0)
    else:
        # the head went ahead while the body was still arriving; it never completes
        assert all(not r.complete for r in upstream.requests)
        upstream.wait_for(lambda: len(upstream.closed_at) == upstream.connections)
    # the proxy is unharmed
    ok = exchange(proxy.port, request_bytes("POST", "/after", [("x-api-key", CLIENT_KEY)], b"{}"))
    assert ok.status == 200


@pytest.mark.parametrize(
    "target",
    [
        b"/../../etc/passwd",
        b"/anthropic/%2e%2e/%2e%2e/x",
        b"/a%2Fb%2f..%2fc",
        b"//attacker.example/x",
        b"/x?next=http://attacker.example/",
        b"/%00",
        b"/x#frag",
    ],
)
def test_paths_never_change_the_upstream_host(
    upstream: RawUpstream, proxy: ProxyHandle, target: bytes
) -> None:
    raw = (
        b"POST "
        + target
        + b" HTTP/1.1\r\nHost: attacker.example\r\n"
        + KEY_LINE
        + b"X-Forwarded-Host: attacker.example\r\nContent-Length: 0\r\n\r\n"
    )
    resp = exchange(proxy.port, raw)
    assert resp.status == 200
    (rec,) = upstream.requests
    assert rec.target == target  # passed through verbatim, not normalised
    assert rec.headers_named("host") == [f"127.0.0.1:{upstream.port}".encode()]


@pytest.mark.parametrize("upgrade", [b"h2c", b"websocket"])
def test_upgrade_is_ignored_and_served_as_http11(
    upstream: RawUpstream, proxy: ProxyHandle, upgrade: bytes
) -> None:
    raw = (
        b"GET /v1/models HTTP/1.1\r\nHost: h\r\n"
        + KEY_LINE
        + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: "
        + upgrade
        + b"\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    with raw_connect(proxy.port) as sock:
        sock.sendall(raw + b"GET /ignored HTTP/1.1\r\n\r\n")
        resp = read_response(sock)
        assert resp.status == 200 and resp.header("connection") == b"close"
        assert sock.recv(100) == b""
    (rec,) = upstream.requests
    assert rec.header("upgrade") is None and rec.header("connection") is None
    assert rec.header("http2-settings") is None  # listed in Connection: hop-by-hop


def test_long_request_line_gets_414(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    resp = exchange(proxy.port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert resp.status == 414 and resp.header("connection") == b"close"
    assert upstream.connections == 0


def test_large_headers_get_431(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))
    resp = exchange(proxy.port, raw + b"\r\n")
    assert resp.status == 431
    assert upstream.connections == 0


def test_too_many_headers_get_431(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200))
    resp = exchange(proxy.port, raw + b"\r\n")
    assert resp.status == 431
    assert upstream.connections == 0


def test_slowloris_is_cut_off(upstream: RawUpstream, make_proxy) -> None:
    proxy = make_proxy(upstream.url, header_timeout=0.6)
    with raw_connect(proxy.port) as sock:
        started = time.monotonic()
        closed = False
        for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.1)
                if sock.recv(10) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
        assert closed
        assert time.monotonic() - started < 3
    assert proxy.server.state is not None
    from ..helpers import wait_until

    wait_until(lambda: len(proxy.server.state.connections) == 0)  # type: ignore[union-attr]
    assert upstream.connections == 0


def test_idle_connection_without_request_is_closed(make_proxy, upstream: RawUpstream) -> None:
    proxy = make_proxy(upstream.url, keepalive_timeout=0.3)
    with raw_connect(proxy.port) as sock:
        sock.settimeout(3)
        assert sock.recv(10) == b""


# ----------------------------------------------------------------- fuzzing


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    garbage=st.one_of(
        st.binary(min_size=1, max_size=300),
        st.builds(
            lambda m, t, h: m + b" " + t + b" HTTP/1.1\r\n" + h + b"\r\n\r\n",
            st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"PATCH"]),
            st.binary(min_size=1, max_size=40),
            st.binary(max_size=200),
        ),
    )
)
def test_fuzzed_request_heads_never_break_the_proxy(
    upstream: RawUpstream, proxy: ProxyHandle, garbage: bytes
) -> None:
    with raw_connect(proxy.port, timeout=5) as sock:
        try:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
    # any request that reached the upstream carried no forward-proxy target
    for rec in upstream.requests:
        assert rec.target.startswith(b"/")
        assert rec.headers_named("host") == [f"127.0.0.1:{upstream.port}".encode()]
    upstream.reset()
    ok = exchange(proxy.port, request_bytes("POST", "/ok", [("x-api-key", CLIENT_KEY)], b"{}"))
    assert ok.status == 200
