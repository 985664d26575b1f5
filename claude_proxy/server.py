"""The listening side: an HTTP/1.1 server Protocol (llhttp via httptools) and its lifecycle.

:class:`ProxyServer` binds (port 0 allowed), serves, and shuts down in three steps: stop
accepting, let in-flight exchanges finish up to a deadline, then abort what is left.
Each client connection parses requests and hands every event to its current
:class:`~claude_proxy.relay.Exchange`; pipelined requests wait their turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import ssl
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import httptools

from .admin import AdminServer
from .batching import Batched
from .client_auth import KeyRing
from .config import Config
from .credentials import UpstreamAuth
from .errors import (
    BadRequest,
    HeadersTooLarge,
    ProxyError,
    UriTooLong,
    family_of,
    render_error,
)
from .headers import HeaderScan, scan
from .logs import flush_handlers
from .metrics import Metrics, exposition
from .relay import Exchange
from .upstream import Origin, UpstreamPool

logger = logging.getLogger(__name__)

# Reasons a client connection's reading is paused; reading resumes when none is left.
PAUSE_UPSTREAM: Final = 1  # the upstream is not taking the request body as fast as it comes
PAUSE_PIPELINE: Final = 2  # a pipelined request waits for the one before it


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    scan: HeaderScan
    keep_alive: bool
    http11: bool
    chunked: bool
    expect_continue: bool
    anthropic_version: bool


class ServerState:
    """What every connection shares: config, keys, credential, pool, and owned tasks."""

    def __init__(
        self,
        config: Config,
        auth: UpstreamAuth,
        pool: UpstreamPool,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.keyring = KeyRing(config.client_keys())
        self.auth = auth
        self.pool = pool
        self.origin = pool.origin
        self.batch = pool.batch
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.drained = asyncio.Event()
        self._ids = itertools.count(1)
        self._update_logging()
        self._id_prefix = secrets.token_hex(3)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start a task the server owns: it is awaited or cancelled at shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def next_request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):x}"

    def reload(self, config: Config) -> None:
        """Take new client keys and log settings without touching open connections."""
        self.config = config
        self.keyring = KeyRing(config.client_keys())
        self._update_logging()

    def _update_logging(self) -> None:
        access = logging.getLogger("claude_proxy.access")
        self.access_log = access.isEnabledFor(logging.INFO) and not access.disabled
        self.read_usage = self.access_log or self.metrics is not None

    def in_flight(self) -> int:
        return sum(1 for c in self.connections if c.active is not None)

    def open_streams(self) -> int:
        return sum(
            1
            for c in self.connections
            if c.active is not None and c.active.streaming and not c.active.response_done
        )


class ClientConnection(Batched, asyncio.Protocol):
    """One client's TCP (or TLS) connection, speaking HTTP/1.1."""

    __slots__ = (
        "_head_bytes",
        "_head_since",
        "_head_size",
        "_headers",
        "_reading",
        "_url",
        "active",
        "draining",
        "idle_since",
        "loop",
        "parser",
        "paused_by",
        "queue",
        "state",
        "transport",
        "write_paused",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        Batched.__init__(self, state.pool.batch)
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.active: Exchange | None = None  # whose response is being written
        self._reading: Exchange | None = None  # whose request body is being read
        self.queue: deque[Exchange] = deque()
        self.paused_by = 0
        self.write_paused = False
        self.draining = state.draining
        self.idle_since = self.loop.time()
        self._head_since = 0.0
        self._head_bytes = -1  # raw bytes read since the head began; -1: not inside a head
        self._head_size = 0  # bytes of the target and the complete header lines
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        state.connections.discard(self)
        if state.draining and not state.connections:
            state.drained.set()
        exchanges = [ex for ex in (self.active, self._reading, *self.queue) if ex is not None]
        self.active = self._reading = None
        self.queue.clear()
        for ex in dict.fromkeys(exchanges):
            ex.client_lost()

    def data_received(self, data: bytes) -> None:
        if self._head_bytes >= 0:
            self._head_bytes += len(data)
        opened = self.batch.begin()
        try:
            self._feed(data)
        finally:
            if opened:
                self.batch.end()

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProxyError):
                self._reject(cause)
            else:
                logger.error("internal error while reading a request", exc_info=cause)
                self.abort()
        except httptools.HttpParserUpgrade:
            self._upgrade_requested()
        except httptools.HttpParserError as exc:
            self._reject(BadRequest(f"Malformed HTTP request: {_parser_reason(exc)}."))
        else:
            if self._head_bytes > self.state.config.max_header_bytes:
                self._reject(HeadersTooLarge("Request head too large."))

    def eof_received(self) -> bool | None:
        # Like nginx: a client that ends its side has gone away; its upstream exchange stops.
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.active is not None:
            self.active.client_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.active is not None:
            self.active.client_write_resumed()

    # ---------------------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_since = self.loop.time()
        if self._head_bytes < 0:
            self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.state.config.max_header_bytes:
            raise UriTooLong("Request target too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        config = self.state.config
        if len(self._headers) > config.max_headers:
            raise HeadersTooLarge("Too many request headers.")
        if self._head_size + len(self._url) > config.max_header_bytes:
            raise HeadersTooLarge("Request head too large.")

    def on_headers_complete(self) -> None:
        self._head_bytes = -1
        parser = self.parser
        method = parser.get_method()
        target = self._url
        if method == b"CONNECT" or not target.startswith(b"/"):
            raise BadRequest(
                "This is a reverse proxy: the request target must be a path, "
                "not an absolute URL or an authority."
            )
        headers = self._headers
        found = scan(headers)
        if parser.should_upgrade() and (found.chunked or found.content_length):
            # llhttp hands the bytes after an upgrade request's head to the new protocol
            raise BadRequest("A protocol upgrade request cannot carry a body.")
        if found.expect is not None and found.expect != b"100-continue":
            raise BadRequest("Unsupported Expect header.")
        http11 = parser.get_http_version() == "1.1"
        head = RequestHead(
            method=method,
            target=target,
            headers=headers,
            scan=found,
            keep_alive=parser.should_keep_alive() and not self.draining,
            http11=http11,
            chunked=found.chunked,
            expect_continue=found.expect is not None and http11,
            anthropic_version=found.anthropic_version,
        )
        exchange = Exchange(self.state, self, head)
        self._reading = exchange
        if self.active is None:
            self.active = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            self.pause_reading(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        if self._reading is not None:
            self._reading.on_request_body(body)

    def on_message_complete(self) -> None:
        exchange = self._reading
        self._reading = None
        if exchange is not None:
            exchange.on_request_complete()

    # ---------------------------------------------------------------- used by Exchange

    def close(self) -> None:
        """Close after what has been written, batched writes included."""
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Cut the connection; what the client was already owed goes first, so a truncated
        response is seen as truncated (no final chunk, or fewer bytes than announced)."""
        self.flush()
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self, reason: int = PAUSE_UPSTREAM) -> None:
        """Stop reading from the client for ``reason``; reading resumes once none is left."""
        if self.paused_by == 0 and self.transport is not None:
            self.transport.pause_reading()
        self.paused_by |= reason

    def resume_reading(self, reason: int = PAUSE_UPSTREAM) -> None:
        if not self.paused_by & reason:
            return
        self.paused_by &= ~reason
        if self.paused_by == 0 and self.transport is not None:
            self.transport.resume_reading()

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is not self.active:
            return  # a queued exchange that ended with the connection
        self.active = None
        if exchange.close_after or self.draining:
            self.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.active = nxt
            if not self.queue:
                self.resume_reading(PAUSE_PIPELINE)
            nxt.start()
            return
        self.idle_since = self.loop.time()

    # ---------------------------------------------------------------- server control

    def check_timeouts(self, now: float) -> None:
        config = self.state.config
        if self._head_bytes >= 0 and now - self._head_since > config.header_timeout:
            logger.info(
                "closing a connection whose request head took over %gs", config.header_timeout
            )
            self.abort()
            return
        for exchange in (self.active, self._reading):
            if exchange is not None:
                exchange.check_idle(now, config.idle_timeout)
        if (
            self.active is None
            and self._reading is None
            and self._head_bytes < 0
            and now - self.idle_since > config.keepalive_timeout
        ):
            self.close()

    def start_draining(self) -> None:
        self.draining = True
        if self.active is None and self._reading is None and self._head_bytes < 0:
            self.close()
        elif self.active is not None:
            self.active.close_after = True

    # ---------------------------------------------------------------- errors

    def _reject(self, error: ProxyError) -> None:
        """Answer a request that cannot be parsed or is refused before it has an exchange.

        Whatever that request had queued for the upstream is dropped: it never leaves.
        """
        if self.transport is None or self.transport.is_closing():
            return
        logger.info("rejected a request from %s: %d %s", self._peer(), error.status, error.message)
        reading, self._reading = self._reading, None
        if reading is not None and reading.response_started:
            self.abort()  # a response is under way: nothing sensible can follow it
            return
        earlier = self.active if self.active is not reading else None
        if earlier is None:
            self.write(render_error(error, family_of(self._url, False), close=True))
        if reading is not None:
            if reading in self.queue:
                self.queue.remove(reading)
            reading.abandon(error.status)
        if earlier is not None:
            earlier.close_after = True  # let the earlier response end, then close
            self.pause_reading(PAUSE_PIPELINE)
            return
        self.active = None
        self.close()

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    def _upgrade_requested(self) -> None:
        """An ``Upgrade`` request (h2c, websocket) is served as plain HTTP/1.1, as RFC 9110
        allows; what follows it on the connection is not read, and it closes afterwards."""
        active = self.active
        if active is None:
            self.close()
            return
        active.close_after = True
        self.pause_reading(PAUSE_PIPELINE)


def _parser_reason(exc: Exception) -> str:
    text = str(exc)
    return text if text.isprintable() and len(text) < 120 else type(exc).__name__


class ProxyServer:
    """The proxy's listener(s) and everything they share, from bind to shutdown."""

    def __init__(
        self,
        config: Config,
        auth: UpstreamAuth,
        *,
        sockets: Sequence[socket.socket] = (),
        upstream_ssl: ssl.SSLContext | None = None,
        serve_admin: bool = True,
    ) -> None:
        """``sockets``: already listening sockets (plain, then TLS) handed over by the
        supervisor; ``serve_admin`` False leaves the admin listener to the supervisor."""
        self.config = config
        self.auth = auth
        self._sockets = list(sockets)
        self._upstream_ssl = upstream_ssl
        self._serve_admin = serve_admin
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.tls_context: ssl.SSLContext | None = None
        self.metrics = Metrics() if config.admin.port is not None else None
        self.admin: AdminServer | None = None
        self.state: ServerState | None = None

    async def start(self) -> None:
        """Start the credential, bind the listener(s), the admin listener and the sweeper."""
        config = self.config
        pool = UpstreamPool(
            Origin(config.upstream_url),
            connect_timeout=config.connect_timeout,
            idle_timeout=config.pool_idle_timeout,
            ssl_context=self._upstream_ssl,
        )
        self.state = state = ServerState(config, self.auth, pool, self.metrics)
        self.auth.metrics = self.metrics
        if self.metrics is not None:
            self.metrics.bind_state(
                lambda: float(state.in_flight()),
                lambda: float(state.open_streams()),
                self.token_expires_in,
                lambda: 1.0 if self.readiness()[0] else 0.0,
            )
        await self.auth.start()
        loop = asyncio.get_running_loop()
        factory = lambda: ClientConnection(state)  # noqa: E731
        if config.tls.mode == "manual":
            self.tls_context = server_tls_context(config)
        plain_sock = self._sockets[0] if self._sockets else None
        tls_sock = self._sockets[1] if len(self._sockets) > 1 else None
        if plain_sock is not None:
            self._servers.append(await loop.create_server(factory, sock=plain_sock, backlog=2048))
        else:
            self._servers.append(
                await loop.create_server(
                    factory, config.bind_address, config.port, backlog=2048, reuse_address=True
                )
            )
        if self.tls_context is not None:
            if tls_sock is not None:
                tls = await loop.create_server(
                    factory, sock=tls_sock, ssl=self.tls_context, backlog=2048
                )
            else:
                tls = await loop.create_server(
                    factory,
                    config.bind_address,
                    config.tls.https_port,
                    ssl=self.tls_context,
                    backlog=2048,
                    reuse_address=True,
                )
            self._servers.append(tls)
        if self.metrics is not None and self._serve_admin and config.admin.port is not None:
            metrics = self.metrics
            self.admin = AdminServer(
                config.admin.bind_address,
                config.admin.port,
                lambda: self._exposition(metrics),
                self.readiness,
            )
            await self.admin.start()
        self._sweeper = loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        """The plain listener's real port (useful after binding port 0)."""
        return int(self._servers[0].sockets[0].getsockname()[1])

    @property
    def tls_port(self) -> int | None:
        if len(self._servers) < 2:
            return None
        return int(self._servers[1].sockets[0].getsockname()[1])

    def readiness(self) -> tuple[bool, str]:
        """Ready: an upstream credential is at hand and the proxy is not draining."""
        if self.state is None or self.state.draining:
            return False, "draining"
        if not self.auth.ready():
            return False, "no valid upstream credential"
        return True, "ok"

    def token_expires_in(self) -> float:
        expires = self.auth.token_expires_on
        return expires - time.time() if expires is not None else float("nan")

    def _sweep_interval(self) -> float:
        c = self.config
        shortest = min(c.idle_timeout, c.header_timeout, c.keepalive_timeout)
        return max(0.05, min(1.0, shortest / 4))

    async def _sweep(self) -> None:
        assert self.state is not None
        state = self.state
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._sweep_interval())
            now = loop.time()
            for conn in list(state.connections):
                conn.check_timeouts(now)
            if self.metrics is not None:
                self.metrics.refresh()
            flush_handlers()

    def _exposition(self, metrics: Metrics) -> bytes:
        if self.state is not None:
            self.state.batch.run_deferred()  # requests finished in this loop turn too
        return exposition(metrics)

    def reload(self, config: Config) -> None:
        """New client keys, log settings and TLS certificate; the rest needs a restart."""
        assert self.state is not None
        self.config = config
        self.state.reload(config)
        if self.tls_context is not None and config.tls.mode == "manual":
            try:
                load_certificate(self.tls_context, config)
            except (OSError, ssl.SSLError) as exc:
                logger.error("TLS certificate not reloaded, keeping the old one: %s", exc)
            else:
                logger.info("TLS certificate reloaded from %s", config.tls.cert_path)

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, drain in-flight exchanges up to ``timeout``, then abort the rest.

        Returns True when everything finished within the deadline.
        """
        state = self.state
        if state is None:
            return True
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        state.draining = True
        if self.metrics is not None:
            self.metrics.refresh()
        for server in self._servers:
            server.close()
        for conn in list(state.connections):
            conn.start_draining()
        drained = await self._wait_drained(timeout)
        for conn in list(state.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(state.tasks):
            task.cancel()
        if state.tasks:
            await asyncio.gather(*state.tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        state.pool.close()
        state.batch.run_deferred()  # the last requests' metrics and access lines
        if self.metrics is not None:
            self.metrics.refresh()  # with several workers: the last second's counts
        if self.admin is not None:
            await self.admin.close()
        await self.auth.close()
        return drained

    async def _wait_drained(self, timeout: float) -> bool:
        assert self.state is not None
        if not self.state.connections:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self.state.drained.wait()
        except TimeoutError:
            return False
        return True


def load_certificate(context: ssl.SSLContext, config: Config) -> None:
    assert config.tls.cert_path is not None
    context.load_cert_chain(config.tls.cert_path, config.tls.key_path)


def server_tls_context(config: Config) -> ssl.SSLContext:
    """The client-facing TLS context; ``load_cert_chain`` again on reload swaps the cert."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    load_certificate(context, config)
    return context


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound, listening socket; with ``reuse_port`` several workers can share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    if os.name == "posix":
        sock.set_inheritable(True)
    return sock
