"""Prometheus metrics, via prometheus-client; only recorded when the admin listener is on.

Labels come from bounded sets only: the route family (anthropic, openai, other), the status
class, the client key's configured name (or passthrough / rejected / open), the upstream error
kind, and the model name, capped at :data:`MAX_MODELS` distinct values ("other" past that).
Never a raw path, never a key.

With several workers, prometheus-client's multiprocess mode aggregates them: the supervisor
sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start and serves the sum.
"""

from __future__ import annotations

import os
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


class Metrics:
    """Every metric of one process, with labelled children cached off the hot path."""

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
        self._children: dict[
            tuple[str, str, str], tuple[Counter, Histogram, Histogram, Counter, Counter]
        ] = {}
        self._models: set[str] = set()
        self._token_children: dict[tuple[str, str, str], Counter] = {}
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
        if self.multiprocess:
            for gauge, read in self._gauges:
                gauge.set(read())

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
        key = (route, STATUS_CLASS.get(status // 100, "other"), client)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(*key),
                self.duration.labels(route),
                self.ttfb.labels(route),
                self.bytes_in.labels(route),
                self.bytes_out.labels(route),
            )
        requests, dur, first, b_in, b_out = children
        requests.inc()
        dur.observe(duration)
        if ttfb >= 0:
            first.observe(ttfb)
        if bytes_in:
            b_in.inc(bytes_in)
        if bytes_out:
            b_out.inc(bytes_out)

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors.labels(kind if kind in ERROR_KINDS else "closed").inc()

    def usage(self, client: str, model: str | None, counts: dict[str, int]) -> None:
        name = model or "unknown"
        if name not in self._models:
            if len(self._models) >= MAX_MODELS:
                name = "other"
            else:
                self._models.add(name)
        for kind, n in counts.items():
            if n:
                key = (client, name, kind)
                child = self._token_children.get(key)
                if child is None:
                    child = self._token_children[key] = self.tokens.labels(*key)
                child.inc(n)


def exposition(metrics: Metrics) -> bytes:
    """The text format for a scrape of this process."""
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
