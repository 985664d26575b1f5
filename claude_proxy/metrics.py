"""Prometheus metrics, via prometheus-client; only recorded when the admin listener is on.

A request is counted in plain integers (:class:`Tally`), at a fraction of the cost of
prometheus-client's locked values, and the tallies are folded into the prometheus-client
metrics when they are read: before every scrape, and each second with several workers. The relay
hands over one :class:`~claude_proxy.record.ExchangeRecord` per finished request
(:meth:`Metrics.observe_record`).

Labels come from bounded sets only: the API (anthropic, openai), the status class and the exact
code (100-599, anything else "other"), who answered (upstream or proxy), the outcome
(:data:`~claude_proxy.record.OUTCOMES`), the client key's configured name (or passthrough /
rejected / open), the upstream error kind, and the model name, capped at ``max_models`` distinct
values. Never a raw path, never a key.

A request's model name is client-supplied until the upstream has answered it: a name becomes a
label only once a request for it succeeded (or the upstream reported it), so junk names in
failing requests cannot use up the cap. Before that, and past the cap, the label is "other";
with no model at all, "unknown".

With several workers, prometheus-client's multiprocess mode aggregates them: the supervisor
sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start and serves the sum.
"""

from __future__ import annotations

import os
import platform
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from . import __version__
from .record import ExchangeRecord
from .usage import KINDS, MAX_NAME

NAMESPACE: Final = "claude_proxy"
REQUESTS: Final = "claude_proxy_requests"
DURATION: Final = "claude_proxy_request_duration_seconds"
TTFB: Final = "claude_proxy_time_to_first_byte_seconds"
BYTES_IN: Final = "claude_proxy_request_bytes"
BYTES_OUT: Final = "claude_proxy_response_bytes"
UPSTREAM_ERRORS: Final = "claude_proxy_upstream_errors"
LIMIT_REFUSALS: Final = "claude_proxy_limit_refusals"
LIMITS_STORE_ERRORS: Final = "claude_proxy_limits_store_errors"
LIMITS_STORE_UP: Final = "claude_proxy_limits_store_up"
IN_FLIGHT: Final = "claude_proxy_requests_in_flight"
OPEN_STREAMS: Final = "claude_proxy_open_streams"
TOKENS: Final = "claude_proxy_tokens"
CREDENTIAL_ACQUISITIONS: Final = "claude_proxy_credential_acquisitions"
CREDENTIAL_FAILURES: Final = "claude_proxy_credential_failures"
CREDENTIAL_EXPIRES_IN: Final = "claude_proxy_credential_expires_in_seconds"
READY: Final = "claude_proxy_ready"
UPSTREAM_REQUESTS: Final = "claude_proxy_upstream_requests"
UPSTREAM_TTFB: Final = "claude_proxy_upstream_time_to_first_byte_seconds"
FAILOVERS: Final = "claude_proxy_failovers"
UPSTREAM_STATE: Final = "claude_proxy_upstream_state"
UPSTREAM_RECOVERS_IN: Final = "claude_proxy_upstream_recovers_in_seconds"
STANDINGS: Final = ("ready", "cooling", "open", "probing")
BUILD_INFO: Final = "claude_proxy_build_info"

MAX_MODELS: Final = 64  # the default of [admin] max_model_labels
LATENCY_BUCKETS: Final = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
)
STATUS_CLASS: Final = {n: f"{n}xx" for n in range(1, 6)}
STATUS_CODE: Final = {n: str(n) for n in range(100, 600)}
OTHER: Final = "other"
UNKNOWN: Final = "unknown"
REQUEST_LABELS: Final = ("route", "status", "code", "client", "model", "outcome", "origin")
ERROR_KINDS: Final = frozenset(
    {
        "connect_refused",
        "connect_timeout",
        "closed",
        "malformed",
        "idle_timeout",
        "credential",
        "resting",
    }
)


class Tally:
    """One label set's requests since the last fold, in plain numbers."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "children",
        "count",
        "duration",
        "duration_sum",
        "ttfb",
        "ttfb_sum",
    )

    def __init__(self, children: tuple[Counter, Histogram, Histogram, Counter, Counter]) -> None:
        self.children = children
        self.count = self.bytes_in = self.bytes_out = 0
        self.duration_sum = self.ttfb_sum = 0.0
        # one count per bucket (not cumulative), the last one for +Inf, as prometheus-client
        self.duration = [0] * (len(LATENCY_BUCKETS) + 1)
        self.ttfb = [0] * (len(LATENCY_BUCKETS) + 1)

    def fold(self) -> None:
        requests, duration, ttfb, bytes_in, bytes_out = self.children
        requests.inc(self.count)
        if self.bytes_in:
            bytes_in.inc(self.bytes_in)
        if self.bytes_out:
            bytes_out.inc(self.bytes_out)
        add_to_histogram(duration, self.duration, self.duration_sum)
        add_to_histogram(ttfb, self.ttfb, self.ttfb_sum)
        self.count = self.bytes_in = self.bytes_out = 0
        self.duration_sum = self.ttfb_sum = 0.0
        self.duration = [0] * len(self.duration)
        self.ttfb = [0] * len(self.ttfb)


def add_to_histogram(child: Histogram, counts: list[int], total: float) -> None:
    """Add per-bucket counts and their sum to a histogram child at once.

    prometheus-client has no public call for this (``observe`` takes one value); its
    histogram keeps one value per bucket in ``_buckets`` and the sum in ``_sum``, which a
    unit test checks against ``observe``.
    """
    buckets = child._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    if total:
        child._sum.inc(total)


class Metrics:
    """Every metric of one process; requests and tokens are tallied and folded when read."""

    def __init__(
        self, registry: CollectorRegistry | None = None, max_models: int = MAX_MODELS
    ) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_models = max_models
        r = self.registry
        self.requests = Counter(
            REQUESTS,
            "Requests finished, by API, status class, exact status code, client key name, model, "
            "outcome and origin (upstream: relayed from it; proxy: made by the proxy)",
            REQUEST_LABELS,
            registry=r,
        )
        self.duration = Histogram(
            DURATION,
            "Request duration to the last byte",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            TTFB,
            "Time to the first response byte",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter(BYTES_IN, "Request body bytes received", ["route"], registry=r)
        self.bytes_out = Counter(BYTES_OUT, "Response body bytes sent", ["route"], registry=r)
        self.upstream_errors = Counter(
            UPSTREAM_ERRORS, "Upstream failures, by kind", ["kind"], registry=r
        )
        self.limit_refusals = Counter(
            LIMIT_REFUSALS,
            "Requests refused by a key's or user's limits, by limit",
            ["limit"],
            registry=r,
        )
        self.limits_store_errors = Counter(
            LIMITS_STORE_ERRORS, "Failed calls to the Redis that holds limit counts", registry=r
        )
        self.limits_store_gauge = Gauge(
            LIMITS_STORE_UP, "1 while the limit store answers (always 1 in-process)", registry=r
        )
        self.limits_store_gauge.set(1)
        self.tokens = Counter(
            TOKENS,
            "Model tokens reported by the upstream, by client key name, model and kind",
            ["client", "model", "kind"],
            registry=r,
        )
        self.acquisitions = Counter(
            CREDENTIAL_ACQUISITIONS, "Entra ID token acquisitions started", registry=r
        )
        self.failures = Counter(
            CREDENTIAL_FAILURES, "Entra ID token acquisitions that failed", registry=r
        )
        # multiprocess_mode matters only with several workers: sum or minimum over live ones
        self.in_flight = Gauge(
            IN_FLIGHT, "Requests being relayed", registry=r, multiprocess_mode="livesum"
        )
        self.open_streams = Gauge(
            OPEN_STREAMS, "Event streams being relayed", registry=r, multiprocess_mode="livesum"
        )
        self.expires_in = Gauge(
            CREDENTIAL_EXPIRES_IN,
            "Seconds until the current Entra ID token expires",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.ready = Gauge(
            READY,
            "1 when this process has an upstream credential and is not draining",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.build_info = Gauge(
            BUILD_INFO,
            "Always 1; the labels say which claude-proxy and which Python this is",
            ["version", "python"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # With [[upstreams]]: which upstream answered, failovers between them, their standing.
        # Labels are configured upstream names and fixed reasons: a bounded set.
        self.upstream_requests = Counter(
            UPSTREAM_REQUESTS,
            "Requests an upstream answered (with [[upstreams]]), by upstream and exact status",
            ["upstream", "code"],
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            UPSTREAM_TTFB,
            "Time to the first response byte, by the upstream that answered",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failovers = Counter(
            FAILOVERS,
            "Requests moved from one upstream to the next, by reason (a status, or how the "
            "upstream failed)",
            ["from", "to", "reason"],
            registry=r,
        )
        self.upstream_state = Gauge(
            UPSTREAM_STATE,
            "1 for each upstream's current standing: ready, cooling (after 429/503/529), open "
            "(circuit after connect failures) or probing",
            ["upstream", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.upstream_recovers_in = Gauge(
            UPSTREAM_RECOVERS_IN,
            "Seconds until a cooling or open upstream may be tried again (0 when ready)",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # (route, status, client, model label, outcome) -> what was counted since the last fold
        self._tallies: dict[tuple[str, int, str, str, str, str], Tally] = {}
        # model name -> its label, for the names admitted (at most max_models of them)
        self._labels: dict[str, str] = {}
        # (client, model label) -> [input, output, cache_read, cache_write] since the last fold
        self._totals: dict[tuple[str, str], list[int]] = {}
        self._gauges: tuple[tuple[Gauge, Callable[[], float]], ...] = ()
        self._upstream_gauges: tuple[tuple[Gauge, Callable[[], float]], ...] = ()
        for kind in ERROR_KINDS:
            self.upstream_errors.labels(kind)

    def bind_state(
        self,
        in_flight: Callable[[], float],
        open_streams: Callable[[], float],
        expires_in: Callable[[], float],
        ready: Callable[[], float],
    ) -> None:
        """Gauges read from the server at scrape time, each by its own function (nothing per
        request). With several workers a scrape cannot call into them: the server's sweeper
        calls :meth:`refresh` instead."""
        self._gauges = (
            (self.in_flight, in_flight),
            (self.open_streams, open_streams),
            (self.expires_in, expires_in),
            (self.ready, ready),
        )
        if not self.multiprocess:
            for gauge, read in self._gauges:
                gauge.set_function(read)

    def bind_upstreams(
        self, upstreams: Sequence[tuple[str, Callable[[], str], Callable[[], float]]]
    ) -> None:
        """Each upstream's name, a function giving its standing (one of :data:`STANDINGS`) and
        one giving the seconds until it recovers; read at scrape time."""
        gauges: list[tuple[Gauge, Callable[[], float]]] = []
        for name, standing, recovers_in in upstreams:
            for state in STANDINGS:
                read = (lambda f, s: lambda: 1.0 if f() == s else 0.0)(standing, state)
                gauges.append((self.upstream_state.labels(name, state), read))
            gauges.append((self.upstream_recovers_in.labels(name), recovers_in))
        self._upstream_gauges = tuple(gauges)
        if not self.multiprocess:
            for gauge, read in gauges:
                gauge.set_function(read)

    def refresh(self) -> None:
        """With several workers, called each second: what the supervisor's scrape reads."""
        if self.multiprocess:
            self.fold()
            for gauge, read in self._gauges + self._upstream_gauges:
                gauge.set(read())

    def fold(self) -> None:
        """Move what was tallied since the last fold into the prometheus-client metrics."""
        for tally in self._tallies.values():
            if tally.count:
                tally.fold()
        for (client, model), total in self._totals.items():
            for i, kind in enumerate(KINDS):
                n = total[i]
                if n:
                    self.tokens.labels(client, model, kind).inc(n)  # once per scrape: no cache
                    total[i] = 0

    def observe_record(self, rec: ExchangeRecord) -> None:
        """Count one finished exchange: the request, its latency, bytes and tokens."""
        ok = rec.status < 400 and rec.outcome != "rejected"
        model = self.model_label(rec.model or rec.request_model, admit=ok or rec.model is not None)
        client = rec.client_key
        tally = self._tally(rec.api, rec.status, client, model, rec.outcome, rec.origin)
        tally.count += 1
        tally.bytes_in += rec.bytes_in
        tally.bytes_out += rec.bytes_out
        duration = rec.duration
        tally.duration[bisect_left(LATENCY_BUCKETS, duration)] += 1
        tally.duration_sum += duration
        ttfb = rec.ttfb
        if ttfb is not None and ttfb >= 0:
            tally.ttfb[bisect_left(LATENCY_BUCKETS, ttfb)] += 1
            tally.ttfb_sum += ttfb
        if rec.upstream is not None and rec.origin == "upstream":
            self.upstream_requests.labels(rec.upstream, STATUS_CODE.get(rec.status, OTHER)).inc()
            if rec.upstream_ttfb is not None and rec.upstream_ttfb >= 0:
                self.upstream_ttfb.labels(rec.upstream).observe(rec.upstream_ttfb)
        counts = (
            rec.input_tokens,
            rec.output_tokens,
            rec.cache_read_tokens,
            rec.cache_write_tokens,
        )
        if any(counts):
            total = self._totals.get((client, model))
            if total is None:
                total = self._totals[(client, model)] = [0, 0, 0, 0]
            for i, n in enumerate(counts):
                if n is not None and n > 0:
                    total[i] += n

    def model_label(self, name: str | None, admit: bool = True) -> str:
        """The label for a model name: itself once admitted (``admit``, and fewer than
        ``max_models`` so far), "other" otherwise, "unknown" for none."""
        if not name:
            return UNKNOWN
        label = self._labels.get(name)
        if label is not None:
            return label
        if not admit or len(self._labels) >= self.max_models:
            return OTHER
        label = self._labels[name] = name[:MAX_NAME]
        return label

    def _tally(
        self, route: str, status: int, client: str, model: str, outcome: str, origin: str
    ) -> Tally:
        key = (route, status, client, model, outcome, origin)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally(
                (
                    self.requests.labels(
                        route,
                        STATUS_CLASS.get(status // 100, OTHER),
                        STATUS_CODE.get(status, OTHER),
                        client,
                        model,
                        outcome,
                        origin,
                    ),
                    self.duration.labels(route, model),
                    self.ttfb.labels(route, model),
                    self.bytes_in.labels(route),
                    self.bytes_out.labels(route),
                )
            )
        return tally

    def failover(self, came_from: str, to: str, reason: str) -> None:
        self.failovers.labels(came_from, to, reason).inc()

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors.labels(kind if kind in ERROR_KINDS else "closed").inc()

    # limits.LimitObserver: labels from the bounded set of limit names, never a user

    def limit_refused(self, limit: str) -> None:
        self.limit_refusals.labels(limit).inc()

    def limits_store_error(self) -> None:
        self.limits_store_errors.inc()

    def limits_store_up(self, up: bool) -> None:
        self.limits_store_gauge.set(1 if up else 0)


def exposition(metrics: Metrics) -> bytes:
    """The text format for a scrape of this process."""
    metrics.fold()
    return generate_latest(metrics.registry)


def multiprocess_registry() -> CollectorRegistry:
    """Every worker's metrics, summed (or min'ed) as each metric's mode says."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def multiprocess_exposition() -> bytes:
    return generate_latest(multiprocess_registry())


def sample_value(registry: CollectorRegistry, name: str) -> float | None:
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None
