"""Prometheus metrics, via prometheus-client; only recorded when the admin listener is on.

A request is counted in plain integers (:class:`Tally`), at a fraction of the cost of
prometheus-client's locked values, and the tallies are folded into the prometheus-client
metrics when they are read: before every scrape, and each second with several workers.

Labels come from bounded sets only: the route family (anthropic, openai, other), the status
class, the client key's configured name (or passthrough / rejected / open), the upstream error
kind, and the model name, capped at :data:`MAX_MODELS` distinct values ("other" past that).
Never a raw path, never a key.

With several workers, prometheus-client's multiprocess mode aggregates them: the supervisor
sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start and serves the sum.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .usage import KINDS

NAMESPACE: Final = "claude_proxy"
REQUESTS: Final = "claude_proxy_requests"
DURATION: Final = "claude_proxy_request_duration_seconds"
TTFB: Final = "claude_proxy_time_to_first_byte_seconds"
BYTES_IN: Final = "claude_proxy_request_bytes"
BYTES_OUT: Final = "claude_proxy_response_bytes"
UPSTREAM_ERRORS: Final = "claude_proxy_upstream_errors"
IN_FLIGHT: Final = "claude_proxy_requests_in_flight"
OPEN_STREAMS: Final = "claude_proxy_open_streams"
TOKENS: Final = "claude_proxy_tokens"
CREDENTIAL_ACQUISITIONS: Final = "claude_proxy_credential_acquisitions"
CREDENTIAL_FAILURES: Final = "claude_proxy_credential_failures"
CREDENTIAL_EXPIRES_IN: Final = "claude_proxy_credential_expires_in_seconds"
READY: Final = "claude_proxy_ready"

MAX_MODELS: Final = 64
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
ERROR_KINDS: Final = frozenset(
    {"connect_refused", "connect_timeout", "closed", "malformed", "idle_timeout", "credential"}
)


def route_of(path: bytes) -> str:
    if b"/anthropic" in path or b"/v1/messages" in path:
        return "anthropic"
    if b"/openai" in path or b"/v1/chat" in path or b"/v1/responses" in path:
        return "openai"
    return "other"


class Tally:
    """One (route, status class, client)'s requests since the last fold, in plain numbers."""

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

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            REQUESTS,
            "Requests answered, by route family, status class and client key name",
            ["route", "status", "client"],
            registry=r,
        )
        self.duration = Histogram(
            DURATION,
            "Request duration to the last byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            TTFB, "Time to the first response byte", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.bytes_in = Counter(BYTES_IN, "Request body bytes received", ["route"], registry=r)
        self.bytes_out = Counter(BYTES_OUT, "Response body bytes sent", ["route"], registry=r)
        self.upstream_errors = Counter(
            UPSTREAM_ERRORS, "Upstream failures, by kind", ["kind"], registry=r
        )
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
        self._tallies: dict[tuple[str, int, str], Tally] = {}
        self._models: set[str] = set()
        # (client, model label) -> [input, output, cache_read, cache_write] since the last fold,
        # and the same lists by (client, model as reported), the request path's lookup
        self._totals: dict[tuple[str, str], list[int]] = {}
        self._tokens: dict[tuple[str, str | None], list[int]] = {}
        self._gauges: tuple[tuple[Gauge, Callable[[], float]], ...] = ()
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

    def refresh(self) -> None:
        """With several workers, called each second: what the supervisor's scrape reads."""
        if self.multiprocess:
            self.fold()
            for gauge, read in self._gauges:
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

    def observe(
        self,
        route: str,
        status: int,
        client: str,
        ttfb: float,
        duration: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        key = (route, status // 100, client)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally(
                (
                    self.requests.labels(route, STATUS_CLASS.get(key[1], "other"), client),
                    self.duration.labels(route),
                    self.ttfb.labels(route),
                    self.bytes_in.labels(route),
                    self.bytes_out.labels(route),
                )
            )
        tally.count += 1
        tally.bytes_in += bytes_in
        tally.bytes_out += bytes_out
        tally.duration[bisect_left(LATENCY_BUCKETS, duration)] += 1
        tally.duration_sum += duration
        if ttfb >= 0:
            tally.ttfb[bisect_left(LATENCY_BUCKETS, ttfb)] += 1
            tally.ttfb_sum += ttfb

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors.labels(kind if kind in ERROR_KINDS else "closed").inc()

    def usage(self, client: str, model: str | None, tokens: list[int]) -> None:
        """Add one response's ``tokens`` (one count per kind, -1 for none)."""
        key = (client, model)
        total = self._tokens.get(key)
        if total is None:
            total = self._token_total(client, model)
        # spelled out rather than looped: this runs once per response
        n = tokens[0]
        if n > 0:
            total[0] += n
        n = tokens[1]
        if n > 0:
            total[1] += n
        n = tokens[2]
        if n > 0:
            total[2] += n
        n = tokens[3]
        if n > 0:
            total[3] += n

    def _token_total(self, client: str, model: str | None) -> list[int]:
        """The running total for a client and model; past :data:`MAX_MODELS` distinct names,
        models share the one labelled "other" (and are looked up here each time)."""
        name = model or "unknown"
        if name not in self._models:
            if len(self._models) >= MAX_MODELS:
                name = "other"
            else:
                self._models.add(name)
        total = self._totals.get((client, name))
        if total is None:
            total = self._totals[(client, name)] = [0, 0, 0, 0]
        if name != "other":
            self._tokens[(client, model)] = total
        return total


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
