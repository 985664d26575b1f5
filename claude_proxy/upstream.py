"""Connections to the upstream: an asyncio Protocol per connection, and a keep-alive pool.

Responses are parsed by llhttp (httptools); every parser event is handed to the exchange that owns
the connection at that moment. An idle pooled connection belongs to nobody: if the upstream closes
it, it simply leaves the pool.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import httptools

from .batching import Batch, Batched

if TYPE_CHECKING:
    from .relay import Exchange

logger = logging.getLogger(__name__)

MAX_IDLE = 512


class _HeadResponseDone(Exception):
    """Stops llhttp after the head of a response to HEAD: it cannot be told there is no body."""


class UpstreamConnection(Batched, asyncio.Protocol):
    __slots__ = (
        "_headers",
        "_in_body",
        "_reason",
        "_trailers",
        "closed",
        "exchange",
        "idle_since",
        "keep_alive",
        "parser",
        "pool",
        "read_paused",
        "reused",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        Batched.__init__(self, pool.batch)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.reused = False
        self.closed = False
        self.read_paused = False
        self.keep_alive = True
        self.idle_since = 0.0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._in_body = False

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection cannot belong to any request: never reuse it.
            self.close()
            return
        opened = self.batch.begin()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _HeadResponseDone):
                logger.error("internal error while relaying a response", exc_info=exc.__context__)
                exchange.upstream_broken("the proxy failed while relaying the response")
        except httptools.HttpParserUpgrade:
            exchange.upstream_broken("the upstream switched protocols, which is not supported")
        except httptools.HttpParserError as exc:
            exchange.upstream_broken(f"the upstream sent a malformed response ({exc})")
        finally:
            if opened:
                self.batch.end()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_resumed()

    # ---------------------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        self._reason = b""
        self._headers = []
        self._trailers = []
        self._in_body = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        (self._trailers if self._in_body else self._headers).append((name, value))

    def on_headers_complete(self) -> None:
        self._in_body = True
        status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        exchange = self.exchange
        assert exchange is not None
        exchange.on_response_head(status, self._reason, self._headers)
        if exchange.head.method == b"HEAD" and status >= 200:
            self.keep_alive = False  # what follows in the stream is unknowable: do not reuse
            exchange.on_response_complete(())
            raise _HeadResponseDone

    def on_body(self, body: bytes) -> None:
        assert self.exchange is not None
        self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if self.parser.get_status_code() < 200:
            return  # an interim response; the final one follows on the same parser
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        exchange.on_response_complete(self._trailers)

    # ---------------------------------------------------------------- control

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Abort: used whenever the connection's state is not known to be clean."""
        self.exchange = None
        self._out = None
        if self.transport is not None and not self.closed:
            self.closed = True
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
    ) -> None:
        self.origin = origin
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.ssl = (ssl_context or client_ssl_context()) if origin.tls else None
        self.batch = Batch()
        self._idle: list[UpstreamConnection] = []
        self._loop = asyncio.get_running_loop()
        self.connects = 0

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection that is still open and has not idled too long, if any."""
        oldest_ok = self._loop.time() - self.idle_timeout
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if conn.idle_since < oldest_ok:
                conn.close()
                continue
            return conn
        return None

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
        """Give back a connection whose last exchange ended cleanly."""
        conn.exchange = None
        if conn.closed or not conn.keep_alive or len(self._idle) >= MAX_IDLE:
            conn.close()
            return
        conn.resume_reading()  # an idle connection must notice the upstream closing it
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
