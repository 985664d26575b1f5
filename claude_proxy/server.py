"""The listening side: an HTTP/1.1 server Protocol (llhttp via httptools) and its lifecycle.

:class:`ProxyServer` binds (port 0 allowed), serves, and shuts down in three steps: stop
accepting, let in-flight exchanges finish up to a deadline, then cut what is left.

A :class:`ClientConnection` is in one phase at a time, and each phase has one deadline, checked
by the server's sweeper::

    IDLE ──first byte──▶ HEAD ──head parsed──▶ EXCHANGE ──finished──▶ IDLE (or CLOSING)
    keepalive_timeout    header_timeout        idle_timeout          write timeout

Pipelining without acting ahead: while an exchange is under way, a request that follows it on
the connection stops reading the client (the pipeline's pause) and what was already read of it
is kept as plain data, a :class:`Queued` request, which runs no timer and writes nothing until
its turn comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import secrets
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, cast

import httptools

from .admin import AdminServer
from .batching import Batch, Batched
from .config import Config, UpstreamAuthConfig
from .credentials import UpstreamAuth, make_auth
from .errors import (
    BadRequest,
    HeadersTooLarge,
    ProxyError,
    UriTooLong,
    family_of,
    render_error,
)
from .flow import PIPELINE, ReadGate
from .headers import scan
from .identity import Authenticator, JwtValidator
from .limits import Limiter, needs_limiter
from .logs import flush_handlers
from .metrics import Metrics, exposition
from .relay import ABANDONED, Exchange, RequestHead
from .routing import Health, Router
from .telemetry import Telemetry, from_config
from .tls import CertificateError, load_certificate, server_tls_context
from .upstream import Origin, UpstreamPool

logger = logging.getLogger(__name__)

# A closing connection whose client takes no byte of what it is still owed for this long (or
# idle_timeout, if shorter) is cut; so is one lingering that long (reading and dropping what
# the client still sends, so that it reads the answer rather than a reset).
CLOSE_TIMEOUT: Final = 10.0
MAX_QUEUED_BODY: Final = 1024 * 1024
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
_NO_TRAILERS: Final[list[tuple[bytes, bytes]]] = []  # shared, never changed


class Phase(enum.Enum):
    IDLE = "idle"  # between requests: keepalive_timeout
    HEAD = "head"  # inside a request head: header_timeout
    EXCHANGE = "exchange"  # an exchange is under way: idle_timeout, judged by the exchange
    CLOSING = "closing"  # flushing what is owed, then closed: cut after CLOSE_TIMEOUT idle


IDLE, HEAD, EXCHANGE, CLOSING = Phase.IDLE, Phase.HEAD, Phase.EXCHANGE, Phase.CLOSING


class UpstreamTarget:
    """One upstream at run time: its pool, its credential and its standing (relay.Target)."""

    __slots__ = ("auth", "health", "host_header", "name", "pool", "prefix")

    def __init__(self, name: str, pool: UpstreamPool, auth: UpstreamAuth, health: Health):
        self.name = name
        self.pool = pool
        self.auth = auth
        self.health = health
        self.host_header = pool.origin.host_header
        self.prefix = pool.origin.prefix

    def __repr__(self) -> str:
        return f"UpstreamTarget({self.name!r}, {self.pool.origin!r})"


class ServerState:
    """What every connection shares: config, keys, upstreams, and owned tasks."""

    def __init__(
        self,
        config: Config,
        targets: Sequence[UpstreamTarget],
        metrics: Metrics | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.telemetry = telemetry
        self.validator = JwtValidator(config.client_jwt) if config.client_jwt else None
        self.authenticator = Authenticator(config, self.validator)
        self.limiter: Limiter | None = None
        if needs_limiter(config):
            self.limiter = Limiter(config.limits, observer=metrics)
            self.limiter.preload(config.client_keys())
        self.targets = tuple(targets)
        self.router = Router(config.targets(), config.routes)
        self.pool = self.targets[0].pool  # the first upstream's (the only one, usually)
        self.batch = self.pool.batch  # one per loop: every pool shares it
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.drained = asyncio.Event()
        self._ids = itertools.count(1)
        self._update_logging()
        self._id_prefix = secrets.token_hex(3)

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> asyncio.Task[None]:
        """Start a task the server owns: awaited or cancelled at shutdown. If it fails, the
        failure is logged with its traceback and ``on_error`` is told (so a client waiting on
        it gets an answer): no task fails silently."""
        task = asyncio.get_running_loop().create_task(_guarded(coro, on_error))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def next_request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):x}"

    def reload(self, config: Config) -> None:
        """Take new client keys and log settings without touching open connections."""
        if config.client_jwt != self.config.client_jwt:
            old, self.validator = (
                self.validator,
                (JwtValidator(config.client_jwt) if config.client_jwt else None),
            )
            if old is not None:
                self.spawn(old.close())
        self.config = config
        self.authenticator = Authenticator(config, self.validator)
        if self.limiter is not None:
            self.limiter.preload(config.client_keys())
        self._update_logging()

    def _update_logging(self) -> None:
        access = logging.getLogger("claude_proxy.access")
        self.access_log = access.isEnabledFor(logging.INFO) and not access.disabled
        self.read_usage = (
            self.access_log
            or self.metrics is not None
            or self.telemetry is not None
            or self.limiter is not None
        )

    def in_flight(self) -> int:
        return sum(1 for c in self.connections if c.active is not None)

    def open_streams(self) -> int:
        return sum(1 for c in self.connections if c.active is not None and c.active.streaming)


async def _guarded(
    coro: Coroutine[Any, Any, None], on_error: Callable[[BaseException], None] | None
) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.error("a request task failed", exc_info=exc)
        if on_error is not None:
            on_error(exc)


class Queued:
    """A pipelined request read while the one before it is under way: data, not an actor."""

    __slots__ = ("body", "body_bytes", "complete", "error", "head", "trailers")

    def __init__(self, head: RequestHead | None, error: ProxyError | None = None) -> None:
        self.head = head
        self.error = error
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.trailers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_request_body(self, data: bytes) -> None:
        self.body.append(data)
        self.body_bytes += len(data)
        if self.body_bytes > MAX_QUEUED_BODY:
            raise HeadersTooLarge("Pipelined request body too large to hold.")

    def on_request_complete(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = trailers
        self.complete = True


class ClientConnection(Batched, asyncio.Protocol):
    """One client's TCP (or TLS) connection, speaking HTTP/1.1."""

    __slots__ = (
        "_close_watch",
        "_head_bytes",
        "_head_size",
        "_headers",
        "_in_head",
        "_linger",
        "_trailers",
        "_url",
        "active",
        "draining",
        "gate",
        "loop",
        "parser",
        "phase",
        "phase_since",
        "queue",
        "reading",
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
        self.gate = ReadGate()
        self.active: Exchange | None = None  # whose response is owed next
        self.reading: Exchange | Queued | None = None  # whose body the parser is reading
        self.queue: deque[Queued] = deque()
        self.write_paused = False
        self.draining = state.draining
        self.phase = IDLE
        self.phase_since = self.loop.time()
        self._in_head = False  # the parser is inside a request head
        self._linger = False
        self._close_watch = -1
        self._head_bytes = 0  # raw bytes read since the head began
        self._head_size = 0  # bytes of the target and the complete header lines
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None  # made when a trailer comes

    def _enter(self, phase: Phase) -> None:
        """The one place the phase changes; its deadline counts from now (an exchange keeps
        its own clock, by the bytes it moves)."""
        self.phase = phase
        if phase is not EXCHANGE:
            self.phase_since = self.loop.time()

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.gate.attach(self.transport)
        self.state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        state.connections.discard(self)
        if state.draining and not state.connections:
            state.drained.set()
        self.phase = CLOSING
        active, self.active = self.active, None
        self.reading = None
        self.queue.clear()
        if active is not None:
            active.client_lost()

    def data_received(self, data: bytes) -> None:
        if self.phase is CLOSING:
            return  # lingering: what the client still sends is dropped
        if self._in_head:
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
            if self._in_head and self._head_bytes > self.state.config.max_header_bytes:
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
        self._trailers = None
        self._head_size = 0
        self._head_bytes = 0
        self._in_head = True
        if self.active is None:
            self._enter(HEAD)
        else:
            # a pipelined request: the client is not read again until its turn
            self.gate.pause(PIPELINE)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.state.config.max_header_bytes:
            raise UriTooLong("Request target too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # a trailer: never one of the head's fields
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
            return
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        config = self.state.config
        if len(self._headers) > config.max_headers:
            raise HeadersTooLarge("Too many request headers.")
        if self._head_size + len(self._url) > config.max_header_bytes:
            raise HeadersTooLarge("Request head too large.")

    def on_headers_complete(self) -> None:
        self._in_head = False
        head = self._request_head()
        if self.active is None:
            self._start(head)
        else:
            queued = Queued(head)
            self.queue.append(queued)
            self.reading = queued

    def on_body(self, body: bytes) -> None:
        reading = self.reading
        if reading is not None:
            reading.on_request_body(body)

    def on_message_complete(self) -> None:
        reading, self.reading = self.reading, None
        trailers, self._trailers = self._trailers or _NO_TRAILERS, None
        if reading is not None:
            reading.on_request_complete(trailers)

    # ---------------------------------------------------------------- requests

    def _request_head(self) -> RequestHead:
        """The parsed head, or BadRequest for what no server may accept (RFC 9112)."""
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
        http11 = parser.get_http_version() == "1.1"
        # §3.2: 400 for an HTTP/1.1 request without Host, and for any with more than one
        if found.hosts > 1 or (http11 and found.hosts == 0):
            raise BadRequest("A request must carry exactly one Host header.")
        # §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing; answer, then close
        if found.transfer_encoding and not http11:
            raise BadRequest("Transfer-Encoding is not allowed in an HTTP/1.0 request.")
        if parser.should_upgrade() and (found.chunked or found.content_length):
            # llhttp hands the bytes after an upgrade request's head to the new protocol
            raise BadRequest("A protocol upgrade request cannot carry a body.")
        if found.expect is not None and found.expect != b"100-continue":
            raise BadRequest("Unsupported Expect header.")
        return RequestHead(
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

    def _start(self, head: RequestHead, queued: Queued | None = None) -> None:
        exchange = Exchange(self.state, self, head)
        self.active = exchange
        if queued is None or self.reading is queued:
            self.reading = exchange  # its body (or the rest of it) comes from the parser
        self._enter(EXCHANGE)
        exchange.start()
        if queued is not None:
            for part in queued.body:  # what was read of it, as if it had just arrived
                exchange.on_request_body(part)
            if queued.complete:
                exchange.on_request_complete(queued.trailers)

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is not self.active:
            return
        self.active = None
        if self.reading is exchange:
            self.reading = None
        if exchange.close_after or self.draining:
            self._close(linger=exchange.req is ABANDONED)
            return
        if self.queue:
            queued = self.queue.popleft()
            if queued.head is None:
                self._answer_and_close(queued.error or BadRequest("Malformed HTTP request."))
                return
            self._start(queued.head, queued)
        else:
            self._enter(HEAD if self._in_head else IDLE)
        if not self.queue and self.gate.owners & PIPELINE and self.phase is not CLOSING:
            self.gate.resume(PIPELINE)  # nothing parsed is waiting: read what comes next

    # ---------------------------------------------------------------- used by Exchange

    def peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""

    def _close(self, *, linger: bool = False) -> None:
        """Close after what has been written, batched writes included. ``linger``: the client
        may still be sending; half-close and drop what comes so that it reads the answer
        rather than a reset (RFC 9112 §9.6)."""
        if self.phase is CLOSING:
            return
        self._enter(CLOSING)
        self.flush()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if linger and transport.can_write_eof():
            self._linger = True
            transport.write_eof()
            self.gate.resume_all()
        else:
            transport.close()

    def close(self) -> None:
        self._close()

    def abort(self, reset: bool = False) -> None:
        """Cut the connection; what the client was already owed goes first, so a truncated
        response is seen as truncated (no final chunk, or fewer bytes than announced).

        ``reset``: the body being cut is delimited by the close, where a plain close would
        read as its proper end; a TCP reset (SO_LINGER 0) is the only way to say it is not.
        """
        self.flush()
        self.phase = CLOSING
        transport = self.transport
        if transport is None:
            return
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()

    # ---------------------------------------------------------------- server control

    def check_timeouts(self, now: float) -> None:
        """The deadline of the current phase (the sweeper calls this)."""
        config = self.state.config
        phase = self.phase
        if phase is EXCHANGE:
            if self.active is not None:
                self.active.check_idle(now, config.idle_timeout)
        elif phase is IDLE:
            if now - self.phase_since > config.keepalive_timeout:
                self._close()
        elif phase is HEAD:
            if now - self.phase_since > config.header_timeout:
                logger.info(
                    "closing a connection whose request head took over %gs",
                    config.header_timeout,
                )
                self.abort()
        elif self.transport is not None:
            # CLOSING: cut a client that takes nothing more, or lingers too long
            size = self.transport.get_write_buffer_size()
            if size != self._close_watch and size > 0:
                self._close_watch = size
                self.phase_since = now
            elif now - self.phase_since > min(config.idle_timeout, CLOSE_TIMEOUT):
                self.abort()

    def start_draining(self) -> None:
        self.draining = True
        if self.phase is IDLE:
            self._close()
        elif self.active is not None:
            self.active.close_after = True

    def drain_cut(self) -> None:
        """The shutdown deadline passed: cut what is still running."""
        if self.active is not None:
            self.active.drain_cut()
        self.abort()

    # ---------------------------------------------------------------- errors

    def _reject(self, error: ProxyError) -> None:
        """A request that cannot be parsed or is refused by its head: answer it in its turn.

        The parser is dead after an error, so nothing after it is read; whatever that request
        had queued for the upstream is dropped: it never leaves.
        """
        if self.transport is None or self.transport.is_closing() or self.phase is CLOSING:
            return
        logger.info("rejected a request from %s: %d %s", self.peer(), error.status, error.message)
        self.gate.pause(PIPELINE)  # nothing more can be parsed
        self._in_head = False
        active, reading = self.active, self.reading
        self.reading = None
        if active is None:
            self._answer_and_close(error)
        elif reading is active:
            active.close_after = True
            active.reject_request(error)
        else:
            self.queue.append(Queued(None, error))  # answered once the one before is done
            active.close_after = True

    def _answer_and_close(self, error: ProxyError) -> None:
        head_request = self.parser.get_method() == b"HEAD" if self._url else False
        self.write(
            render_error(error, family_of(self._url, False), close=True, head_request=head_request)
        )
        self._close()

    def _upgrade_requested(self) -> None:
        """An ``Upgrade`` request (h2c, websocket) is served as plain HTTP/1.1, as RFC 9110
        allows; what follows it on the connection is not read, and it closes afterwards."""
        self.gate.pause(PIPELINE)
        active = self.active
        if active is None:
            self._close()
            return
        active.close_after = True


def _parser_reason(exc: Exception) -> str:
    text = str(exc)
    return text if text.isprintable() and len(text) < 120 else type(exc).__name__


class ProxyServer:
    """The proxy's listener(s) and everything they share, from bind to shutdown."""

    def __init__(
        self,
        config: Config,
        auth: UpstreamAuth | None,
        *,
        sockets: Sequence[socket.socket] = (),
        upstream_ssl: ssl.SSLContext | None = None,
        serve_admin: bool = True,
        worker: int | None = None,
    ) -> None:
        """``auth``: the credential for ``[upstream_auth]`` (None when there is none); an
        upstream with its own ``[upstreams.auth]`` gets one made here. ``sockets``: already
        listening sockets (plain, then TLS) handed over by the supervisor; ``serve_admin``
        False leaves the admin listener to the supervisor."""
        self.config = config
        self.auths: dict[UpstreamAuthConfig, UpstreamAuth] = {}
        if auth is not None and config.upstream_auth is not None:
            self.auths[config.upstream_auth] = auth
        for target in config.targets():
            assert target.auth is not None  # resolved by Config.targets()
            if target.auth not in self.auths:
                self.auths[target.auth] = make_auth(target.auth)
        self.auth = next(iter(self.auths.values()))  # the first upstream's, for its token
        self._sockets = list(sockets)
        self._upstream_ssl = upstream_ssl
        self._serve_admin = serve_admin
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.tls_context: ssl.SSLContext | None = None
        self.metrics = (
            Metrics(max_models=config.admin.max_model_labels)
            if config.admin.port is not None
            else None
        )
        self.admin: AdminServer | None = None
        self.state: ServerState | None = None
        self.telemetry = from_config(config, worker=worker)  # ConfigError: exit code 2

    async def start(self) -> None:
        """Start the credential, bind the listener(s), the admin listener and the sweeper."""
        config = self.config
        batch = Batch()
        targets = []
        for up in config.targets():
            assert up.auth is not None
            pool = UpstreamPool(
                Origin(up.url),
                connect_timeout=config.connect_timeout,
                idle_timeout=config.pool_idle_timeout,
                ssl_context=self._upstream_ssl,
                batch=batch,
            )
            targets.append(
                UpstreamTarget(up.name, pool, self.auths[up.auth], Health(config.failover))
            )
        self.state = state = ServerState(config, targets, self.metrics, self.telemetry)
        for auth in self.auths.values():
            auth.metrics = self.metrics
        if self.metrics is not None:
            self.metrics.bind_state(
                lambda: float(state.in_flight()),
                lambda: float(state.open_streams()),
                self.token_expires_in,
                lambda: 1.0 if self.readiness()[0] else 0.0,
            )
            if config.upstreams:
                self.metrics.bind_upstreams(
                    [(t.name, _standing(t.health), _recovers_in(t.health)) for t in targets]
                )
        for auth in self.auths.values():
            await auth.start()
        if state.validator is not None:
            state.spawn(state.validator.refresh())  # the issuer's keys, before the first token
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
                usage=state.limiter.usage if state.limiter is not None else None,
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
        """Ready: the proxy is not draining and at least one upstream is usable (its
        credential at hand, not cooling down, its circuit not open)."""
        state = self.state
        if state is None or state.draining:
            return False, "draining"
        if not any(t.auth.ready() for t in state.targets):
            return False, "no valid upstream credential"
        now = time.monotonic()
        if not any(t.auth.ready() and t.health.usable(now) for t in state.targets):
            return False, "every upstream is cooling down or unreachable"
        return True, "ok"

    def token_expires_in(self) -> float:
        """Seconds until the first upstream token expires (NaN with static keys only)."""
        ends = [a.token_expires_on for a in self.auths.values()]
        expires = min((e for e in ends if e is not None), default=None)
        return expires - time.time() if expires is not None else float("nan")

    def _sweep_interval(self) -> float:
        c = self.config
        shortest = min(
            c.idle_timeout,
            c.header_timeout,
            c.keepalive_timeout,
            c.pool_idle_timeout,
            CLOSE_TIMEOUT,
        )
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
            for target in state.targets:
                target.pool.reap(now)
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
            except CertificateError as exc:
                logger.error("TLS certificate not reloaded, keeping the old one: %s", exc)
            else:
                logger.info("TLS certificate reloaded from %s", config.tls.cert_path)

    def stop_accepting(self) -> None:
        """The first step of a shutdown: the listeners close now, open connections are told
        to finish what they are doing and close. Calling it again does nothing more."""
        state = self.state
        if state is None or state.draining:
            return
        state.draining = True
        if self.metrics is not None:
            self.metrics.refresh()
        for server in self._servers:
            server.close()
        for conn in list(state.connections):
            conn.start_draining()

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, drain in-flight exchanges up to ``timeout``, then abort the rest.

        Returns True when everything finished within the deadline.
        """
        state = self.state
        if state is None:
            return True
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        self.stop_accepting()
        drained = await self._wait_drained(timeout)
        for conn in list(state.connections):
            conn.drain_cut()
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
        for target in state.targets:
            target.pool.close()
        state.batch.run_deferred()  # the last requests' metrics and access lines
        if self.telemetry is not None:
            await self.telemetry.aclose(5.0)  # bounded, even with the collector down
        if state.limiter is not None:
            await state.limiter.close()  # the last token counts reach Redis
        if state.validator is not None:
            await state.validator.close()
        if self.metrics is not None:
            self.metrics.refresh()  # with several workers: the last second's counts
        if self.admin is not None:
            await self.admin.close()
        for auth in self.auths.values():
            await auth.close()
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


def _standing(health: Health) -> Callable[[], str]:
    return lambda: health.standing_at(time.monotonic()).value


def _recovers_in(health: Health) -> Callable[[], float]:
    return lambda: health.recovers_in(time.monotonic())


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
