"""Upstream faults and clients that vanish: clear errors, honest aborts, nothing left behind."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from ..helpers import (
    CLIENT_KEY,
    CLOSE,
    RESET,
    ProxyHandle,
    RawUpstream,
    exchange,
    ok_response,
    raw_connect,
    read_response,
    request_bytes,
    wait_until,
)

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def post(port: int, body: bytes = b"{}", target: str = "/anthropic/v1/messages"):
    return exchange(
        port, request_bytes("POST", target, [("x-api-key", CLIENT_KEY)], body), timeout=10
    )


def assert_clean(proxy: ProxyHandle) -> None:
    """No connection, exchange or task of the proxy outlives the requests."""
    state = proxy.server.state
    assert state is not None
    wait_until(lambda: not state.connections and not state.tasks)


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ([CLOSE], 502),  # closes before a response
        ([RESET], 502),  # resets before a response
        ([b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n"], 502),  # malformed head
        ([b"garbage\r\n\r\n"], 502),
        ([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"], 502),
    ],
    ids=["close", "reset", "bad-length", "garbage", "unasked-upgrade"],
)
def test_failure_before_response(make_upstream, make_proxy, script: list, status: int) -> None:
    up = make_upstream(lambda r: script)
    proxy = make_proxy(up.url)
    resp = post(proxy.port)
    assert resp.status == status and resp.complete
    assert resp.json()["type"] == "error"  # Anthropic route: Anthropic's error shape
    assert_clean(proxy)


@pytest.mark.parametrize(
    "script",
    [
        [HEAD + b"partial", RESET],
        [HEAD + b"partial", CLOSE],
        [CHUNKED + b"5\r\nhello\r\n", RESET],
        [CHUNKED + b"5\r\nhello\r\n", CLOSE],
        [CHUNKED + b"5\r\nhello\r\nzz\r\n"],  # malformed chunk mid-body
    ],
    ids=["sized-reset", "sized-close", "chunked-reset", "chunked-close", "chunked-malformed"],
)
def test_failure_mid_response_aborts_client(make_upstream, make_proxy, script: list) -> None:
    up = make_upstream(lambda r: script)
    proxy = make_proxy(up.url)
    resp = post(proxy.port)
    assert resp.status == 200
    assert not resp.complete  # the client can tell: never a response that looks whole
    assert_clean(proxy)


def test_stall_before_headers_gives_504(make_upstream, make_proxy) -> None:
    hold = threading.Event()
    up = make_upstream(lambda r: [hold])
    proxy = make_proxy(up.url, idle_timeout=0.4)
    started = time.monotonic()
    resp = post(proxy.port, target="/openai/v1/chat/completions")
    assert resp.status == 504 and time.monotonic() - started < 3
    assert resp.json()["error"]["code"] == "upstream_timeout"
    hold.set()
    assert_clean(proxy)


def test_stall_mid_body_aborts(make_upstream, make_proxy) -> None:
    hold = threading.Event()
    up = make_upstream(lambda r: [CHUNKED + b"5\r\nhello\r\n", hold])
    proxy = make_proxy(up.url, idle_timeout=0.4)
    resp = post(proxy.port)
    assert resp.body == b"hello" and not resp.complete
    hold.set()
    assert_clean(proxy)


def test_slow_stream_that_keeps_moving_is_not_cut(make_upstream, make_proxy) -> None:
    # idle_timeout is between bytes, not a total: a 2 s stream under a 0.5 s idle timeout
    events = [CHUNKED] + [x for i in range(10) for x in (0.2, b"5\r\nevent\r\n")] + [b"0\r\n\r\n"]
    up = make_upstream(lambda r: events)
    proxy = make_proxy(up.url, idle_timeout=0.5)
    resp = post(proxy.port)
    assert resp.complete and resp.body == b"event" * 10


def test_response_before_request_body_is_done(make_upstream, make_proxy) -> None:
    # the upstream answers (say 413) before reading the whole upload: relayed, and the
    # connection to it is not reused with a half-sent request on it
    up = make_upstream(
        lambda r: [b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n"], respond_after_body=False
    )
    proxy = make_proxy(up.url)
    body = b"x" * 3_000_000
    with raw_connect(proxy.port) as sock:
        sock.sendall(request_bytes("POST", "/x", [("x-api-key", CLIENT_KEY)], body))
        resp = read_response(sock)
        assert resp.status == 413
        sock.sendall(request_bytes("POST", "/next", [("x-api-key", CLIENT_KEY)], b"{}"))
        assert read_response(sock).status == 413
    # reused only if the upload had all gone out before the answer came (a race)
    assert up.connections == 2 or up.requests[0].complete


def upstream_closed_after(up: RawUpstream, close_client: Callable[[], None]) -> float:
    """Seconds between the client going away and the upstream connection closing."""
    before = len(up.closed_at)
    gone = time.monotonic()
    close_client()
    up.wait_for(lambda: len(up.closed_at) > before, timeout=2)
    return up.closed_at[-1] - gone


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_gone_mid_stream_closes_upstream_fast(make_upstream, make_proxy, how) -> None:
    hold = threading.Event()
    up = make_upstream(lambda r: [CHUNKED + b"5\r\nhello\r\n", hold])
    proxy = make_proxy(up.url)
    sock = raw_connect(proxy.port)
    sock.sendall(request_bytes("POST", "/v1/messages", [("x-api-key", CLIENT_KEY)], b"{}"))
    got = b""
    while b"hello" not in got:
        got += sock.recv(1000)

    def vanish() -> None:
        if how == "reset":
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        sock.close()

    assert upstream_closed_after(up, vanish) < 0.1
    hold.set()
    assert_clean(proxy)


def test_client_gone_mid_upload_closes_upstream_fast(make_upstream, make_proxy) -> None:
    up = make_upstream(lambda r: [ok_response()])
    proxy = make_proxy(up.url)
    sock = raw_connect(proxy.port)
    head = (
        b"POST /x HTTP/1.1\r\nHost: p\r\nx-api-key: "
        + CLIENT_KEY.encode()
        + b"\r\nContent-Length: 10000000\r\n\r\n"
    )
    sock.sendall(head + b"a" * 200_000)
    up.wait_for(lambda: len(up.requests) == 1 and len(up.requests[0].body) >= 100_000)
    assert upstream_closed_after(up, sock.close) < 0.1
    assert not up.requests[0].complete
    assert_clean(proxy)


def test_client_gone_while_connecting_cancels(make_proxy) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        proxy = make_proxy(f"https://127.0.0.1:{silent.getsockname()[1]}", connect_timeout=5)
        sock = raw_connect(proxy.port)
        sock.sendall(request_bytes("POST", "/x", [("x-api-key", CLIENT_KEY)], b"{}"))
        state = proxy.server.state
        assert state is not None
        wait_until(lambda: len(state.tasks) == 1)  # the connect attempt
        sock.close()
        wait_until(lambda: not state.tasks and not state.connections, timeout=1)
    finally:
        silent.close()


def test_request_never_waits_on_a_dead_pool_entry(make_upstream, make_proxy) -> None:
    # The upstream closes every connection after one response (Connection: close).
    up = make_upstream(
        lambda r: [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", CLOSE]
    )
    proxy = make_proxy(up.url)
    for _ in range(20):
        assert post(proxy.port).status == 200
    assert up.connections == 20
    assert proxy.server.state is not None and proxy.server.state.pool.idle_count == 0


def test_many_pooled_connections_after_upstream_restart(make_upstream, make_proxy, lt) -> None:
    up = make_upstream(lambda r: [ok_response()])
    proxy = make_proxy(up.url)
    with ThreadPoolExecutor(20) as pool:
        assert set(pool.map(lambda _: post(proxy.port).status, range(40))) == {200}
    lt.run(up.stop())  # every pooled connection dies at once
    lt.run(up.start(port=up.port))
    with ThreadPoolExecutor(20) as pool:
        assert set(pool.map(lambda _: post(proxy.port).status, range(40))) == {200}
