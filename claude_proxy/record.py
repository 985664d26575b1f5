"""What one finished exchange was: the single record the access log, metrics and traces read.

The relay fills one :class:`ExchangeRecord` per request, after the response has gone out (in
deferred bookkeeping, never in the way of the bytes). Every consumer reads the same record, so a
request is described the same way in the access log, in ``/metrics`` and in a trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Outcome = Literal[
    "complete",  # the whole response reached the client
    "client_aborted",  # the client went away before the response was complete
    "upstream_aborted",  # the upstream closed, reset or spoke garbage mid-response
    "idle_timeout",  # nothing moved for idle_timeout (either side)
    "drain_cut",  # still running when the shutdown deadline passed
    "rejected",  # answered by the proxy itself (4xx/5xx it made), nothing relayed
]
OUTCOMES: Final[tuple[Outcome, ...]] = (
    "complete",
    "client_aborted",
    "upstream_aborted",
    "idle_timeout",
    "drain_cut",
    "rejected",
)


@dataclass(slots=True, kw_only=True)
class ExchangeRecord:
    """One request as it ended. Times are seconds; ``ttfb`` is None when no response began."""

    request_id: str
    start_time: float  # wall clock (time.time()) when the request head was parsed
    client_key: str  # a key's name, "jwt:<policy>", "open", "passthrough" or "rejected"
    client_addr: str
    method: str
    path: str  # the request target without its query
    api: Literal["anthropic", "openai"]
    status: int  # the status the client was sent; 0 when none was
    outcome: Outcome
    origin: Literal["upstream", "proxy"]  # who made the response: relayed, or the proxy's own
    bytes_in: int  # request body bytes read from the client
    bytes_out: int  # response body bytes sent to the client
    ttfb: float | None
    duration: float
    request_model: str | None = None  # the request body's top-level "model", when read
    model: str | None = None  # as the response reported it
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    upstream_request_id: str | None = None  # apim-request-id, x-request-id or request-id
    user_agent: str | None = None
    user: str | None = None  # a JWT user's name_claim (logs only: never a metric label)
    traceparent: str | None = None  # the client's W3C trace context, as sent
    upstream: str | None = None  # with [[upstreams]]: which answered (or was tried last)
    upstream_ttfb: float | None = None  # from the request sent to it to its answer's head
    attempts: int = 1  # upstream attempts made (more than one after a retry or failover)
