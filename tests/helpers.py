"""Loopback test servers: a raw recording upstream, the proxy in a loop thread, raw clients.

Tests drive everything from the main thread with blocking sockets and the official SDKs, while
the proxy and the fake upstreams run on one event loop in a background thread, as they would in
production. Readiness comes from events, never from sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httptools

from claude_proxy.config import Config, UpstreamAuthConfig
from claude_proxy.credentials import UpstreamAuth, make_auth
from claude_proxy.server import ProxyServer

T = TypeVar("T")

CLIENT_KEY = "client-key-abcdef0123456789"
UPSTREAM_KEY = "upstream-key-9876543210fedcba"
# Every secret the suite configures or is issued; conftest scans every log record for them.
SECRETS: set[str] = {CLIENT_KEY, UPSTREAM_KEY}


def secret(value: str) -> str:
    """Declare ``value`` a secret that must never be logged; returns it."""
    SECRETS.add(value)
    return value


class LoopThread:
    """An event loop running in a daemon thread; ``run`` executes a coroutine there."""

    def __init__(self, kind: str = "asyncio") -> None:
        if kind == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.kind = kind
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def stop(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


# --------------------------------------------------------------------------- raw upstream


@dataclass
class Recorded:
    """One request as the upstream saw it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    chunked: bool = False
    complete: bool = False

    def header(self, name: str) -> bytes | None:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[bytes]:
        lname = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == lname]


# A response script: bytes are written, floats are pauses, CLOSE/RESET end the connection,
# and a threading.Event is waited on (for tests that release events one by one).
CLOSE = object()
RESET = object()
Script = Iterable[Any]
Handler = Callable[[Recorded], Script]


def ok_response(body: bytes = b"ok", headers: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [b"HTTP/1.1 200 OK\r\n", b"Content-Length: %d\r\n" % len(body)]
    lines += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
    return b"".join(lines) + b"\r\n" + body


def default_handler(request: Recorded) -> Script:
    return [ok_response()]


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, upstream: RawUpstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: Recorded | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.upstream.connections += 1
        self.upstream.open_protocols.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self.upstream.open_protocols.discard(self)
        if self.upstream.record:
            self.upstream.closed_at.append(time.monotonic())
        self.upstream.changed()

    def data_received(self, data: bytes) -> None:
        if self.upstream.record:
            self.upstream.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        rec = Recorded(self.parser.get_method(), self.url, self.headers)
        rec.chunked = any(
            n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in self.headers
        )
        self.current = rec
        if self.upstream.record:
            self.upstream.requests.append(rec)
        self.upstream.changed()
        expect = any(n.lower() == b"expect" for n, _ in self.headers)
        if not self.upstream.respond_after_body or expect:
            self._respond(rec)
        if self.upstream.hold_body is not None:
            # a slow upstream: stop reading the body until the test says so
            transport = self.transport
            assert transport is not None
            transport.pause_reading()
            self.upstream.held.append(transport)

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        if self.upstream.record:
            self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.complete = True
        self.upstream.changed()
        if self.upstream.respond_after_body:
            self._respond(self.current)

    def _respond(self, rec: Recorded) -> None:
        script = self.upstream.handler(rec)
        task = asyncio.get_running_loop().create_task(self._play(script))
        self.upstream.tasks.add(task)
        task.add_done_callback(self.upstream.tasks.discard)

    async def _play(self, script: Script) -> None:
        transport = self.transport
        assert transport is not None
        for step in script:
            if transport.is_closing():
                return
            if isinstance(step, bytes | bytearray):
                transport.write(step)
            elif isinstance(step, float | int):
                await asyncio.sleep(step)
            elif isinstance(step, threading.Event):
                await asyncio.get_running_loop().run_in_executor(None, step.wait, 10)
            elif step is CLOSE:
                transport.close()
                return
            elif step is RESET:
                reset(transport)
                return


def reset(transport: asyncio.BaseTransport) -> None:
    """A real TCP reset (SO_LINGER 0), not the FIN that a plain abort sends."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class RawUpstream:
    """An HTTP/1.1 upstream that records every byte and answers from a script."""

    def __init__(
        self,
        handler: Handler = default_handler,
        *,
        respond_after_body: bool = True,
        record: bool = True,
    ) -> None:
        self.handler = handler
        self.respond_after_body = respond_after_body
        self.record = record  # False for load: nothing is kept per request
        self.hold_body: bool | None = None  # True: pause reading after each request head
        self.held: list[asyncio.Transport] = []
        self.requests: list[Recorded] = []
        self.raw = b""
        self.connections = 0
        self.closed_at: list[float] = []
        self.open_protocols: set[_UpstreamProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._cond = threading.Condition()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, ssl_context: Any = None, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _UpstreamProtocol(self), "127.0.0.1", port, ssl=ssl_context
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for proto in list(self.open_protocols):
            if proto.transport is not None:
                proto.transport.abort()
        for task in list(self.tasks):
            task.cancel()

    def release_held(self) -> None:
        """Resume reading what hold_body paused (call in the loop thread)."""
        for transport in self.held:
            if not transport.is_closing():
                transport.resume_reading()
        self.held.clear()

    def changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block the calling (test) thread until ``predicate`` holds; events, not sleeps."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"condition not reached within {timeout:.1f}s")

    def reset(self) -> None:
        self.requests.clear()
        self.raw = b""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# --------------------------------------------------------------------------- proxy


def make_config(upstream_url: str, **changes: Any) -> Config:
    base = Config(
        upstream_url=upstream_url,
        upstream_auth=UpstreamAuthConfig(type="api_key", api_key=UPSTREAM_KEY),
        client_api_key=CLIENT_KEY,
    )
    config = dataclasses.replace(base, port=0, **changes)
    return config


@dataclass
class ProxyHandle:
    server: ProxyServer
    lt: LoopThread
    port: int = 0
    auth: UpstreamAuth | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 5.0) -> bool:
        return self.lt.run(self.server.shutdown(timeout), timeout + 5)


def start_proxy(lt: LoopThread, config: Config, auth: UpstreamAuth | None = None) -> ProxyHandle:
    async def go() -> ProxyHandle:
        the_auth = auth or (make_auth(config.upstream_auth) if config.upstream_auth else None)
        server = ProxyServer(config, the_auth)
        await server.start()
        return ProxyHandle(server, lt, server.port, the_auth)

    return lt.run(go())


# --------------------------------------------------------------------------- raw client


def raw_connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool
    raw: bytes

    def header(self, name: str) -> bytes | None:
        lname = name.lower().encode()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class _ResponseReader:
    """Parses responses off one socket, any number of them, however the bytes are split."""

    def __init__(self, head_request: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = head_request
        self.done: list[RawResponse] = []
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.reason = b""
        self.head_done = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            self._reset()
            return
        self.head_done = True
        if self.head_request:
            self._complete(True)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() >= 200 and self.head_done:
            self._complete(True)

    def _complete(self, complete: bool) -> None:
        status = self.parser.get_status_code() if self.head_done else 0
        self.done.append(
            RawResponse(status, self.reason, self.headers, bytes(self.body), complete, b"")
        )
        self._reset()


def read_responses(
    sock: socket.socket, n: int, *, head: bool = False, timeout: float = 5.0
) -> list[RawResponse]:
    """Read ``n`` responses; the last is marked incomplete if the connection ended early."""
    reader = _ResponseReader(head)
    raw = bytearray()
    sock.settimeout(timeout)
    while len(reader.done) < n:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            reader._complete(False)
            break
        raw += data
        try:
            reader.parser.feed_data(data)
        except httptools.HttpParserError:
            if len(reader.done) >= n:
                break
            raise
    for resp in reader.done:
        resp.raw = bytes(raw)
    return reader.done[:n]


def read_response(sock: socket.socket, *, head: bool = False, timeout: float = 5.0) -> RawResponse:
    """Read one response; ``complete`` is False when the connection ended before its end."""
    return read_responses(sock, 1, head=head, timeout=timeout)[0]


def request_bytes(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes = b"",
    *,
    chunked: bool = False,
    host: bool = True,
) -> bytes:
    """An HTTP/1.1 request; ``host`` adds ``Host: proxy.local`` unless ``headers`` has one
    (RFC 9112 §3.2: a request without it gets 400)."""
    lines = [f"{method} {target} HTTP/1.1\r\n".encode()]
    hs = list(headers)
    if host and not any(k.lower() == "host" for k, _ in hs):
        hs.insert(0, ("Host", "proxy.local"))
    if chunked:
        hs.append(("Transfer-Encoding", "chunked"))
    elif body or method in ("POST", "PUT", "PATCH"):
        hs.append(("Content-Length", str(len(body))))
    lines += [f"{k}: {v}\r\n".encode("latin-1") for k, v in hs]
    lines.append(b"\r\n")
    if chunked:
        for i in range(0, len(body), 1000):
            part = body[i : i + 1000]
            lines.append(b"%x\r\n%b\r\n" % (len(part), part))
        lines.append(b"0\r\n\r\n")
    else:
        lines.append(body)
    return b"".join(lines)


def exchange(port: int, data: bytes, *, head: bool = False, timeout: float = 5.0) -> RawResponse:
    """Send ``data`` on a new connection and read one response."""
    with raw_connect(port, timeout) as sock:
        sock.sendall(data)
        return read_response(sock, head=head, timeout=timeout)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    """Poll a cheap in-memory predicate (for state owned by another thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(step)
