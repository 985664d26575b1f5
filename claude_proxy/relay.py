"""One request's journey: authenticate, open upstream, relay the body, relay the response.

An :class:`Exchange` is driven by parser events from both sides and does its work in those
callbacks, so a request that finds a valid token and a pooled connection needs no task at all.
Only waiting (for a token on a cold start, or for a new upstream connection) runs in a task,
which the server owns.

Body bytes are written as they arrive, never gathered: a chunked body is re-chunked (llhttp
hands over the chunk payloads), a sized body goes as is. Backpressure runs both ways through
``pause_reading`` on the side that produces faster than the other consumes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from . import headers as hdr
from . import usage as usage_
from .client_auth import PASSTHROUGH, REJECTED, authenticate, presented
from .errors import (
    BadRequest,
    CredentialUnavailable,
    ProxyError,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnavailable,
    family_of,
    render_error,
)
from .metrics import route_of
from .upstream import UpstreamConnection
from .usage import StreamReader

if TYPE_CHECKING:
    from .server import ClientConnection, RequestHead, ServerState

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("claude_proxy.access")

# Request body held while the upstream connection is being opened, before reading pauses.
PENDING_HIGH_WATER: Final = 256 * 1024
# A request body up to this size is kept until the response starts, so that a request sent on a
# pooled connection the upstream had just closed can be sent again on a new one.
REPLAY_LIMIT: Final = 1024 * 1024
# A rejected request's body is read and dropped up to this size, so the client sees the
# response rather than a reset; past it the connection is closed.
DISCARD_LIMIT: Final = 16 * 1024 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
TERMINATOR: Final = b"0\r\n\r\n"
NO_BODY_STATUS: Final = frozenset({204, 304})


class Exchange:
    """A request/response pair between one client connection and one upstream connection."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "chunked_out",
        "client",
        "close_after",
        "credential",
        "discarded",
        "family",
        "finished",
        "head",
        "key_name",
        "pending",
        "pending_bytes",
        "replay",
        "replay_bytes",
        "reply",
        "request_done",
        "response_done",
        "response_started",
        "retried",
        "sent_all",
        "state",
        "status",
        "stream_reader",
        "t_end",
        "t_first",
        "t_start",
        "task",
        "until_close",
        "upstream",
        "upstream_head",
        "watch_bytes",
        "watch_since",
        "wrote_error",
        "wrote_upstream",
    )

    def __init__(self, state: ServerState, client: ClientConnection, head: RequestHead) -> None:
        self.state = state
        self.client = client
        self.head = head
        self.family = family_of(head.target, head.anthropic_version)
        self.key_name: str | None = None
        self.credential: hdr.UpstreamCredential | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_head = b""
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] | None = []
        self.pending_bytes = 0
        self.replay: list[bytes] | None = None
        self.replay_bytes = 0
        self.retried = False
        self.wrote_upstream = False
        self.sent_all = False
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.wrote_error = False
        self.finished = False
        self.chunked_out = False
        self.until_close = False
        self.close_after = not head.keep_alive
        self.discarded = 0
        self.status = 0
        self.reply: list[bytes] | None = None  # a JSON reply kept for its usage until complete
        self.stream_reader: StreamReader | None = None  # an event stream's usage, as it comes
        self.bytes_in = 0
        self.bytes_out = 0
        self.t_start = time.perf_counter()
        self.t_first = 0.0
        self.t_end = 0.0
        self.watch_bytes = -1
        self.watch_since = 0.0

    @property
    def streaming(self) -> bool:
        """An event stream is being relayed (and read for usage: only known when it is)."""
        return self.stream_reader is not None

    # ================================================================ start

    def start(self) -> None:
        """Authenticate, pick the credential, and open the upstream; answer errors directly."""
        state = self.state
        head = self.head
        try:
            creds = presented(head.headers, head.scan.lnames)
            self.key_name = authenticate(
                creds, state.keyring, state.config.passthrough_unauthenticated
            )
            if self.key_name is None:
                self._build_upstream_head()
            else:
                credential = state.auth.credential_now()
                if credential is None:  # cold start: a token is on its way
                    self.task = state.spawn(self._start_slow())
                    return
                self.credential = credential
                self._build_upstream_head()
        except Unauthorized as exc:
            self.key_name = REJECTED
            self.respond_error(exc)
            return
        except ProxyError as exc:
            self.respond_error(exc)
            return
        self._open_upstream()

    async def _start_slow(self) -> None:
        try:
            self.credential = await self.state.auth.credential_wait()
        except ProxyError as exc:
            self.task = None
            self.respond_error(exc)
            return
        self._build_upstream_head()
        await self._connect()

    def _upstream_error(self, kind: str) -> None:
        if self.state.metrics is not None:
            self.state.metrics.upstream_error(kind)

    def _build_upstream_head(self) -> None:
        state = self.state
        head = self.head
        self.upstream_head = hdr.upstream_request_head(
            head.method,
            head.target,
            head.headers,
            host=state.origin.host_header,
            prefix=state.origin.prefix,
            credential=self.credential,
            chunked=head.chunked,
            default_header=b"x-api-key" if self.family == "anthropic" else b"Authorization",
            scanned=head.scan,
        )

    def _open_upstream(self) -> None:
        conn = self.state.pool.take_idle()
        if conn is not None:
            self._attach(conn)
        else:
            self.task = self.state.spawn(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.state.pool.connect()
        except TimeoutError:
            self._upstream_error("connect_timeout")
            self.respond_error(UpstreamTimeout(self._connect_timeout_message()))
            return
        except OSError as exc:
            self._upstream_error("connect_refused")
            self.respond_error(UpstreamUnavailable(_connect_failed(exc)))
            return
        finally:
            self.task = None
        self._attach(conn)

    def _connect_timeout_message(self) -> str:
        timeout = self.state.config.connect_timeout
        return f"Timed out connecting to the upstream after {timeout:g} s."

    def _attach(self, conn: UpstreamConnection) -> None:
        if self.finished or self.response_started:
            self.state.pool.release(conn)
            return
        self.upstream = conn
        conn.exchange = self
        if self.client.write_paused:
            conn.pause_reading()  # the client is not taking what it is sent: wait with it
        pending = self.pending or []
        self.pending = None
        out = [self.upstream_head, *pending]
        if conn.reused and not self.retried:
            self.replay = out  # kept (not copied) until the response starts
            self.replay_bytes = len(self.upstream_head) + self.pending_bytes
        # Resume before writing: if this write fills the upstream's buffer, its pause_writing
        # must be the last word on whether the client is read.
        self.client.resume_reading()
        conn.write(b"".join(out) if len(out) > 1 else out[0])
        self.wrote_upstream = True
        self.sent_all = self.request_done
        if self.head.expect_continue and not self.request_done:
            self.client.write(CONTINUE)

    # ================================================================ request body (client side)

    def on_request_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.response_done or self.wrote_error:
            self._discard(len(data))
            return
        if self.head.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._send_upstream(data)

    def on_request_complete(self) -> None:
        self.request_done = True
        if self.head.chunked and not (self.response_done or self.wrote_error):
            self._send_upstream(TERMINATOR)
        if self.upstream is not None:
            self.sent_all = True
        if self.response_done:
            self._finish()

    def _send_upstream(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is None:
            if self.pending is not None:
                self.pending.append(data)
                self.pending_bytes += len(data)
                if self.pending_bytes > PENDING_HIGH_WATER:
                    self.client.pause_reading()
            return
        if self.replay is not None:
            self.replay.append(data)
            self.replay_bytes += len(data)
            if self.replay_bytes > REPLAY_LIMIT:
                self.replay = None
        upstream.write(data)

    def _discard(self, n: int) -> None:
        self.discarded += n
        if self.discarded > DISCARD_LIMIT:
            self.close_after = True
            self.client.abort()

    # ================================================================ response (upstream side)

    def on_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        if status < 200:
            # 100 was ours to send, 101 was never asked for (llhttp stops there); 103 goes on
            if status not in (100, 101):
                self.client.write(hdr.interim_response_head(status, reason, headers))
            return
        self.replay = None
        self.status = status
        self.response_started = True
        self.t_first = time.perf_counter()
        found = hdr.scan(headers)
        has_body = self.head.method != b"HEAD" and status not in NO_BODY_STATUS
        chunked = has_body and found.chunked
        if chunked and not self.head.http11:
            chunked = False
            self.close_after = True  # an HTTP/1.0 client: the end of the body is the close
        elif has_body and not chunked and found.content_length is None:
            self.until_close = self.close_after = True  # close-delimited upstream body
        self.chunked_out = chunked
        if self.state.read_usage and has_body:
            kind = usage_.kind_of(found)
            if kind == usage_.JSON:
                self.reply = []
            elif kind == usage_.STREAM:
                self.stream_reader = StreamReader()
        if self.client.draining:
            self.close_after = True
        self.client.write(
            hdr.client_response_head(
                status, reason, headers, chunked=chunked, close=self.close_after, scanned=found
            )
        )
        if status == 401 and self.credential is not None and self.credential.kind == "bearer":
            self.state.auth.rejected(self.credential)

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.chunked_out:
            self.client.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.client.write(data)
        reply = self.reply
        if reply is not None:
            if self.bytes_out <= usage_.MAX_JSON:
                reply.append(data)
            else:
                self.reply = None
        elif self.stream_reader is not None and self.stream_reader.look(data):
            # scanned once the bytes are on their way
            self.state.batch.defer(self.stream_reader.scan, data)

    def on_response_complete(self, trailers: list[tuple[bytes, bytes]] | tuple[()]) -> None:
        if self.chunked_out:
            if trailers:
                lines = b"".join(b"%b: %b\r\n" % pair for pair in trailers)
                self.client.write(b"0\r\n" + lines + b"\r\n")
            else:
                self.client.write(TERMINATOR)
        self.response_done = True
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            if self.sent_all:
                self.state.pool.release(upstream)
            else:
                upstream.close()  # the upstream answered before the whole request went
        if self.request_done:
            self._finish()

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream connection closed before the response was complete."""
        self.upstream = None
        if self.finished:
            return
        if not self.response_started:
            if self.replay is not None and conn.reused and not self.retried:
                self._retry()
                return
            self._upstream_error("closed")
            self.respond_error(
                UpstreamUnavailable("The upstream closed the connection before sending a response.")
            )
            return
        if self.until_close:
            self.response_done = True  # a close-delimited body ends with the close
            self.client.close()
            self._finish()
            return
        self._upstream_error("closed")
        self._abort_client("the upstream closed the connection mid-response")

    def upstream_broken(self, reason: str) -> None:
        """The upstream spoke something that is not HTTP/1.1; drop its connection."""
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.close()
        if self.finished:
            return
        self._upstream_error("malformed")
        if self.response_started:
            self._abort_client(reason)
        else:
            logger.warning("upstream error: %s", reason)
            self.respond_error(UpstreamUnavailable("The upstream sent a malformed response."))

    def _retry(self) -> None:
        """Send the request again on a new connection: the pooled one was closed under us."""
        logger.debug("pooled upstream connection was closed; retrying on a new one")
        self.retried = True
        self.pending = (self.replay or [])[1:]  # [0] is the head, which _attach writes again
        self.replay = None
        self.task = self.state.spawn(self._connect())

    # ================================================================ flow control

    def upstream_write_paused(self) -> None:
        self.client.pause_reading()

    def upstream_write_resumed(self) -> None:
        self.client.resume_reading()

    def client_write_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def client_write_resumed(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # ================================================================ endings

    def respond_error(self, error: ProxyError) -> None:
        """Answer with a proxy-made error, unless a response has already begun."""
        if self.finished or self.response_started:
            return
        if isinstance(error, CredentialUnavailable):
            self._upstream_error("credential")
        self.status = error.status
        self.response_started = True
        self.response_done = True
        self.wrote_error = True
        self.t_first = time.perf_counter()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if not self.request_done and self.head.expect_continue and not self.wrote_upstream:
            self.close_after = True  # the client may be holding its body back: end it here
        if isinstance(error, BadRequest) or self.client.draining:
            self.close_after = True
        body = render_error(error, self.family, close=self.close_after)
        self.bytes_out += len(body)
        self.client.write(body)
        if self.request_done:
            self._finish()

    def _abort_client(self, reason: str) -> None:
        logger.warning("aborting client connection: %s", reason)
        self.close_after = True
        self.client.abort()
        self._finish()

    def abandon(self, status: int) -> None:
        """The request turned out malformed: drop everything bound for the upstream."""
        self.status = status
        self.client_lost()

    def client_lost(self) -> None:
        """The client went away: stop everything on its behalf at once."""
        if self.finished:
            return
        if self.task is not None:
            self.task.cancel()
            self.task = None
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.close()
        if not self.response_done:
            self.status = self.status or 499
        self.close_after = True
        self._finish()

    def check_idle(self, now: float, idle_timeout: float) -> None:
        """Called by the server's sweeper: end an exchange on which no byte moved for too long."""
        moved = self.bytes_in + self.bytes_out
        if moved != self.watch_bytes:
            self.watch_bytes = moved
            self.watch_since = now
            return
        if now - self.watch_since < idle_timeout:
            return
        self._upstream_error("idle_timeout")
        if self.response_started:
            self._abort_client(f"no data for {idle_timeout:g} s")
        else:
            self.respond_error(
                UpstreamTimeout(f"The upstream sent nothing for {idle_timeout:g} s (idle_timeout).")
            )
            if not self.request_done:
                self.close_after = True
                self.client.close()
                self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self.state.metrics is not None or self.state.access_log:
            self.t_end = time.perf_counter()
            self.state.batch.defer(self._account)  # once the last bytes are on their way
        self.client.exchange_finished(self)

    def _account(self) -> None:
        """Usage, metrics and the access line: after the response, never in its way."""
        usage: usage_.Usage | None = None
        if self.reply is not None:
            usage = usage_.read_json(self.reply)
            self.reply = None
        elif self.stream_reader is not None:
            self.stream_reader.finish()
            usage = self.stream_reader.usage
        state = self.state
        name = self.key_name or PASSTHROUGH
        ttfb = self.t_first - self.t_start if self.t_first else -1.0
        duration = self.t_end - self.t_start
        metrics = state.metrics
        if metrics is not None:
            metrics.observe(
                route_of(self.head.target),
                self.status,
                name,
                ttfb,
                duration,
                self.bytes_in,
                self.bytes_out,
            )
            if usage is not None:
                metrics.usage(name, usage[0], usage[1])
        if state.access_log:
            self._log_access(name, ttfb, duration, usage)

    def _log_access(
        self, name: str, ttfb: float, duration: float, usage: usage_.Usage | None
    ) -> None:
        path = self.head.target.split(b"?", 1)[0].decode("latin-1")
        rid = self.state.next_request_id()
        counts = usage_.counts(usage)
        tokens = ""
        if counts:
            tokens = f" model={usage[0] if usage and usage[0] else '-'}" + (
                f" tokens_in={counts.get('input', 0)} tokens_out={counts.get('output', 0)}"
            )
        access_logger.info(
            '%s %s "%s %s" %d in=%d out=%d ttfb=%.1fms dur=%.1fms%s',
            rid,
            name,
            self.head.method.decode("latin-1"),
            path,
            self.status,
            self.bytes_in,
            self.bytes_out,
            ttfb * 1000 if ttfb >= 0 else -1.0,
            duration * 1000,
            tokens,
            extra={
                "request_id": rid,
                "client_key": name,
                "status": self.status,
                "model": usage[0] if usage else None,
                "tokens": counts,
            },
        )


def _connect_failed(exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    return f"Could not connect to the upstream: {reason}."
