"""Connections to the upstream: an asyncio Protocol per connection, and a keep-alive pool.

Responses are parsed by llhttp (httptools); every parser event is handed to the exchange that
holds the connection at that moment. A connection is in one state::

    IDLE (pooled, nobody's) ──attach──▶ ACTIVE ──response complete──▶ COMPLETE ──▶ IDLE
                                          └── anything unclean ──▶ CLOSED

A connection goes back to the pool only once the read that completed its response has been
parsed to its end without a stray byte: bytes after a complete response (a 204 with a body,
more than Content-Length, anything at all on an idle connection) mean the stream is not what it
seems, and such a connection is closed, never reused.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from .batching import Batch, Batched
from .flow import CLIENT_FULL, ReadGate

logger = logging.getLogger(__name__)

MAX_IDLE = 512


class ResponseSink(Protocol):
    """What a connection tells the exchange holding it (relay.Exchange)."""

    head_method: bytes

    def on_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_complete(self, trailers: list[tuple[bytes, bytes]]) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_broken(self, reason: str) -> None: ...
    def upstream_write_paused(self) -> None: ...
    def upstream_write_resumed(self) -> None: ...


class Conn(enum.Enum):
    IDLE = "idle"
    ACTIVE = "active"
    COMPLETE = "complete"  # its response is complete; pooled once this read is parsed
    CLOSED = "closed"


IDLE, ACTIVE, COMPLETE, CLOSED = Conn.IDLE, Conn.ACTIVE, Conn.COMPLETE, Conn.CLOSED


class _Stop(Exception):
    """Stops llhttp: after the head of a response to HEAD (it cannot be told there is no
    body), or at the start of a message that has no business being there."""


class UpstreamConnection(Batched, asyncio.Protocol):
    __slots__ = (
        "_headers",
        "_in_body",
        "_reason",
        "_trailers",
        "exchange",
        "gate",
        "idle_since",
        "keep_alive",
        "parser",
        "pool",
        "reused",
        "state",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        Batched.__init__(self, pool.batch)
        self.transport: asyncio.Transport | None = None
        self.gate = ReadGate()
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: ResponseSink | None = None
        self.state = IDLE
        self.reused = False
        self.keep_alive = True
        self.idle_since = 0.0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._in_body = False

    @property
    def closed(self) -> bool:
        return self.state is CLOSED

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.gate.attach(self.transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or self.state is not ACTIVE:
            # Bytes on an idle connection cannot belong to any request: never reuse it.
            self.close()
            return
        opened = self.batch.begin()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if self.state is COMPLETE:
                self.close()  # a message after the complete one: the stream is not clean
            elif self.state is ACTIVE and not isinstance(cause, _Stop):
                logger.error("internal error while relaying a response", exc_info=cause)
                self._broken(exchange, "the proxy failed while relaying the response")
        except httptools.HttpParserUpgrade:
            self._broken(exchange, "the upstream switched protocols, which is not supported")
        except httptools.HttpParserError as exc:
            self._broken(exchange, f"the upstream sent a malformed response ({exc})")
        finally:
            if opened:
                self.batch.end()
        if self.state is COMPLETE:
            self.pool.release(self)  # parsed to the end: nothing stray followed the response
        elif self.state is not ACTIVE:
            self.close()

    def _broken(self, exchange: ResponseSink, reason: str) -> None:
        state = self.state
        self.close()
        if state is ACTIVE:
            exchange.upstream_broken(reason)
        # COMPLETE: garbage after a complete response; that exchange is done, the socket goes

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        state, exchange = self.state, self.exchange
        self.state = CLOSED
        self.exchange = None
        self.pool.forget(self)
        if state is ACTIVE and exchange is not None:
            exchange.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_resumed()

    # ---------------------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        if self.state is not ACTIVE:
            raise _Stop  # a second message after a complete one: nobody asked for it
        self._reason = b""
        self._headers = []
        self._trailers = []
        self._in_body = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        (self._trailers if self._in_body else self._headers).append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        status = self.parser.get_status_code()
        if status >= 200:
            self._in_body = True
            self.keep_alive = self.parser.should_keep_alive()
        exchange.on_response_head(status, self._reason, self._headers)
        if status >= 200 and exchange.head_method == b"HEAD":
            self.keep_alive = False  # what follows in the stream is unknowable: do not reuse
            exchange.on_response_complete([])
            raise _Stop

    def on_body(self, body: bytes) -> None:
        assert self.exchange is not None
        self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if self.parser.get_status_code() < 200:
            self._headers = []
            return  # an interim response; the final one follows on the same parser
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        exchange.on_response_complete(self._trailers)

    # ---------------------------------------------------------------- used by the exchange

    def attach(self, exchange: ResponseSink) -> None:
        self.exchange = exchange
        self.state = ACTIVE

    def finish(self, reusable: bool) -> None:
        """The exchange lets go: ``reusable`` after a clean, complete response to a completely
        sent request (pooled once the current read is parsed), else closed."""
        self.exchange = None
        if self.state is ACTIVE and reusable and self.keep_alive:
            self.state = COMPLETE
        else:
            self.close()

    def close(self) -> None:
        """Abort: used whenever the connection's state is not known to be clean."""
        self.exchange = None
        self._out = None
        if self.state is not CLOSED:
            self.state = CLOSED
            if self.transport is not None:
                self.transport.abort()
        self.pool.forget(self)


class Origin:
    """Where the upstream is: scheme, host, port, the path prefix and the ``Host`` value."""

    __slots__ = ("host", "host_header", "port", "prefix", "tls")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        default_port = 443 if self.tls else 80
        netloc_host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (
            netloc_host if self.port == default_port else f"{netloc_host}:{self.port}"
        ).encode("ascii")
        self.prefix = parts.path.rstrip("/").encode("ascii")

    def __repr__(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"Origin({scheme}://{self.host_header.decode()}{self.prefix.decode()})"


def client_ssl_context() -> ssl.SSLContext:
    """Verification on, system trust (``SSL_CERT_FILE`` honoured), HTTP/1.1 by ALPN."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpstreamPool:
    """Keep-alive connections to one origin; the most recently used idle one is reused first."""

    def __init__(
        self,
        origin: Origin,
        *,
        connect_timeout: float,
        idle_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        batch: Batch | None = None,
    ) -> None:
        self.origin = origin
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.ssl = (ssl_context or client_ssl_context()) if origin.tls else None
        self.batch = batch or Batch()  # the loop's batch, shared with every other pool
        self._idle: list[UpstreamConnection] = []
        self._loop = asyncio.get_running_loop()
        self.connects = 0

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection that is still open and has not idled too long, if any.

        One seen closed is skipped before any byte of a request is written to it: that is
        the only case in which sending elsewhere is always safe."""
        oldest_ok = self._loop.time() - self.idle_timeout
        while self._idle:
            conn = self._idle.pop()
            if conn.state is not IDLE:
                continue
            if conn.idle_since < oldest_ok:
                conn.close()
                continue
            return conn
        return None

    def reap(self, now: float) -> int:
        """Close pooled connections idle for longer than ``pool_idle_timeout``; how many."""
        oldest_ok = now - self.idle_timeout
        stale = [c for c in self._idle if c.idle_since < oldest_ok]
        for conn in stale:
            conn.close()
        return len(stale)

    async def connect(self) -> UpstreamConnection:
        """A new connection; raises TimeoutError after ``connect_timeout`` or OSError."""
        origin = self.origin
        self.connects += 1
        async with asyncio.timeout(self.connect_timeout):
            _, protocol = await self._loop.create_connection(
                lambda: UpstreamConnection(self),
                origin.host,
                origin.port,
                ssl=self.ssl,
                server_hostname=origin.host if self.ssl else None,
            )
        return protocol

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose last exchange ended cleanly (or never began)."""
        conn.exchange = None
        if conn.state is CLOSED or not conn.keep_alive or len(self._idle) >= MAX_IDLE:
            conn.close()
            return
        conn.state = IDLE
        conn.gate.resume(CLIENT_FULL)  # an idle connection must notice the upstream closing it
        conn.reused = True
        conn.idle_since = self._loop.time()
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @property
    def idle_count(self) -> int:
        return len(self._idle)
