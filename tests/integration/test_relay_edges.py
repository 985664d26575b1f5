"""The relay's edges, one test per case a protocol reviewer found (issue 10), each named after
what it guards. RFC 9110 / 9112 are the spec; nginx 1.22 on loopback was the reference where the
RFCs leave a choice."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import pytest

from claude_proxy.flow import UPSTREAM_FULL
from claude_proxy.record import ExchangeRecord

from ..helpers import (
    CLIENT_KEY,
    CLOSE,
    RESET,
    UPSTREAM_KEY,
    LoopThread,
    ProxyHandle,
    RawUpstream,
    Recorded,
    exchange,
    ok_response,
    raw_connect,
    read_response,
    read_responses,
    request_bytes,
    wait_until,
)

KEY = ("x-api-key", CLIENT_KEY)
Make = Callable[..., RawUpstream]


def head_and_rest(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """Read until the end of one response head; returns (head, whatever came after it)."""
    sock.settimeout(timeout)
    got = b""
    while b"\r\n\r\n" not in got:
        data = sock.recv(65536)
        if not data:
            break
        got += data
    head, _, rest = got.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def access_records(caplog: pytest.LogCaptureFixture) -> list[ExchangeRecord]:
    return [
        r.exchange  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "claude_proxy.access" and hasattr(r, "exchange")
    ]


# ================================================================ framing and security


@pytest.mark.parametrize(
    "connection",
    ["keep-alive, content-length", "Content-Length", "close, CONTENT-LENGTH, x-foo", "host"],
)
def test_connection_header_cannot_strip_framing_or_routing_fields(
    upstream: RawUpstream, proxy: ProxyHandle, connection: str
) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    body = b'{"a":1}' + smuggled
    raw = (
        b"POST /x HTTP/1.1\r\nHost: p\r\nx-api-key: " + CLIENT_KEY.encode() + b"\r\n"
        b"Connection: " + connection.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    resp = exchange(proxy.port, raw)
    assert resp.status == 200
    (rec,) = upstream.requests  # one request, never two
    assert rec.body == body
    assert rec.header("content-length") == str(len(body)).encode()
    assert rec.header("host") == f"127.0.0.1:{upstream.port}".encode()


def test_http10_request_with_transfer_encoding_is_refused_and_closed(
    upstream: RawUpstream, proxy: ProxyHandle
) -> None:
    raw = (
        b"POST /x HTTP/1.0\r\nHost: p\r\nx-api-key: " + CLIENT_KEY.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ) + request_bytes("GET", "/second", [KEY])
    with raw_connect(proxy.port) as sock:
        sock.sendall(raw)
        resp = read_response(sock)
        assert resp.status == 400
        assert resp.header("connection") == b"close"
        assert sock.recv(100) == b""
    assert upstream.requests == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET /x HTTP/1.1\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n",
        b"GET /x HTTP/1.0\r\nHost: a\r\nHost: a\r\n",
    ],
    ids=["http11-without-host", "two-hosts", "http10-two-hosts"],
)
def test_host_missing_or_repeated_is_400(
    upstream: RawUpstream, proxy: ProxyHandle, head: bytes
) -> None:
    resp = exchange(proxy.port, head + b"x-api-key: " + CLIENT_KEY.encode() + b"\r\n\r\n")
    assert resp.status == 400
    assert upstream.requests == []


def test_http10_request_without_host_is_served(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    raw = b"GET /x HTTP/1.0\r\nx-api-key: " + CLIENT_KEY.encode() + b"\r\n\r\n"
    assert exchange(proxy.port, raw).status == 200


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-api-key", CLIENT_KEY + " "),
        ("api-key", "\t" + CLIENT_KEY),
        ("x-api-key", " " + CLIENT_KEY + "\t"),
    ],
)
def test_whitespace_around_a_key_is_not_part_of_it(
    upstream: RawUpstream, proxy: ProxyHandle, name: str, value: str
) -> None:
    resp = exchange(proxy.port, request_bytes("POST", "/x", [(name, value)], b"{}"))
    assert resp.status == 200
    assert upstream.requests[0].header(name) == UPSTREAM_KEY.encode()


def test_bearer_with_trailing_whitespace_is_accepted(
    upstream: RawUpstream, proxy: ProxyHandle
) -> None:
    headers = [("Authorization", f"Bearer {CLIENT_KEY}  ")]
    assert exchange(proxy.port, request_bytes("POST", "/x", headers, b"{}")).status == 200


def test_expect_with_trailing_whitespace_is_honoured(
    upstream: RawUpstream, proxy: ProxyHandle
) -> None:
    with raw_connect(proxy.port) as sock:
        sock.sendall(
            b"POST /x HTTP/1.1\r\nHost: p\r\nx-api-key: " + CLIENT_KEY.encode() + b"\r\n"
            b"Expect: 100-continue \r\nContent-Length: 2\r\n\r\n"
        )
        interim, _ = head_and_rest(sock)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"{}")
        assert read_response(sock).status == 200
    assert upstream.requests[0].body == b"{}"


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("case", ["wrong-key", "upstream-refused", "bad-request"])
def test_proxy_made_answer_to_head_has_no_body(
    upstream: RawUpstream, make_proxy: Callable[..., ProxyHandle], case: str
) -> None:
    url = f"http://127.0.0.1:{refused_port()}" if case == "upstream-refused" else upstream.url
    proxy = make_proxy(url)
    key = "wrong" if case == "wrong-key" else CLIENT_KEY
    target = "http://absolute/x" if case == "bad-request" else "/x"
    with raw_connect(proxy.port) as sock:
        sock.sendall(f"HEAD {target} HTTP/1.1\r\nHost: p\r\nx-api-key: {key}\r\n\r\n".encode())
        head, rest = head_and_rest(sock)
        assert head.split(b" ")[1] in (b"401", b"502", b"400")
        assert b"content-length: " in head  # the length the body would have had
        if b"connection: close" in head:
            assert rest + sock.recv(100) == b""  # nothing follows the head
            return
        assert rest == b""
        sock.sendall(request_bytes("GET", "/next", [KEY]))
        head2, _ = head_and_rest(sock)
        assert head2.startswith(b"HTTP/1.1 ")  # the next response starts right there


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\n\r\nstray",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforge",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\nbody",
    ],
    ids=["204-with-body", "past-content-length", "second-response", "304-with-body"],
)
def test_stray_bytes_after_a_response_close_the_upstream_connection(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle], answer: bytes
) -> None:
    def handler(rec: Recorded) -> list[object]:
        return [answer] if rec.target == b"/first" else [ok_response(b"second")]

    up = make_upstream(handler)
    proxy = make_proxy(up.url)
    first = exchange(proxy.port, request_bytes("GET", "/first", [KEY]))
    assert first.status in (200, 204, 304) and first.complete
    up.wait_for(lambda: len(up.closed_at) == 1)  # the proxy dropped that connection
    second = exchange(proxy.port, request_bytes("GET", "/second", [KEY]))
    assert (second.status, second.body) == (200, b"second")
    assert up.connections == 2


def _reset_second(calls: list[bytes]) -> Callable[[Recorded], list[object]]:
    def handler(rec: Recorded) -> list[object]:
        calls.append(rec.target)
        if rec.target == b"/second" and calls.count(b"/second") == 1:
            return [RESET]
        return [ok_response(rec.target)]

    return handler


def test_post_is_not_sent_twice_when_a_reused_connection_closes(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle]
) -> None:
    calls: list[bytes] = []
    up = make_upstream(_reset_second(calls))
    proxy = make_proxy(up.url)
    assert exchange(proxy.port, request_bytes("POST", "/first", [KEY], b"{}")).status == 200
    resp = exchange(proxy.port, request_bytes("POST", "/second", [KEY], b'{"x": 1}'))
    # RFC 9110 §9.2.2: the upstream may have acted on it; the client decides, and is told
    # it may retry
    assert resp.status == 502
    assert resp.header("x-should-retry") == b"true"
    assert calls == [b"/first", b"/second"]


@pytest.mark.parametrize(
    ("method", "headers"),
    [("PUT", []), ("GET", []), ("POST", [("Idempotency-Key", "k-1")])],
    ids=["put", "get", "post-with-idempotency-key"],
)
def test_idempotent_request_is_sent_again_when_a_reused_connection_closes(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle], method: str, headers: list
) -> None:
    calls: list[bytes] = []
    up = make_upstream(_reset_second(calls))
    proxy = make_proxy(up.url)
    assert exchange(proxy.port, request_bytes("POST", "/first", [KEY], b"{}")).status == 200
    body = b"" if method == "GET" else b'{"x": 1}'
    resp = exchange(proxy.port, request_bytes(method, "/second", [KEY, *headers], body))
    assert (resp.status, resp.body) == (200, b"/second")
    assert calls == [b"/first", b"/second", b"/second"]
    assert up.requests[-1].body == body


def test_close_delimited_body_cut_by_a_reset_reaches_the_client_as_a_reset(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle]
) -> None:
    up = make_upstream(lambda r: [b"HTTP/1.1 200 OK\r\n\r\npartial", 0.05, RESET])
    proxy = make_proxy(up.url)
    with raw_connect(proxy.port) as sock:
        sock.sendall(request_bytes("GET", "/x", [KEY]))
        got = b""
        with pytest.raises(ConnectionResetError):
            while True:
                data = sock.recv(65536)
                if not data:
                    break  # a clean end: the truncation would be invisible
                got += data


def test_close_delimited_body_ended_cleanly_is_complete(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle]
) -> None:
    up = make_upstream(lambda r: [b"HTTP/1.1 200 OK\r\n\r\nall of it", CLOSE])
    proxy = make_proxy(up.url)
    resp = exchange(proxy.port, request_bytes("GET", "/x", [KEY]))
    assert resp.status == 200 and resp.body == b"all of it"


def test_interim_responses_are_not_sent_to_http10_clients(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle]
) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
    up = make_upstream(lambda r: [early, ok_response(b"final")])
    proxy = make_proxy(up.url)
    raw10 = b"GET /x HTTP/1.0\r\nx-api-key: " + CLIENT_KEY.encode() + b"\r\n\r\n"
    with raw_connect(proxy.port) as sock:
        sock.sendall(raw10)
        head, _ = head_and_rest(sock)
    assert head.startswith(b"HTTP/1.1 200")
    with raw_connect(proxy.port) as sock:  # an HTTP/1.1 client still gets it
        sock.sendall(request_bytes("GET", "/x", [KEY]))
        head, _ = head_and_rest(sock)
    assert head.startswith(b"HTTP/1.1 103")


def test_http10_keep_alive_is_announced_and_kept(upstream: RawUpstream, proxy: ProxyHandle) -> None:
    raw10 = (
        b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\nx-api-key: "
        + CLIENT_KEY.encode()
        + b"\r\n\r\n"
    )
    with raw_connect(proxy.port) as sock:
        sock.sendall(raw10)
        first = read_response(sock)
        assert first.header("connection") == b"keep-alive"
        sock.sendall(raw10)
        assert read_response(sock).status == 200
    assert upstream.connections == 1 and len(upstream.requests) == 2


def test_trailer_field_is_kept_when_trailers_are_relayed(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle]
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTrailer: x-checksum\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nbody\r\n0\r\nx-checksum: abc\r\n\r\n"
    )
    up = make_upstream(lambda r: [answer])
    proxy = make_proxy(up.url)
    with raw_connect(proxy.port) as sock:
        sock.sendall(request_bytes("GET", "/x", [KEY]))
        got = b""
        while not got.endswith(b"0\r\nx-checksum: abc\r\n\r\n"):
            data = sock.recv(65536)
            assert data, got
            got += data
    assert b"\r\nTrailer: x-checksum\r\n" in got


def test_request_trailers_are_relayed_after_the_body_not_in_the_head(
    upstream: RawUpstream, proxy: ProxyHandle
) -> None:
    raw = (
        b"POST /x HTTP/1.1\r\nHost: p\r\nx-api-key: " + CLIENT_KEY.encode() + b"\r\n"
        b"Trailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nx-sum: 99\r\n\r\n"
    )
    assert exchange(proxy.port, raw).status == 200
    head, _, rest = upstream.raw.partition(b"\r\n\r\n")
    assert b"x-sum: 99" not in head
    assert b"Trailer: x-sum" in head
    assert rest.endswith(b"0\r\nx-sum: 99\r\n\r\n")


# ================================================================ flow control and timers


def _send_in_thread(sock: socket.socket, data: bytes) -> threading.Thread:
    sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    sender.start()
    return sender


@pytest.mark.parametrize("answer", ["413", "reset"])
def test_large_upload_with_an_early_answer_is_answered_and_discarded(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle], answer: str
) -> None:
    # 413: answered while the upload is under way, announcing its close (a server that then
    # goes on reading, RFC 9112 §9.6, or its reset could destroy its own answer); reset: gone.
    # Either comes once the proxy has paused its client for the upstream, which reads no more.
    go = threading.Event()
    if answer == "reset":
        script: list[object] = [go, RESET]
    else:
        script = [
            go,
            b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbig",
        ]

    def handler(rec: Recorded) -> list[object]:
        return script if rec.target == b"/upload" else [ok_response(b"after")]

    up = make_upstream(handler, respond_after_body=False)
    up.hold_body = True  # it reads no more of the body: the proxy must pause its client
    proxy = make_proxy(up.url)  # idle_timeout is 600 s: a stall would fail the test's timeout
    state = proxy.server.state
    assert state is not None
    body = b"a" * (15 * 1024 * 1024)  # more than loopback's socket buffers hold
    try:
        with raw_connect(proxy.port, timeout=20) as sock:
            sender = _send_in_thread(sock, request_bytes("POST", "/upload", [KEY], body))
            wait_until(
                lambda: any(c.gate.holds(UPSTREAM_FULL) for c in list(state.connections)),
                timeout=20,
            )
            go.set()
            resp = read_response(sock, timeout=20)
            assert resp.status == (413 if answer != "reset" else 502)
            sender.join(20)
            assert not sender.is_alive()  # the proxy read the whole body
            sock.sendall(request_bytes("GET", "/next", [KEY]))  # discarded, then reused
            assert read_response(sock, timeout=20).body == b"after"
    finally:
        go.set()


def test_proxy_error_while_the_client_is_paused_resumes_reading(
    make_proxy: Callable[..., ProxyHandle],
) -> None:
    # A TLS upstream that accepts TCP but never answers the handshake: the body waits in
    # memory past its high-water mark (the client is paused) until the connect times out.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        proxy = make_proxy(f"https://127.0.0.1:{silent.getsockname()[1]}", connect_timeout=0.5)
        body = b"b" * (15 * 1024 * 1024)  # more than loopback's socket buffers hold
        with raw_connect(proxy.port, timeout=20) as sock:
            sender = _send_in_thread(sock, request_bytes("POST", "/x", [KEY], body))
            resp = read_response(sock, timeout=20)
            assert resp.status == 504
            sender.join(20)
            assert not sender.is_alive()
    finally:
        silent.close()


@pytest.mark.parametrize("keep_alive", [True, False])
def test_client_that_stops_reading_is_dropped(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle], keep_alive: bool
) -> None:
    big = b"z" * (32 * 1024 * 1024)
    up = make_upstream(lambda r: [ok_response(big)])
    proxy = make_proxy(up.url, idle_timeout=0.5, keepalive_timeout=0.5)
    state = proxy.server.state
    assert state is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    try:
        headers = [KEY] if keep_alive else [KEY, ("Connection", "close")]
        sock.sendall(request_bytes("GET", "/big", headers))
        wait_until(lambda: len(state.connections) == 1)
        wait_until(lambda: not state.connections, timeout=20)  # never read, still let go
    finally:
        sock.close()


def test_queued_request_never_writes_into_the_active_stream(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle]
) -> None:
    events = [b"5\r\nevent\r\n", 0.2] * 6  # keeps moving, but longer than idle_timeout

    def handler(rec: Recorded) -> list[object]:
        if rec.target == b"/stream":
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            return [head, *events, b"0\r\n\r\n"]
        return [ok_response(b"second")]

    up = make_upstream(handler)
    proxy = make_proxy(up.url, idle_timeout=0.5)
    with raw_connect(proxy.port, timeout=10) as sock:
        two = request_bytes("POST", "/two", [KEY], b"0123456789")
        # the second request's body is half there: its turn comes after the stream
        sock.sendall(request_bytes("GET", "/stream", [KEY]) + two[:-5])
        first = read_response(sock, timeout=10)
        assert first.status == 200 and first.body == b"event" * 6 and first.complete
        sock.sendall(two[-5:])
        second = read_response(sock, timeout=10)
    assert second.status == 200 and second.body == b"second"


def test_header_timeout_never_fires_on_a_pipelined_head_the_proxy_stopped_reading(
    make_upstream: Make, make_proxy: Callable[..., ProxyHandle]
) -> None:
    def handler(rec: Recorded) -> list[object]:
        return [0.8, ok_response(b"slow")] if rec.target == b"/slow" else [ok_response(b"two")]

    up = make_upstream(handler)
    proxy = make_proxy(up.url, header_timeout=0.3)
    with raw_connect(proxy.port, timeout=10) as sock:
        second = request_bytes("GET", "/two", [KEY])
        # the whole first request and half of the second head, in one write
        sock.sendall(request_bytes("GET", "/slow", [KEY]) + second[:20])
        first = read_response(sock, timeout=10)
        assert first.body == b"slow"
        sock.sendall(second[20:])
        assert read_response(sock, timeout=10).body == b"two"


def test_pipelined_chunked_request_with_trailer_is_relayed_and_the_pool_stays_clean(
    upstream: RawUpstream, proxy: ProxyHandle
) -> None:
    chunked = (
        b"POST /two HTTP/1.1\r\nHost: p\r\nx-api-key: " + CLIENT_KEY.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"
    )
    with raw_connect(proxy.port) as sock:
        sock.sendall(request_bytes("POST", "/one", [KEY], b"{}") + chunked)
        one, two = read_responses(sock, 2)
    assert one.status == two.status == 200
    assert [r.target for r in upstream.requests] == [b"/one", b"/two"]
    assert upstream.requests[1].body == b"abc"
    assert upstream.raw.endswith(b"0\r\nx-t: 1\r\n\r\n")
    assert exchange(proxy.port, request_bytes("GET", "/three", [KEY])).status == 200


def test_client_stalling_mid_body_gets_408_counted_once_as_the_clients(
    upstream: RawUpstream,
    make_proxy: Callable[..., ProxyHandle],
    access_log: pytest.LogCaptureFixture,
) -> None:
    proxy = make_proxy(upstream.url, idle_timeout=0.3)
    with raw_connect(proxy.port) as sock:
        sock.sendall(request_bytes("POST", "/x", [KEY], b"0123456789")[:-5])
        resp = read_response(sock)
    assert resp.status == 408
    assert resp.header("x-should-retry") == b"false"
    wait_until(lambda: len(access_records(access_log)) == 1)
    (rec,) = access_records(access_log)
    assert (rec.status, rec.outcome) == (408, "idle_timeout")
    warnings = [r for r in access_log.records if "idle" in r.getMessage() and r.levelno >= 30]
    assert len(warnings) <= 1


def test_upstream_silent_before_headers_gives_504_the_upstreams(
    make_upstream: Make,
    make_proxy: Callable[..., ProxyHandle],
    access_log: pytest.LogCaptureFixture,
) -> None:
    never = threading.Event()
    up = make_upstream(lambda r: [never])
    proxy = make_proxy(up.url, idle_timeout=0.3)
    try:
        resp = exchange(proxy.port, request_bytes("POST", "/x", [KEY], b"{}"))
        assert resp.status == 504
        assert resp.header("x-should-retry") == b"true"
        wait_until(lambda: len(access_records(access_log)) == 1)
        assert access_records(access_log)[0].outcome == "idle_timeout"
    finally:
        never.set()


def test_idle_pooled_connections_are_reaped(
    upstream: RawUpstream, make_proxy: Callable[..., ProxyHandle]
) -> None:
    proxy = make_proxy(upstream.url, pool_idle_timeout=0.2)
    assert exchange(proxy.port, request_bytes("GET", "/x", [KEY])).status == 200
    upstream.wait_for(lambda: len(upstream.closed_at) == 1)  # closed by the proxy, unused
    state = proxy.server.state
    assert state is not None and state.pool.idle_count == 0


def test_failed_request_task_is_logged_and_answered(
    lt: LoopThread, upstream: RawUpstream, proxy: ProxyHandle, caplog: pytest.LogCaptureFixture
) -> None:
    state = proxy.server.state
    assert state is not None
    told: list[BaseException] = []

    async def broken() -> None:
        raise ValueError("boom")

    async def go() -> None:
        task = state.spawn(broken(), told.append)
        await asyncio_wait(task)

    with caplog.at_level(logging.ERROR, logger="claude_proxy"):
        lt.run(go())
    assert [type(e) for e in told] == [ValueError]
    assert any(r.exc_info and r.exc_info[0] is ValueError for r in caplog.records)


async def asyncio_wait(task: object) -> None:
    import asyncio

    assert isinstance(task, asyncio.Task)
    await asyncio.wait([task])
