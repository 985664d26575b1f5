"""One request's journey: authenticate, open upstream, relay the body, relay the response.

An :class:`Exchange` is in one state per direction, and :meth:`Exchange._to` is the only place
either changes; entering a state does all of that state's duties, so no path can forget one::

    request   BUFFERING ──attach──▶ STREAMING ──complete──▶ SENT
        │  └─complete─▶ BUFFERED ──attach──────────────────▶ SENT
        └─ the answer came first ─▶ DISCARDING ──complete──▶ DISCARDED
           the connection is cut ─▶ ABANDONED

    response  WAITING ──head──▶ BODY ──complete──▶ DONE
        │  │     └── upstream lost, idle, client gone, drain ──▶ FAILED
        │  └─ an answer in failover.on_status ─▶ REFUSED ──read, kept──▶ WAITING (next upstream)
        └── a proxy-made answer, or the last refusal kept ──▶ DONE

Failover (several ``[[upstreams]]``) is these same states: a refused answer is read and kept,
not relayed; the request goes back to BUFFERED or BUFFERING with its body from the replay
copy, and the exchange waits for the next upstream as it did for the first. The client has
seen nothing, so nothing it sees changes; once a head is relayed (BODY) nothing is retried.

* Leaving BUFFERING or STREAMING lifts every pause the request direction holds on the client
  (so entering DISCARDING always resumes reading the client).
* Entering DONE or FAILED detaches the upstream: back to the pool only after a complete,
  clean response to a completely sent request; closed otherwise. Detaching lifts the pauses
  the upstream caused.
* The exchange is finished, accounted and handed back to the connection when both directions
  are in a final state.

Work happens in parser callbacks from both sides, so a request that finds a valid token and a
pooled connection needs no task at all. Only waiting (for a token on a cold start, or for a new
upstream connection) runs in a task, which the server owns and whose failure is answered.

The exchange knows its two sides only through the small protocols below: :class:`ClientSide`
(the server's client connection), :class:`UpstreamSide` and :class:`UpstreamPool` (upstream.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from . import headers as hdr
from . import usage as usage_
from .client_auth import PASSTHROUGH, REJECTED, Presented, presented
from .errors import (
    BadRequest,
    ClientIdle,
    CredentialUnavailable,
    Family,
    InternalError,
    PayloadTooLarge,
    ProxyError,
    Unauthorized,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamIdle,
    UpstreamProtocolError,
    UpstreamsResting,
    family_of,
    render_error,
)
from .flow import BUFFER_FULL, CLIENT_FULL, REQUEST_OWNERS, UPSTREAM_FULL, ReadGate
from .identity import PASSTHROUGH_IDENTITY, Identity
from .logs import log_access
from .record import ExchangeRecord, Outcome
from .routing import COOLING_STATUS, deployment_of, leading_model, model_of, retry_hint, soonest
from .usage import StreamReader

if TYPE_CHECKING:
    from .batching import Batch
    from .config import Config
    from .credentials import UpstreamAuth
    from .identity import Authenticator
    from .limits import Limiter, Permit
    from .metrics import Metrics
    from .routing import Health, Router
    from .telemetry import Telemetry

logger = logging.getLogger(__name__)

# Request body held while the upstream connection is being opened, before reading pauses.
PENDING_HIGH_WATER: Final = 256 * 1024
# A body whose model must be read before it goes (allowed_models) is held whole up to this.
HOLD_LIMIT: Final = 32 * 1024 * 1024
# A request body up to this size is kept until the response starts, so that a request sent on
# a pooled connection the upstream had just closed can be sent again on a new one.
REPLAY_LIMIT: Final = 1024 * 1024
# After an early answer, the rest of a request body is read and dropped up to this size so the
# connection can be reused (and the client sees the answer rather than a reset); past it, or
# when its size is unknown, the answer announces the close.
DISCARD_LIMIT: Final = 16 * 1024 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BODY_STATUS: Final = frozenset({204, 304})
# RFC 9110 §9.2.2: methods a proxy may send again when a reused connection fails under them.
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class Req(enum.Enum):
    """Where the request direction is. ``reading``: more body is to come; ``feeds``: that
    body goes somewhere (held, or upstream), so the request may pause the client; ``final``:
    this direction is over. (Kept on the members: cheaper to read than a set to hash into.)"""

    BUFFERING = ("buffering", True, True, False)  # body arriving, no upstream yet: held
    BUFFERED = ("buffered", False, False, False)  # body complete, no upstream yet
    STREAMING = ("streaming", True, True, False)  # body arriving, written upstream as it comes
    SENT = ("sent", False, False, True)  # the whole request went upstream
    DISCARDING = ("discarding", True, False, False)  # body arriving after the answer: dropped
    DISCARDED = ("discarded", False, False, True)  # the whole request was read, not (all) sent
    ABANDONED = ("abandoned", False, False, True)  # the connection is cut: nothing more is read

    def __init__(self, label: str, reading: bool, feeds: bool, final: bool) -> None:
        self.label = label
        self.reading = reading
        self.feeds = feeds
        self.final = final


class Resp(enum.Enum):
    """Where the response direction is; ``final``: this direction is over."""

    WAITING = ("waiting", True, False)  # nothing sent to the client yet
    REFUSED = ("refused", True, False)  # an upstream's refusal is being read, kept, not sent
    BODY = ("body", False, False)  # the upstream's head went out, its body is being relayed
    DONE = ("done", False, True)  # a complete response went out (relayed or proxy-made)
    FAILED = ("failed", False, True)  # cut short: the client sees a truncated response, or none

    def __init__(self, label: str, quiet: bool, final: bool) -> None:
        self.label = label
        self.quiet = quiet  # the client has been sent nothing of a response
        self.final = final


BUFFERING, BUFFERED, STREAMING, SENT = Req.BUFFERING, Req.BUFFERED, Req.STREAMING, Req.SENT
DISCARDING, DISCARDED, ABANDONED = Req.DISCARDING, Req.DISCARDED, Req.ABANDONED
WAITING, REFUSED, BODY, DONE = Resp.WAITING, Resp.REFUSED, Resp.BODY, Resp.DONE
FAILED = Resp.FAILED


class Stage(enum.IntEnum):
    """The start-up stages, in order; the first that must wait goes on in a task."""

    IDENTIFY = 0
    ADMIT = 1
    ROUTE = 2
    CREDENTIAL = 3


IDENTIFY, ADMIT, ROUTE, CREDENTIAL = Stage.IDENTIFY, Stage.ADMIT, Stage.ROUTE, Stage.CREDENTIAL
# A refused answer kept to be relayed if no other upstream answers; past this it is dropped.
KEEP_LIMIT: Final = 64 * 1024


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    scan: hdr.HeaderScan
    keep_alive: bool
    http11: bool
    chunked: bool
    expect_continue: bool
    anthropic_version: bool


class Kept:
    """A refused answer, read and held while other upstreams are asked. One cut short is
    dropped (``Exchange.kept = None``): once the next upstream is asked, the refusal kept
    was read to its end."""

    __slots__ = (
        "body",
        "body_bytes",
        "headers",
        "reason",
        "reusable",
        "sent_at",
        "source",
        "status",
        "trailers",
        "until_close",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        source: Target,
        sent_at: float,
        until_close: bool,
        reusable: bool,
    ) -> None:
        self.source = source  # the upstream that refused
        self.sent_at = sent_at  # when the request went to it
        self.status = status
        self.reason = reason
        self.headers = headers
        self.until_close = until_close  # its body ends with the connection
        self.reusable = reusable  # the request went whole: the connection may be pooled after
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.trailers: list[tuple[bytes, bytes]] = []

    def add(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.body_bytes <= KEEP_LIMIT:
            self.body.append(data)
        else:
            self.body = []  # too large to relay: only its end is still awaited


# ------------------------------------------------------------------ the two sides


class ClientSide(Protocol):
    """What an exchange needs of the client connection it serves."""

    gate: ReadGate
    write_paused: bool
    draining: bool

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def abort(self, reset: bool = False) -> None: ...
    def peer(self) -> str: ...
    def exchange_finished(self, exchange: Exchange) -> None: ...


class UpstreamSide(Protocol):
    """What an exchange needs of an upstream connection while it holds it."""

    gate: ReadGate
    reused: bool

    def attach(self, exchange: Exchange) -> None: ...
    def write(self, data: bytes) -> None: ...
    def finish(self, reusable: bool) -> None: ...
    def close(self) -> None: ...


class UpstreamPool(Protocol):
    def take_idle(self) -> UpstreamSide | None: ...
    async def connect(self) -> UpstreamSide: ...
    def release(self, conn: Any) -> None: ...


class Target(Protocol):
    """One upstream as the relay uses it: where, with which credential, how it stands."""

    @property
    def name(self) -> str: ...
    @property
    def pool(self) -> UpstreamPool: ...
    @property
    def auth(self) -> UpstreamAuth: ...
    @property
    def host_header(self) -> bytes: ...
    @property
    def prefix(self) -> bytes: ...
    @property
    def health(self) -> Health: ...


class Shared(Protocol):
    """What every exchange of a server shares (the server's ``ServerState``)."""

    config: Config
    authenticator: Authenticator
    limiter: Limiter | None
    router: Router
    metrics: Metrics | None
    telemetry: Telemetry | None
    batch: Batch
    read_usage: bool
    access_log: bool

    @property
    def targets(self) -> tuple[Target, ...]:
        """In config order; [0] alone unless [[upstreams]] names more."""

    def spawn(
        self, coro: Coroutine[Any, Any, None], on_error: Callable[[BaseException], None]
    ) -> asyncio.Task[None]: ...
    def next_request_id(self) -> str: ...


# ------------------------------------------------------------------ the exchange


class Exchange:
    """A request/response pair between one client connection and one upstream connection."""

    __slots__ = (
        "attempts",
        "awaiting",
        "body_done",
        "body_read",
        "bytes_in",
        "bytes_out",
        "chunked_out",
        "client",
        "close_after",
        "close_delimited",
        "credential",
        "discarded",
        "family",
        "head",
        "head_method",
        "identity",
        "interim",
        "kept",
        "key_name",
        "origin",
        "outcome",
        "pending",
        "pending_bytes",
        "permit",
        "plan",
        "replay",
        "replay_bytes",
        "replay_cap",
        "reply",
        "req",
        "request_model",
        "resend",
        "resp",
        "sent_traceparent",
        "shared",
        "status",
        "stream_reader",
        "t_end",
        "t_first",
        "t_sent",
        "t_start",
        "target",
        "task",
        "tries",
        "until_close",
        "upstream",
        "upstream_head",
        "upstream_request_id",
        "watch_bytes",
        "watch_since",
    )

    def __init__(self, shared: Shared, client: ClientSide, head: RequestHead) -> None:
        self.shared = shared
        self.client = client
        self.head = head
        self.head_method = head.method
        self.family: Family = family_of(head.target, head.anthropic_version)
        self.req = BUFFERING if head.chunked or head.scan.content_length else BUFFERED
        self.resp = WAITING
        self.outcome: Outcome = "complete"
        self.origin: Literal["upstream", "proxy"] = "proxy"  # until an upstream head is relayed
        self.key_name: str | None = None
        self.identity: Identity | None = None
        self.permit: Permit | None = None  # admitted under limits: finished with the tokens
        self.request_model: str | None = None
        self.body_read: list[bytes] | None = None  # the raw body, kept only to read its model
        self.body_done: asyncio.Future[None] | None = None
        self.awaiting: Stage | None = None  # a start-up stage that goes on when the body ends
        self.credential: hdr.UpstreamCredential | None = None
        self.upstream: UpstreamSide | None = None
        self.target: Target = shared.targets[0]  # the upstream being tried
        self.plan: list[Target] | None = None  # with several upstreams: the ones still to try
        self.tries = 0  # upstreams tried (failover.max_attempts counts these)
        self.kept: Kept | None = None  # the last refused answer, if no other upstream answers
        self.upstream_head = b""
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.replay: list[bytes] | None = None
        self.replay_bytes = 0
        self.replay_cap = REPLAY_LIMIT
        self.resend = False  # the attempt may be sent once more if its pooled connection closes
        self.attempts = 0
        self.chunked_out = False
        self.until_close = False
        self.close_delimited = False
        self.close_after = not head.keep_alive
        self.discarded = 0
        self.status = 0
        self.interim = 0
        self.upstream_request_id: bytes | None = None  # kept alone: a scan outlives a stream
        self.sent_traceparent: str | None = None  # the trace context sent upstream, if any
        self.reply: list[bytes] | None = None  # a JSON reply kept for its usage until complete
        self.stream_reader: StreamReader | None = None  # an event stream's usage, as it comes
        self.bytes_in = 0
        self.bytes_out = 0
        self.t_start = time.perf_counter()
        self.t_first = 0.0
        self.t_sent = 0.0  # with [[upstreams]]: when the request went to the one answering
        self.t_end = 0.0
        self.watch_bytes = -1
        self.watch_since = 0.0

    @property
    def streaming(self) -> bool:
        """An event stream is being relayed (and read for usage: only known when it is)."""
        return self.stream_reader is not None and self.resp is BODY

    @property
    def finished(self) -> bool:
        return self.req.final and self.resp.final

    # ================================================================ transitions

    def _to(self, req: Req | None = None, resp: Resp | None = None) -> None:
        """The one place states change; entering a state does its duties."""
        was_finished = self.req.final and self.resp.final
        if req is not None and req is not self.req:
            self.req = req
            if not req.feeds:
                # the request no longer feeds anything: its pauses on the client go with it
                gate = self.client.gate
                if gate.owners & REQUEST_OWNERS:
                    gate.resume(REQUEST_OWNERS)
                if req is not SENT and req is not BUFFERED:
                    self.pending = []
                    self.replay = None
        if resp is not None and resp is not self.resp:
            self.resp = resp
            if resp.final:
                if self.task is not None:
                    self._cancel_task()
                if self.upstream is not None:
                    self._detach_upstream(reusable=False)
                if self.req is BUFFERED:
                    self.req = DISCARDED  # complete, never sent
                    self.pending = []
        if not was_finished and self.req.final and self.resp.final:
            self._finish()

    def _detach_upstream(self, reusable: bool) -> None:
        """Give the upstream connection up, and every pause it caused with it."""
        upstream = self.upstream
        if upstream is None:
            return
        self.upstream = None
        gate = self.client.gate
        if gate.owners & UPSTREAM_FULL:
            gate.resume(UPSTREAM_FULL)
        upstream.finish(reusable)

    def _cancel_task(self) -> None:
        task, self.task = self.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.task = self.shared.spawn(coro, self._task_failed)

    def _task_failed(self, exc: BaseException) -> None:
        """A task of this exchange raised: the server logged it; the client gets an answer."""
        self.task = None
        if self.finished:
            return
        self.respond_error(InternalError("The proxy failed while handling this request."))
        if self.resp is BODY:
            self.fail("upstream_aborted", "internal error")

    # ================================================================ start

    def start(self) -> None:
        """Identify the client, admit it under its limits, choose the upstreams, pick the
        credential and open the upstream. Each stage that can be decided now is; the first
        that must wait (a signing key, Redis, the whole body for its model, a token)
        continues in a task."""
        shared = self.shared
        try:
            creds = presented(self.head.headers, self.head.scan.lnames)
            identity = shared.authenticator.identify_now(creds)
            if identity is None:  # a token whose signing key must be fetched first
                if shared.limiter is not None or self._routes_by_body():
                    self.body_read = []  # its policy or its route may need the body's model
                self._spawn(self._start_slow(IDENTIFY, creds))
                return
            self._identified(identity)
            if shared.limiter is not None and not self._admit_now():
                self._spawn(self._start_slow(ADMIT, creds))
                return
            if not shared.router.single and not self._route_now():
                self.awaiting = ROUTE  # the body's last byte goes on (on_request_complete)
                return
        except ProxyError as exc:
            self._refuse(exc)
            return
        self._start_from(CREDENTIAL, creds)

    def _start_from(self, stage: Stage, creds: Presented | None = None) -> None:
        """The stages from ``stage`` on, decided now where they can be (routing, once the
        body it needed is complete; the credential), else in a task."""
        try:
            if stage <= ROUTE:
                self._route()
            if self.identity is not PASSTHROUGH_IDENTITY:
                try:
                    credential = self.target.auth.credential_now()
                except CredentialUnavailable as exc:
                    if not self.plan:
                        raise
                    self._fail_over("credential", exc)  # another upstream, another credential
                    return
                if credential is None:  # cold start: a token is on its way
                    creds = creds or presented(self.head.headers, self.head.scan.lnames)
                    self._spawn(self._start_slow(CREDENTIAL, creds))
                    return
                self.credential = credential
            self._build_upstream_head()
        except ProxyError as exc:
            self._refuse(exc)
            return
        self._open_upstream()

    async def _start_slow(self, stage: Stage, creds: Presented) -> None:
        try:
            if stage <= IDENTIFY:
                self._identified(await self.shared.authenticator.identify(creds))
            if stage <= ADMIT:
                await self._admit_wait()
            if stage <= ROUTE and not self.shared.router.single:
                if self._routes_by_body():
                    await self._whole_body()
                self._route()
            if stage <= CREDENTIAL and self.identity is not PASSTHROUGH_IDENTITY:
                try:
                    self.credential = await self.target.auth.credential_wait()
                except CredentialUnavailable as exc:
                    if not self.plan:
                        raise
                    self.task = None
                    self._fail_over("credential", exc)  # another upstream, another credential
                    return
        except ProxyError as exc:
            self.task = None
            self._refuse(exc)
            return
        self._build_upstream_head()
        await self._open_slow()

    def _refuse(self, exc: ProxyError) -> None:
        if isinstance(exc, Unauthorized):
            self.key_name = REJECTED
        self.respond_error(exc)

    # ---------------------------------------------------------------- identity

    def _identified(self, identity: Identity) -> None:
        self.identity = identity
        self.key_name = identity.label

    # ---------------------------------------------------------------- limits

    def _needs_admission(self) -> bool:
        identity = self.identity
        return (
            self.shared.limiter is not None
            and identity is not None
            and (identity.kind == "key" or identity.kind == "user")
        )

    def _needs_model(self) -> bool:
        """The identity's allowed_models must see the request body's model before it goes."""
        rules = self.identity.rules if self.identity is not None else None
        return rules is not None and rules.settings.allowed_models is not None

    def _admit_now(self) -> bool:
        if not self._needs_admission():
            return True
        if self._needs_model() and self.req is BUFFERING:
            self._hold_body()  # its model decides
            return False
        limiter, identity = self.shared.limiter, self.identity
        assert limiter is not None and identity is not None
        permit = limiter.check_now(
            identity.limit_kind,
            identity.id,
            identity.rules,
            self._request_model(),
            has_body=self._has_body(),
            display=identity.name,
        )
        if permit is None:
            return False  # Redis decides
        self.permit = permit
        return True

    async def _admit_wait(self) -> None:
        if not self._needs_admission() or not self._needs_model():
            self._stop_holding()
            if not self._needs_admission():
                return
        else:
            await self._whole_body()
        limiter, identity = self.shared.limiter, self.identity
        assert limiter is not None and identity is not None
        self.permit = await limiter.check(
            identity.limit_kind,
            identity.id,
            identity.rules,
            self._request_model(),
            has_body=self._has_body(),
            display=identity.name,
        )

    # ---------------------------------------------------------------- the body's model

    def _hold_body(self) -> None:
        """Keep the whole body, to read its model once it is complete."""
        if self.body_read is None:
            self.body_read = []
            if self.head.expect_continue and self.bytes_in == 0:
                self.client.write(CONTINUE)  # the body is needed before any upstream is asked

    async def _whole_body(self) -> None:
        if self.req is BUFFERING:
            self._hold_body()
            if self.body_done is None:
                self.body_done = asyncio.get_running_loop().create_future()
            await self.body_done

    def _stop_holding(self) -> None:
        """The body's model is not needed after all: from here it is held as any body is
        (paused past the high-water mark), not whole."""
        if self.body_read is not None and not self._routes_by_body():
            self.body_read = None
            if self.pending_bytes > PENDING_HIGH_WATER and self.req is BUFFERING:
                self.client.gate.pause(BUFFER_FULL)

    def _has_body(self) -> bool:
        return self.head.chunked or bool(self.head.scan.content_length)

    def _request_model(self) -> str | None:
        body_read = self.body_read
        if body_read is not None and self.req is not BUFFERING:
            self.body_read = None  # read once, whole: the copy goes, the body goes on as held
            model = None
            if body_read and not self._needs_model():
                model = leading_model(body_read[0])  # routing alone: the first bytes suffice
            self.request_model = model if model is not None else model_of(b"".join(body_read))
        return self.request_model

    # ---------------------------------------------------------------- routing

    def _routes_by_body(self) -> bool:
        """Routes name models, and this request's model is in its JSON body (not its path)."""
        scan = self.head.scan
        return (
            self.shared.router.needs_model
            and self._has_body()
            and scan.content_type.startswith(b"application/json")
            and not scan.content_encoding
            and deployment_of(self.head.target) is None
        )

    def _route_now(self) -> bool:
        """Choose the upstreams to try; False when the whole body must be read first."""
        if self.req is BUFFERING and self._routes_by_body():
            self._hold_body()
            return False
        self._route()
        return True

    def _route(self) -> None:
        """The candidates for this request's model, in order; the first usable is taken.
        Raises :class:`UpstreamsResting` when every one is cooling down."""
        shared = self.shared
        model = None  # without routes every upstream serves every model: no need to know it
        if shared.router.needs_model:
            model = deployment_of(self.head.target) or self._request_model()
        targets = shared.targets
        candidates = [targets[i] for i in shared.router.plan(model, random.random)]
        self.plan = list(candidates)
        if not self._next_target():
            wait = soonest((t.health for t in candidates), time.monotonic())
            names = ", ".join(t.name for t in candidates)
            raise UpstreamsResting(
                f"Every upstream for this request ({names}) is cooling down after refusing "
                f"requests; the first is back in {wait:.0f} s.",
                retry_after=max(1, math.ceil(wait)),
            )

    def _next_target(self) -> bool:
        """Take the next candidate that is not resting, if any (and attempts are left)."""
        plan = self.plan
        assert plan is not None
        if self.tries >= self.shared.config.failover.max_attempts:
            return False
        now = time.monotonic()
        probe_for = self.shared.config.connect_timeout + 1.0
        while plan:
            target = plan.pop(0)
            if target.health.take(now, probe_for):
                self.target = target
                self.tries += 1
                return True
        return False

    def _can_fail_over(self) -> bool:
        """Another upstream may be tried: attempts are left, one is usable, and the request
        can be sent again whole (nothing sent yet, or all of it kept for a replay)."""
        plan = self.plan
        if not plan or self.tries >= self.shared.config.failover.max_attempts:
            return False
        if (self.req is SENT or self.req is STREAMING) and self.replay is None:
            return False  # some of the request went and was not kept
        now = time.monotonic()
        return any(t.health.usable(now) for t in plan)

    # ---------------------------------------------------------------- upstream

    def _build_upstream_head(self) -> None:
        shared = self.shared
        head = self.head
        telemetry = shared.telemetry
        if telemetry is not None and telemetry.propagate and self.sent_traceparent is None:
            incoming = head.scan.traceparent
            self.sent_traceparent = telemetry.child_traceparent(
                incoming.decode("latin-1") if incoming else None
            )
        sent = self.sent_traceparent
        target = self.target
        self.upstream_head = hdr.upstream_request_head(
            head.method,
            head.target,
            head.headers,
            host=target.host_header,
            prefix=target.prefix,
            credential=self.credential,
            chunked=head.chunked,
            default_header=b"x-api-key" if self.family == "anthropic" else b"Authorization",
            scanned=head.scan,
            traceparent=sent.encode("latin-1") if sent is not None else None,
        )

    def _open_upstream(self) -> None:
        conn = self.target.pool.take_idle()
        if conn is not None:
            self._attach(conn)
        else:
            self._spawn(self._connect())

    async def _open_slow(self) -> None:
        conn = self.target.pool.take_idle()
        if conn is not None:
            self.task = None
            self._attach(conn)
        else:
            await self._connect()

    async def _connect(self) -> None:
        target = self.target
        try:
            conn = await target.pool.connect()
        except TimeoutError:
            self.task = None
            timeout = self.shared.config.connect_timeout
            self._connect_failed(
                UpstreamConnectTimeout(
                    f"Timed out connecting to the upstream after {timeout:g} s."
                ),
            )
            return
        except OSError as exc:
            self.task = None
            reason = exc.strerror or type(exc).__name__
            self._connect_failed(
                UpstreamConnectError(f"Could not connect to the upstream: {reason}.")
            )
            return
        self.task = None
        self._attach(conn)

    def _connect_failed(self, error: ProxyError) -> None:
        """No connection to this upstream: the next one is tried (connect failures always
        move on); with none left, the client gets the last refusal kept, or ``error``."""
        if self.plan is not None:
            self.attempts += 1  # an attempt, though nothing was sent
            self.target.health.connect_failed(time.monotonic())
            self._fail_over(error.kind or "connect", error)
        else:
            self.respond_error(error)

    def _attach(self, conn: UpstreamSide) -> None:
        if self.resp is not WAITING:
            self.target.pool.release(conn)  # answered meanwhile; the connection is unused
            return
        self.attempts += 1
        self.upstream = conn
        conn.attach(self)
        if self.plan is not None:
            self.target.health.connected()  # reachable: a circuit being probed closes
            self.t_sent = time.perf_counter()
        if self.client.write_paused:
            conn.gate.pause(CLIENT_FULL)  # the client is not taking what it is sent: wait with it
        out = [self.upstream_head, *self.pending]
        size = len(self.upstream_head) + self.pending_bytes
        self.pending = []
        self.pending_bytes = 0
        resend = self.resend = conn.reused and self.attempts == 1 and self._may_resend()
        if self.plan and self.tries < self.shared.config.failover.max_attempts:
            # another upstream may be asked: keep what is sent, up to failover.replay_limit
            self.replay_cap = self.shared.config.failover.replay_limit
            if size - len(out[0]) <= self.replay_cap:
                self.replay = out
                self.replay_bytes = size - len(out[0])
        elif resend:
            self.replay = out  # kept (not copied) until the response starts
            self.replay_bytes = size - len(out[0])
            self.replay_cap = REPLAY_LIMIT
        # Lift the buffer's pause before writing: if this write fills the upstream's buffer,
        # its pause_writing must be the last word on whether the client is read.
        gate = self.client.gate
        if gate.owners & BUFFER_FULL:
            gate.resume(BUFFER_FULL)
        self._to(req=SENT if self.req is BUFFERED else STREAMING)
        conn.write(b"".join(out) if len(out) > 1 else out[0])
        if self.head.expect_continue and self.req is STREAMING and self.bytes_in == 0:
            self.client.write(CONTINUE)

    def _may_resend(self) -> bool:
        """RFC 9110 §9.2.2: only idempotent requests (or ones carrying an Idempotency-Key)
        are sent again when a reused connection closes after they were written."""
        head = self.head
        return head.method in IDEMPOTENT or b"idempotency-key" in head.scan.lnames

    # ================================================================ request body (client side)

    def on_request_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        req = self.req
        if req is STREAMING:
            if self.head.chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            self._send_upstream(data)
        elif req is BUFFERING:
            body_read = self.body_read
            if body_read is not None:  # held whole, for its model
                body_read.append(data)
                if self.bytes_in > HOLD_LIMIT:
                    self.close_after = True
                    self.respond_error(PayloadTooLarge(_too_large(HOLD_LIMIT)))
                    return
            if self.head.chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes > PENDING_HIGH_WATER and body_read is None:
                self.client.gate.pause(BUFFER_FULL)
        elif req is DISCARDING:
            self.discarded += len(data)
            if self.discarded > DISCARD_LIMIT:
                self.close_after = True
                self.fail(self.outcome, "request body to discard is over the limit")

    def on_request_complete(self, trailers: list[tuple[bytes, bytes]]) -> None:
        req = self.req
        if req is STREAMING:
            if self.head.chunked:
                self._send_upstream(hdr.trailer_block(trailers))
            self._to(req=SENT)
        elif req is BUFFERING:
            if self.head.chunked:
                block = hdr.trailer_block(trailers)
                self.pending.append(block)
                self.pending_bytes += len(block)
            self._to(req=BUFFERED)
            if self.body_done is not None and not self.body_done.done():
                self.body_done.set_result(None)  # the model can be read: admission goes on
            elif self.awaiting is ROUTE and self.resp is WAITING:
                self.awaiting = None
                self._start_from(ROUTE)  # the model can be read: routing goes on, no task
        elif req is DISCARDING:
            self._to(req=DISCARDED)

    def _send_upstream(self, data: bytes) -> None:
        replay = self.replay
        if replay is not None:
            replay.append(data)
            self.replay_bytes += len(data)
            if self.replay_bytes > self.replay_cap:
                self.replay = None
        upstream = self.upstream
        assert upstream is not None
        upstream.write(data)

    # ================================================================ response (upstream side)

    def on_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        if status < 200:
            self.interim += 1  # traffic, for the idle clock
            # 100 was ours to send, 101 was never asked for (llhttp stops there); 103 goes on,
            # but never to an HTTP/1.0 client, which cannot tell it from the answer (§15.2)
            if status not in (100, 101) and self.head.http11:
                self.client.write(hdr.interim_response_head(status, reason, headers))
            return
        if self.plan is not None and self._refused(status, reason, headers):
            return
        self.replay = None
        self.status = status
        self.t_first = time.perf_counter()
        found = hdr.scan(headers)
        self.upstream_request_id = found.request_id
        has_body = self.head.method != b"HEAD" and status not in NO_BODY_STATUS
        chunked = has_body and found.chunked
        if chunked and not self.head.http11:
            chunked = False
            self.close_after = True  # an HTTP/1.0 client: the end of the body is the close
        elif has_body and not chunked and found.content_length is None:
            self.until_close = self.close_after = True  # close-delimited upstream body
        self.chunked_out = chunked
        self.close_delimited = has_body and not chunked and found.content_length is None
        if self.req.reading and not self._can_discard_rest():
            self.close_after = True
        if self.client.draining:
            self.close_after = True
        if self.shared.read_usage and has_body:
            kind = usage_.kind_of(found)
            if kind == usage_.JSON:
                self.reply = []
            elif kind == usage_.STREAM:
                self.stream_reader = StreamReader()
        self.origin = "upstream"
        self.client.write(
            hdr.client_response_head(
                status,
                reason,
                headers,
                chunked=chunked,
                close=self.close_after,
                keep_alive_10=not self.head.http11,
                scanned=found,
            )
        )
        self._to(resp=BODY)
        if status == 401 and self.credential is not None and self.credential.kind == "bearer":
            self.target.auth.rejected(self.credential)

    def _refused(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        """With several upstreams: an overload answer rests this one; an answer in
        ``failover.on_status`` is kept, not relayed, while another upstream may be asked."""
        if status in COOLING_STATUS:
            self.target.health.refused(time.monotonic(), retry_hint(headers, time.time()))
        if status not in self.shared.config.failover.on_status or not self._can_fail_over():
            return False
        found = hdr.scan(headers)
        self.kept = Kept(
            status,
            reason,
            headers,
            source=self.target,
            sent_at=self.t_sent,
            until_close=not found.chunked and found.content_length is None,
            reusable=self.req is SENT,
        )
        self._to(resp=REFUSED)
        self._rewind()
        return True

    def _refusal_read(self, trailers: list[tuple[bytes, bytes]]) -> None:
        kept = self.kept
        assert kept is not None
        kept.trailers = trailers
        self._detach_upstream(reusable=kept.reusable)
        self._fail_over(str(kept.status), None)

    def _fail_over(
        self, reason: str, error: ProxyError | None, outcome: Outcome = "rejected"
    ) -> None:
        """Send the request to the next upstream. With none left, the client gets the last
        refusal kept, unchanged; or, when no upstream answered, ``error``."""
        came_from = self.target.name
        if self.resp.quiet and self._can_fail_over() and self._next_target():
            logger.info("failover: %s -> %s (%s)", came_from, self.target.name, reason)
            if self.shared.metrics is not None:
                self.shared.metrics.failover(came_from, self.target.name, reason)
                if error is not None and error.kind is not None:
                    self.shared.metrics.upstream_error(error.kind)  # each failure counts once
            self._rewind()
            self.credential = None
            self.resend = False
            self.watch_bytes = -1  # the idle clock starts again for this upstream
            self._to(resp=WAITING)
            self._spawn(self._reconnect())
            return
        kept, self.kept = self.kept, None
        if kept is not None and kept.body_bytes <= KEEP_LIMIT:  # read whole (see Kept)
            self._relay_kept(kept)
        elif error is not None:
            self.respond_error(error, outcome)
        else:
            self.respond_error(UpstreamClosed("The upstream's refusal was too large to relay."))

    async def _reconnect(self) -> None:
        """The next upstream: its credential (another upstream may have another), then a
        connection, as for the first."""
        target = self.target
        if self.identity is not PASSTHROUGH_IDENTITY:
            try:
                credential = target.auth.credential_now()
                if credential is None:
                    credential = await target.auth.credential_wait()
            except ProxyError as exc:
                self.task = None
                self._fail_over("credential", exc)
                return
            self.credential = credential
        self._build_upstream_head()
        await self._open_slow()

    def _rewind(self) -> None:
        """The one transition back: what was sent is held again, from the replay copy, until
        the next connection is up (nothing to do when nothing was sent)."""
        replay = self.replay
        if replay is None or not (self.req is SENT or self.req is STREAMING):
            return
        self.replay = None
        self.pending = replay[1:]  # [0] is the head, which _attach writes anew
        self.pending_bytes = self.replay_bytes
        self._to(req=BUFFERED if self.req is SENT else BUFFERING)

    def _relay_kept(self, kept: Kept) -> None:
        """Every upstream refused: the last refusal goes to the client as it came."""
        self.plan = None  # nothing more is tried
        self.target, self.t_sent = kept.source, kept.sent_at  # the record names who answered
        self.on_response_head(kept.status, kept.reason, kept.headers)
        for part in kept.body:
            self.on_response_body(part)
        self.on_response_complete(kept.trailers)

    def _can_discard_rest(self) -> bool:
        """Whether the rest of the request body can be read and dropped after an early answer,
        keeping the connection; otherwise the answer announces the close."""
        if self.head.expect_continue and self.bytes_in == 0:
            return False  # the client may be holding its body back for a 100 never sent
        length = self.head.scan.content_length
        return length is not None and length - self.bytes_in <= DISCARD_LIMIT

    def on_response_body(self, data: bytes) -> None:
        if self.resp is REFUSED:
            assert self.kept is not None
            self.kept.add(data)
            return
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
            self.shared.batch.defer(self.stream_reader.scan, data)

    def on_response_complete(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.resp is not BODY:
            if self.resp is REFUSED:
                self._refusal_read(trailers)
            return
        if self.chunked_out:
            self.client.write(hdr.trailer_block(trailers))
        self._detach_upstream(reusable=self.req is SENT)
        self._end_response()

    def _end_response(self) -> None:
        """The client has the whole response; a request still arriving is discarded."""
        if self.req.reading and self.req is not DISCARDING:
            if self.close_after:
                self._to(req=ABANDONED, resp=DONE)
                return
            self._to(req=DISCARDING)
        self._to(resp=DONE)

    def upstream_lost(self, exc: Exception | None) -> None:
        """The upstream connection closed before the response was complete."""
        self.upstream = None
        self.client.gate.resume(UPSTREAM_FULL)
        if self.resp is WAITING:
            if self.resend and self.replay is not None:
                self._retry()
                return
            self._lost_before_answer(
                "closed",
                UpstreamClosed("The upstream closed the connection before sending a response."),
            )
        elif self.resp is REFUSED:
            kept = self.kept
            if kept is not None and kept.until_close and exc is None:
                self._refusal_read([])  # a close-delimited refusal ends with a clean close
            else:
                self.kept = None  # cut short: nothing that could be relayed as it came
                self._fail_over("closed", UpstreamClosed("The upstream closed the connection."))
        elif self.resp is BODY:
            if self.until_close and exc is None:
                self._end_response()  # a close-delimited body ends with a clean close
            else:
                # a reset is a truncation, and the client must see one (RFC 9112 §8)
                self._upstream_error("closed")
                self.fail("upstream_aborted", "the upstream closed the connection mid-response")

    def upstream_broken(self, reason: str) -> None:
        """The upstream spoke something that is not HTTP/1.1; its connection is gone."""
        self.upstream = None
        self.client.gate.resume(UPSTREAM_FULL)
        if self.resp.quiet:
            logger.warning("upstream error: %s", reason)
            error = UpstreamProtocolError("The upstream sent a malformed response.")
            if self.resp is REFUSED:  # it had refused already: the next one is asked
                self.kept = None
                self._fail_over("malformed", error)
            else:
                self._lost_before_answer("malformed", error)
        elif self.resp is BODY:
            self._upstream_error("malformed")
            self.fail("upstream_aborted", reason)

    def _retry(self) -> None:
        """Send the request again on a new connection: the pooled one was closed under us."""
        logger.debug("pooled upstream connection was closed; sending the request again")
        self.resend = False
        self._rewind()
        self._spawn(self._connect())

    def _lost_before_answer(
        self, reason: str, error: UpstreamError, outcome: Outcome = "rejected"
    ) -> None:
        """The upstream failed after the request went, before any answer: another upstream
        is asked only if the status this becomes is in ``failover.on_status`` (the request
        may have been processed: a 502 or 504 is not in it by default)."""
        if self.plan is not None and error.status in self.shared.config.failover.on_status:
            self._detach_upstream(reusable=False)
            self._fail_over(reason, error, outcome)
        else:
            self.respond_error(error, outcome)

    def _upstream_error(self, kind: str) -> None:
        if self.shared.metrics is not None:
            self.shared.metrics.upstream_error(kind)

    # ================================================================ flow control

    def upstream_write_paused(self) -> None:
        self.client.gate.pause(UPSTREAM_FULL)

    def upstream_write_resumed(self) -> None:
        self.client.gate.resume(UPSTREAM_FULL)

    def client_write_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.gate.pause(CLIENT_FULL)

    def client_write_resumed(self) -> None:
        if self.upstream is not None:
            self.upstream.gate.resume(CLIENT_FULL)

    # ================================================================ endings

    def respond_error(self, error: ProxyError, outcome: Outcome = "rejected") -> None:
        """Answer with a proxy-made error, unless a response has already begun."""
        if not self.resp.quiet:
            return
        if error.kind is not None:
            self._upstream_error(error.kind)
        self.status = error.status
        self.outcome = outcome
        self.t_first = time.perf_counter()
        self._cancel_task()
        self._detach_upstream(reusable=False)
        if isinstance(error, BadRequest) or self.client.draining:
            self.close_after = True
        if self.req.reading and not self._can_discard_rest():
            self.close_after = True
        body = render_error(
            error,
            self.family,
            close=self.close_after,
            head_request=self.head.method == b"HEAD",
            keep_alive_10=not self.head.http11,
        )
        self.bytes_out += len(body)
        self.client.write(body)
        self._end_response()

    def fail(self, outcome: Outcome, reason: str) -> None:
        """Cut the client connection: what it was owed goes first, so a truncated response
        is seen as truncated (no final chunk, or fewer bytes than announced)."""
        if self.finished:
            return
        logger.warning("aborting client connection: %s", reason)
        if self.resp is not DONE:
            self.outcome = outcome
        self.close_after = True
        self.client.abort(reset=self.close_delimited and self.resp is BODY)
        self._to(req=ABANDONED if not self.req.final else None, resp=FAILED)

    def reject_request(self, error: ProxyError) -> None:
        """The request turned out malformed mid-body: nothing more of it is read or sent."""
        self.close_after = True
        if self.resp.quiet:
            self.respond_error(error)
        elif self.resp is BODY:
            self.fail("client_aborted", f"malformed request body: {error.message}")
        else:
            self._to(req=ABANDONED)

    def client_lost(self) -> None:
        """The client went away: stop everything on its behalf at once."""
        if self.finished:
            return
        if self.resp is not DONE:
            self.outcome = "client_aborted"
            self.status = self.status or 499
        self.close_after = True
        req = ABANDONED if not self.req.final else None
        self._to(req=req, resp=FAILED if self.resp is not DONE else None)

    def drain_cut(self) -> None:
        """The shutdown deadline passed with this exchange still running."""
        if not self.finished:
            self.fail("drain_cut", "the shutdown deadline passed")

    def check_idle(self, now: float, idle_timeout: float) -> None:
        """Called by the server's sweeper: end an exchange on which nothing moved for too long.

        Whoever the proxy was waiting for is to blame: a client that stops sending its body
        gets 408 (or is cut, mid-response, when it stops reading); an upstream that sends
        nothing gives 504 (or a cut).
        """
        moved = self.bytes_in + self.bytes_out + self.interim
        if moved != self.watch_bytes:
            self.watch_bytes = moved
            self.watch_since = now
            return
        if now - self.watch_since < idle_timeout:
            return
        client_to_blame = self.req is DISCARDING or (
            self.req.reading and not self.client.gate.holds(UPSTREAM_FULL)
        )
        if self.resp.quiet:
            if client_to_blame:
                self.close_after = True
                self.respond_error(
                    ClientIdle(f"The request body stalled for {idle_timeout:g} s (idle_timeout)."),
                    "idle_timeout",
                )
                return
            error = UpstreamIdle(
                f"The upstream sent nothing for {idle_timeout:g} s (idle_timeout)."
            )
            if self.resp is WAITING and self.upstream is not None:
                self._lost_before_answer("idle_timeout", error, "idle_timeout")
            else:
                self.respond_error(error, "idle_timeout")
            return
        if self.resp is BODY and not self.client.write_paused:
            self._upstream_error("idle_timeout")
            self.fail("idle_timeout", f"the upstream sent nothing for {idle_timeout:g} s")
        else:
            self.fail("idle_timeout", f"the client took nothing for {idle_timeout:g} s")

    def _finish(self) -> None:
        shared = self.shared
        if (
            shared.metrics is not None
            or shared.access_log
            or shared.telemetry is not None
            or self.permit is not None
        ):
            self.t_end = time.perf_counter()
            shared.batch.defer(self._account)  # once the last bytes are on their way
        self.client.exchange_finished(self)

    # ================================================================ accounting

    def read_usage(self) -> usage_.Usage | None:
        """The token usage the response reported, read once it is finished."""
        if self.reply is not None:
            reply, self.reply = self.reply, None
            return usage_.read_json(reply)
        if self.stream_reader is not None:
            self.stream_reader.finish()
            return self.stream_reader.usage
        return None

    def record(self, usage: usage_.Usage | None) -> ExchangeRecord:
        """What this exchange was, once it is finished."""
        tokens = usage[1] if usage is not None else None
        head = self.head
        rid = self.upstream_request_id
        ua = head.scan.user_agent
        return ExchangeRecord(
            request_id=self.shared.next_request_id(),
            start_time=time.time() - (time.perf_counter() - self.t_start),
            client_key=self.key_name or PASSTHROUGH,
            client_addr=self.client.peer(),
            method=head.method.decode("latin-1"),
            path=head.target.split(b"?", 1)[0].decode("latin-1"),
            api=self.family,
            status=self.status,
            outcome=self.outcome,
            origin=self.origin,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            ttfb=self.t_first - self.t_start if self.t_first else None,
            duration=(self.t_end or time.perf_counter()) - self.t_start,
            model=usage[0] if usage is not None else None,
            input_tokens=_count(tokens, 0),
            output_tokens=_count(tokens, 1),
            cache_read_tokens=_count(tokens, 2),
            cache_write_tokens=_count(tokens, 3),
            upstream_request_id=rid.decode("latin-1") if rid is not None else None,
            user_agent=ua.decode("latin-1") if ua is not None else None,
            traceparent=(
                head.scan.traceparent.decode("latin-1") if head.scan.traceparent else None
            ),
            request_model=self.request_model,
            user=self.identity.name if self.identity is not None else None,
            upstream=self.target.name if self.tries else None,  # with [[upstreams]]
            upstream_ttfb=self.t_first - self.t_sent if self.t_sent and self.t_first else None,
            attempts=self.attempts,
        )

    def _account(self) -> None:
        """Usage, metrics and the access line: after the response, never in its way."""
        rec = self.record(self.read_usage())
        permit, self.permit = self.permit, None
        if permit is not None:
            permit.finish(rec.input_tokens, rec.output_tokens)
        if self.shared.metrics is not None:
            self.shared.metrics.observe_record(rec)
        if self.shared.access_log:
            log_access(rec)
        if self.shared.telemetry is not None:
            self.shared.telemetry.on_record(rec, self.sent_traceparent)


def _count(tokens: list[int] | None, i: int) -> int | None:
    return tokens[i] if tokens is not None and tokens[i] >= 0 else None


def _too_large(limit: int) -> str:
    return (
        f"The request body is over {limit // (1024 * 1024)} MiB, the most this proxy holds "
        "to read its model."
    )
