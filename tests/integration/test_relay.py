"""The relay over raw sockets: what the upstream receives and what the client gets back."""

from __future__ import annotations

import gzip
import json
import os
import socket
import threading
from collections.abc import Callable

import pytest

from ..helpers import (
    CLIENT_KEY,
    CLOSE,
    RESET,
    UPSTREAM_KEY,
    ProxyHandle,
    RawUpstream,
    Recorded,
    exchange,
    ok_response,
    raw_connect,
    read_response,
    read_responses,
    request_bytes,
)

AUTH = [("Host", "proxy.local"), ("x-api-key", CLIENT_KEY)]


def post(port: int, target: str, body: bytes = b"{}", headers=AUTH, **kw) -> object:
    return exchange(port, request_bytes("POST", target, headers, body, **kw))


def test_forwards_method_target_headers_and_body(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    headers = [
        ("Host", "proxy.local"),
        ("anthropic-beta", "fine-grained-tool-streaming-2025-05-14,interleaved-thinking"),
        ("anthropic-version", "2023-06-01"),
        ("X-Unknown-Thing", "kept"),
        ("x-api-key", CLIENT_KEY),
        ("accept-encoding", "gzip, deflate, br, zstd"),
    ]
    body = json.dumps({"model": "m", "n": 1e3, "metadata": {"user_id": "u"}}).encode()
    resp = post(proxy.port, "/anthropic/v1/messages?beta=true&x=%2F%2e", body, headers)
    assert resp.status == 200 and resp.body == b"ok"
    (rec,) = upstream.requests
    assert rec.method == b"POST"
    assert rec.target == b"/anthropic/v1/messages?beta=true&x=%2F%2e"
    assert rec.body == body
    assert rec.headers == [
        (b"Host", f"127.0.0.1:{upstream.port}".encode()),
        (b"anthropic-beta", b"fine-grained-tool-streaming-2025-05-14,interleaved-thinking"),
        (b"anthropic-version", b"2023-06-01"),
        (b"X-Unknown-Thing", b"kept"),
        (b"x-api-key", UPSTREAM_KEY.encode()),
        (b"accept-encoding", b"gzip, deflate, br, zstd"),
        (b"Content-Length", str(len(body)).encode()),
    ]


def test_path_prefix_of_upstream_url(upstream: RawUpstream, make_proxy) -> None:
    p = make_proxy(upstream.url + "/base/")
    post(p.port, "/v1/x?q=1")
    assert upstream.requests[0].target == b"/base/v1/x?q=1"


def test_response_relayed_without_additions(
    make_upstream: Callable[..., RawUpstream], make_proxy
) -> None:
    body = gzip.compress(b'{"hello": "world"}' * 100)
    raw_head = (
        b"HTTP/1.1 201 Created Here\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\nx-ms-region: swedencentral\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    up = make_upstream(lambda r: [raw_head + body])
    p = make_proxy(up.url)
    resp = post(p.port, "/x")
    assert resp.status == 201 and resp.reason == b"Created Here"
    assert resp.body == body  # still compressed, byte for byte
    assert resp.headers == [
        (b"Content-Type", b"application/json"),
        (b"Content-Encoding", b"gzip"),
        (b"x-ms-region", b"swedencentral"),
        (b"Content-Length", str(len(body)).encode()),
    ]


def test_chunked_request_stays_chunked(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    body = os.urandom(5000)
    resp = post(proxy.port, "/x", body, chunked=True)
    assert resp.status == 200
    rec = upstream.requests[0]
    assert rec.chunked and rec.body == body
    assert rec.header("content-length") is None


def test_chunked_response_stays_chunked(make_upstream, make_proxy) -> None:
    parts = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    parts += [b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\nx-trailer: t\r\n\r\n"]
    up = make_upstream(lambda r: parts)
    p = make_proxy(up.url)
    resp = post(p.port, "/x")
    assert resp.complete and resp.body == b"hello world"
    assert resp.header("transfer-encoding") == b"chunked"
    assert b"x-trailer: t\r\n\r\n" in resp.raw


def test_keep_alive_and_pooling(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    with raw_connect(proxy.port) as sock:
        for i in range(5):
            sock.sendall(request_bytes("POST", f"/r{i}", AUTH, b"{}"))
            assert read_response(sock).status == 200
    assert [r.target for r in upstream.requests] == [f"/r{i}".encode() for i in range(5)]
    assert upstream.connections == 1


def test_pipelined_requests_answered_in_order(make_upstream, make_proxy) -> None:
    def handler(rec: Recorded) -> list[object]:
        # the first answer is slow, so a wrong order would show
        delay = 0.05 if rec.target == b"/a" else 0.0
        return [delay, ok_response(rec.target)]

    up = make_upstream(handler)
    p = make_proxy(up.url)
    with raw_connect(p.port) as sock:
        sock.sendall(b"".join(request_bytes("POST", t, AUTH, b"{}") for t in ("/a", "/b", "/c")))
        bodies = [r.body for r in read_responses(sock, 3)]
    assert bodies == [b"/a", b"/b", b"/c"]


def test_head_request(make_upstream, make_proxy) -> None:
    def handler(rec: Recorded) -> list[object]:
        if rec.method == b"HEAD":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"]
        return [ok_response()]

    up = make_upstream(handler)
    p = make_proxy(up.url)
    with raw_connect(p.port) as sock:
        sock.sendall(b"HEAD /anthropic HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = read_response(sock, head=True)
        assert resp.status == 200 and resp.header("content-length") == b"1234"
        # the connection is still usable and no body bytes were invented
        sock.sendall(request_bytes("POST", "/after", AUTH, b"{}"))
        assert read_response(sock).status == 200


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(make_upstream, make_proxy, status: int) -> None:
    up = make_upstream(
        lambda r: (
            [b"HTTP/1.1 %d X\r\nETag: e\r\n\r\n" % status] if r.target == b"/x" else [ok_response()]
        )
    )
    p = make_proxy(up.url)
    with raw_connect(p.port) as sock:
        sock.sendall(request_bytes("GET", "/x", AUTH))
        resp = read_response(sock)
        assert resp.status == status and resp.body == b""
        sock.sendall(request_bytes("GET", "/y", AUTH))
        assert read_response(sock).status == 200


def test_interim_103_is_relayed(make_upstream, make_proxy) -> None:
    up = make_upstream(
        lambda r: [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", ok_response(b"final")]
    )
    p = make_proxy(up.url)
    resp = post(p.port, "/x")
    assert resp.raw.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    assert resp.status == 200 and resp.body == b"final"


def test_expect_100_continue(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    body = b'{"big": true}'
    with raw_connect(proxy.port) as sock:
        head = request_bytes("POST", "/x", [*AUTH, ("Expect", "100-continue")], body)
        sock.sendall(head[: -len(body)])
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        resp = read_response(sock)
    assert resp.status == 200
    assert upstream.requests[0].body == body
    assert upstream.requests[0].header("expect") is None


def test_expect_100_with_wrong_key_gets_401_without_continue(
    upstream: RawUpstream, proxy: ProxyHandle
) -> None:
    with raw_connect(proxy.port) as sock:
        sock.sendall(
            b"POST /x HTTP/1.1\r\nHost: p\r\nx-api-key: wrong\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10\r\n\r\n"
        )
        resp = read_response(sock)
    assert resp.status == 401
    assert not resp.raw.startswith(b"HTTP/1.1 100")
    assert upstream.requests == []


def test_upstream_refused_gives_502(make_proxy) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    p = make_proxy(f"http://127.0.0.1:{port}")
    resp = post(p.port, "/openai/v1/chat/completions")
    assert resp.status == 502
    assert resp.json()["error"]["message"].startswith("Could not connect to the upstream")


def test_connect_timeout_gives_504(make_proxy, lt) -> None:
    # A TCP server that never answers the TLS handshake: connecting never completes.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        p = make_proxy(f"https://127.0.0.1:{silent.getsockname()[1]}", connect_timeout=0.3)
        resp = post(p.port, "/anthropic/v1/messages")
        assert resp.status == 504
        assert resp.json() == {
            "type": "error",
            "error": {
                "type": "api_error",
                "message": "Timed out connecting to the upstream after 0.3 s.",
            },
        }
    finally:
        silent.close()


def test_upstream_dies_mid_response_aborts_client(make_upstream, make_proxy) -> None:
    up = make_upstream(lambda r: [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", RESET])
    p = make_proxy(up.url)
    resp = post(p.port, "/x")
    assert resp.status == 200 and not resp.complete


def test_upstream_dies_mid_chunked_aborts_client(make_upstream, make_proxy) -> None:
    parts = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", CLOSE]
    up = make_upstream(lambda r: parts)
    p = make_proxy(up.url)
    resp = post(p.port, "/x")
    assert resp.body == b"hello" and not resp.complete
    assert not resp.raw.endswith(b"0\r\n\r\n")


def test_close_delimited_response_is_relayed_then_closed(make_upstream, make_proxy) -> None:
    up = make_upstream(lambda r: [b"HTTP/1.1 200 OK\r\n\r\nall of it", CLOSE])
    p = make_proxy(up.url)
    with raw_connect(p.port) as sock:
        sock.sendall(request_bytes("POST", "/x", AUTH, b"{}"))
        resp = read_response(sock)
        assert resp.body == b"all of it"
        assert resp.header("connection") == b"close"
        assert sock.recv(10) == b""


def test_upstream_closes_before_response_gives_502(make_upstream, make_proxy) -> None:
    up = make_upstream(lambda r: [CLOSE])
    p = make_proxy(up.url)
    resp = post(p.port, "/x")
    assert resp.status == 502


def test_malformed_upstream_response_gives_502(make_upstream, make_proxy) -> None:
    up = make_upstream(lambda r: [b"HTTP/1.1 2000 What\r\n\r\n"])
    p = make_proxy(up.url)
    assert post(p.port, "/x").status == 502


def test_pooled_connection_closed_by_upstream_is_not_an_error(make_upstream, make_proxy) -> None:
    # The upstream answers keep-alive, then closes the idle connection (as Azure's front
    # ends do after a few minutes); the next request must not notice.
    closed = threading.Event()

    def handler(rec: Recorded) -> list[object]:
        return [ok_response(rec.target), CLOSE] if rec.target == b"/first" else [ok_response()]

    up = make_upstream(handler)
    p = make_proxy(up.url)
    assert post(p.port, "/first").body == b"/first"
    up.wait_for(lambda: len(up.closed_at) >= 1)
    closed.set()
    assert post(p.port, "/second").status == 200
    assert up.connections == 2


def test_client_disconnect_closes_upstream(make_upstream, make_proxy) -> None:
    release = threading.Event()
    up = make_upstream(
        lambda r: [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n", release]
    )
    p = make_proxy(up.url)
    sock = raw_connect(p.port)
    sock.sendall(request_bytes("POST", "/stream", AUTH, b"{}"))
    got = b""
    while b"1\r\na\r\n" not in got:
        got += sock.recv(1000)
    sock.close()
    up.wait_for(lambda: len(up.closed_at) == 1, timeout=2)
    release.set()


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET http://evil.example/ HTTP/1.1",
        b"POST https://evil.example/v1/messages HTTP/1.1",
        b"CONNECT evil.example:443 HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
    ],
)
def test_forward_proxy_requests_are_refused(
    upstream: RawUpstream, proxy: ProxyHandle, request_line: bytes
) -> None:
    resp = exchange(proxy.port, request_line + b"\r\nHost: evil.example\r\n\r\n")
    assert resp.status == 400
    assert upstream.requests == [] and upstream.connections == 0


def test_host_header_never_steers(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    post(proxy.port, "/x", headers=[("Host", "evil.example"), ("x-api-key", CLIENT_KEY)])
    assert upstream.requests[0].header("host") == f"127.0.0.1:{upstream.port}".encode()


def test_malformed_request_gets_400_and_close(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    data = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    with raw_connect(proxy.port) as sock:
        sock.sendall(data)
        resp = read_response(sock)
        assert resp.status == 400 and resp.header("connection") == b"close"
        assert sock.recv(10) == b""
    assert upstream.requests == []


def test_https_upstream_verified_with_sni(lt, make_proxy) -> None:
    """Foundry is HTTPS: the proxy verifies the upstream's certificate (system trust,
    SSL_CERT_FILE) and keeps the connection pooled."""
    import ssl

    from ..conftest import SESSION_CA

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    SESSION_CA.issue_cert("localhost").configure_cert(context)
    seen_sni: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: seen_sni.append(name)  # type: ignore[assignment]
    up = RawUpstream()
    lt.run(up.start(ssl_context=context))
    try:
        p = make_proxy(f"https://localhost:{up.port}/base")
        for _ in range(3):
            assert post(p.port, "/v1/messages").status == 200
        assert up.connections == 1 and seen_sni == ["localhost"]
        assert up.requests[0].header("host") == f"localhost:{up.port}".encode()
        assert up.requests[0].target == b"/base/v1/messages"
        # a certificate for another name is refused: 502, nothing sent
        wrong = make_proxy(f"https://127.0.0.1:{up.port}")
        resp = post(wrong.port, "/v1/messages")
        assert resp.status == 502 and len(up.requests) == 3
        assert "certificate verify failed" in resp.json()["error"]["message"]
    finally:
        lt.run(up.stop())
