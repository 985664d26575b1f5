"""Backpressure both ways: a slow reader on either side stops the proxy from reading more."""

from __future__ import annotations

import hashlib
import socket
import time

from ..helpers import (
    CLIENT_KEY,
    CLOSE,
    LoopThread,
    RawUpstream,
    ok_response,
    raw_connect,
    read_response,
    request_bytes,
    wait_until,
)

BIG = 48 * 1024 * 1024
CHUNK = bytes(range(256)) * 4096  # 1 MiB


def proxy_side(proxy, lt: LoopThread):
    state = proxy.server.state
    assert state is not None
    wait_until(lambda: len(state.connections) == 1)
    (conn,) = lt.call(lambda: list(state.connections))
    return conn


def test_slow_client_pauses_the_upstream(make_upstream, make_proxy, lt: LoopThread) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG
    up = make_upstream(lambda r: [head, *([CHUNK] * (BIG // len(CHUNK))), CLOSE])
    proxy = make_proxy(up.url)
    sock = raw_connect(proxy.port, timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(request_bytes("GET", "/big", [("x-api-key", CLIENT_KEY)]))
    conn = proxy_side(proxy, lt)
    # the client reads nothing: the proxy stops reading from the upstream
    wait_until(
        lambda: (
            conn.active is not None
            and conn.active.upstream is not None
            and conn.active.upstream.gate.paused
        ),
        timeout=10,
    )
    buffered = lt.call(lambda: conn.transport.get_write_buffer_size())
    assert buffered < 4 * 1024 * 1024, buffered  # not the 48 MiB body
    # once the client reads, every byte arrives, in order
    resp = read_response(sock, timeout=30)
    sock.close()
    assert resp.complete and len(resp.body) == BIG
    expected = hashlib.sha256(CHUNK * (BIG // len(CHUNK))).hexdigest()
    assert hashlib.sha256(resp.body).hexdigest() == expected


def test_slow_upstream_pauses_the_client(make_upstream, make_proxy, lt: LoopThread) -> None:
    up: RawUpstream = make_upstream(lambda r: [ok_response()])
    up.hold_body = True
    up.record = False  # the body is 48 MiB: do not keep it
    proxy = make_proxy(up.url)
    sock = raw_connect(proxy.port, timeout=30)
    sock.setblocking(False)
    head = (
        b"POST /upload HTTP/1.1\r\nHost: p\r\nx-api-key: "
        + CLIENT_KEY.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % BIG
    )
    sent = 0
    payload = head + CHUNK
    deadline = time.monotonic() + 10
    # push until the kernel buffers are full: the proxy has stopped reading from us
    stalled_since = None
    while time.monotonic() < deadline:
        try:
            n = sock.send(payload[: 1 << 20])
            payload = payload[n:] or CHUNK
            sent += n
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break
            time.sleep(0.01)
    assert sent < BIG // 2, sent  # we could not push the whole body: backpressure
    conn = proxy_side(proxy, lt)
    assert lt.call(lambda: conn.gate.owners) != 0  # the proxy paused reading its client
    upstream_buffer = lt.call(lambda: conn.active.upstream.transport.get_write_buffer_size())
    assert upstream_buffer < 4 * 1024 * 1024, upstream_buffer
    lt.call(up.release_held)
    sock.setblocking(True)
    remaining = BIG + len(head) - sent
    while remaining > 0:
        chunk = CHUNK[: min(len(CHUNK), remaining)]
        sock.sendall(chunk)
        remaining -= len(chunk)
    resp = read_response(sock, timeout=30)
    assert resp.status == 200
    sock.close()
