"""OpenTelemetry traces and GenAI metrics, built from each finished exchange's record.

Off unless ``[telemetry] otlp_endpoint`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT``) names a collector.
Then :func:`from_config` returns a :class:`Telemetry`, and the relay hands it every
:class:`~claude_proxy.record.ExchangeRecord` in deferred bookkeeping, after the response went
out: the span is made there, with the exchange's own start and end times, so nothing of it runs
on the request path. Only :meth:`Telemetry.child_traceparent` runs at head time, and only with
``propagate = true``. Export happens in background threads (:mod:`claude_proxy.otlp`).

This module imports nothing from OpenTelemetry: :mod:`claude_proxy.otlp` is imported when a
:class:`Telemetry` is made. What a span and a metric say (names, attributes, trace context) is
plain functions here, after the GenAI and HTTP semantic conventions. Never a prompt, a
completion or a key: the record holds none.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import random
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from .config import Config, TelemetryConfig
from .errors import ConfigError
from .logs import register_secret
from .record import ExchangeRecord

if TYPE_CHECKING:
    from .otlp import Pipeline

logger = logging.getLogger(__name__)

Attributes = dict[str, str | int | float]

# Attribute names (semantic conventions, and ours under claude_proxy.*).
OPERATION: Final = "gen_ai.operation.name"
PROVIDER: Final = "gen_ai.provider.name"
SYSTEM: Final = "gen_ai.system"  # the deprecated name of gen_ai.provider.name, still read widely
REQUEST_MODEL: Final = "gen_ai.request.model"
RESPONSE_MODEL: Final = "gen_ai.response.model"
INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
TOKEN_TYPE: Final = "gen_ai.token.type"  # noqa: S105 - not a secret
ERROR_TYPE: Final = "error.type"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
FIRST_BYTE_EVENT: Final = "claude_proxy.first_byte"

# Metric names and bucket boundaries as the GenAI conventions advise.
TOKEN_USAGE: Final = "gen_ai.client.token.usage"  # noqa: S105
OPERATION_DURATION: Final = "gen_ai.client.operation.duration"
TOKEN_BUCKETS: Final = tuple(4**n for n in range(14))  # 1, 4, 16, ... 67108864
DURATION_BUCKETS: Final = tuple(0.01 * 2**n for n in range(14))  # 0.01, 0.02, ... 81.92 s

# The path's last segments -> gen_ai.operation.name (POST only); first match wins.
OPERATIONS: Final = (
    ("/messages", "chat"),  # Anthropic Messages
    ("/chat/completions", "chat"),
    ("/responses", "chat"),  # OpenAI Responses, named as chat per the conventions' examples
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
)
# Outcomes that are no fault of the proxy or the upstream: not an error.type.
NOT_ERRORS: Final = frozenset({"complete", "client_aborted"})

SDK_DISABLED_ENV: Final = "OTEL_SDK_DISABLED"
HEADER_ENVS: Final = (
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
)
SIGNAL_ENDPOINT_ENV: Final = {
    "traces": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "metrics": "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
}
TEMPORALITY_ENV: Final = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"
INTERVAL_ENV: Final = "OTEL_METRIC_EXPORT_INTERVAL"
_TRACE_ID_LIMIT: Final = (1 << 64) - 1

# --------------------------------------------------------------------------- what a span says


def operation_of(method: str, path: str) -> str | None:
    """The GenAI operation a request is, from its method and path; None for anything else
    (``HEAD /anthropic``, ``GET /v1/models``, ``/v1/messages/count_tokens``, ...)."""
    if method != "POST":
        return None
    path = path.rstrip("/")
    for suffix, operation in OPERATIONS:
        if path.endswith(suffix):
            return operation
    return None


def span_name(operation: str | None, model: str | None, method: str) -> str:
    """``chat claude-sonnet-4-5`` for a GenAI operation (the conventions' ``{operation}
    {model}``); the bare method for other requests, as HTTP spans without a route are named."""
    if operation is None:
        return method
    return f"{operation} {model}" if model else operation


def error_type(rec: ExchangeRecord) -> str | None:
    """``error.type``: the status code for 4xx/5xx, else the outcome when the exchange did not
    complete (``upstream_aborted``, ``idle_timeout``, ``drain_cut``); None when all went well
    or the client chose to leave."""
    if rec.status >= 400:
        return str(rec.status)
    if rec.outcome not in NOT_ERRORS:
        return rec.outcome
    return None


def span_attributes(
    rec: ExchangeRecord, operation: str | None, server: tuple[str, int]
) -> Attributes:
    """Everything the span says about one exchange; ``error.type`` is added by the caller."""
    attributes: Attributes = {
        PROVIDER: rec.api,
        SYSTEM: rec.api,
        "http.request.method": rec.method,
        "url.path": rec.path,
        SERVER_ADDRESS: server[0],
        SERVER_PORT: server[1],
        "http.request.body.size": rec.bytes_in,
        "http.response.body.size": rec.bytes_out,
        "claude_proxy.outcome": rec.outcome,
        "claude_proxy.client_key": rec.client_key,
        "claude_proxy.request_id": rec.request_id,
    }
    if operation is not None:
        attributes[OPERATION] = operation
    if rec.status:
        attributes["http.response.status_code"] = rec.status
    optional: tuple[tuple[str, str | int | None], ...] = (
        (REQUEST_MODEL, rec.request_model),
        (RESPONSE_MODEL, rec.model),
        (INPUT_TOKENS, rec.input_tokens),
        (OUTPUT_TOKENS, rec.output_tokens),
        ("claude_proxy.upstream", rec.upstream),
        ("claude_proxy.upstream_request_id", rec.upstream_request_id),
        ("user_agent.original", rec.user_agent),
    )
    for name, value in optional:
        if value is not None:
            attributes[name] = value
    if rec.attempts != 1:
        attributes["claude_proxy.attempts"] = rec.attempts
    return attributes


# --------------------------------------------------------------------------- GenAI metrics

# A histogram series: (operation, provider, request model, response model, token type or
# error.type); the server is the same for every series of a process.
SeriesKey = tuple[str, str, str | None, str | None, str | None]
MAX_SERIES: Final = 2000  # per metric, as the SDK's default cardinality limit; then overflow
OVERFLOW: Final = ("", "", None, None, "otel.metric.overflow")


def series_attributes(
    metric: str, key: SeriesKey, server: tuple[str, int]
) -> Attributes | dict[str, bool]:
    """The attributes of one series, as the GenAI conventions give them."""
    if key == OVERFLOW:
        return {"otel.metric.overflow": True}
    operation, provider, request_model, response_model, last = key
    attributes: Attributes = {
        OPERATION: operation,
        PROVIDER: provider,
        SERVER_ADDRESS: server[0],
        SERVER_PORT: server[1],
    }
    if request_model:
        attributes[REQUEST_MODEL] = request_model
    if response_model:
        attributes[RESPONSE_MODEL] = response_model
    if last is not None:
        attributes[TOKEN_TYPE if metric == TOKEN_USAGE else ERROR_TYPE] = last
    return attributes


class Series:
    """One histogram series in plain numbers: a count per bucket (the last one for +Inf)."""

    __slots__ = ("buckets", "count", "max", "min", "start_ns", "sum")

    def __init__(self, size: int, start_ns: int) -> None:
        self.buckets = [0] * size
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.start_ns = start_ns

    def add(self, value: float, bounds: tuple[float, ...]) -> None:
        self.buckets[bisect_left(bounds, value)] += 1  # bucket i: (bounds[i-1], bounds[i]]
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def copy(self) -> Series:
        twin = Series(0, self.start_ns)
        twin.buckets = list(self.buckets)
        twin.count, twin.sum, twin.min, twin.max = self.count, self.sum, self.min, self.max
        return twin


class Histograms:
    """``gen_ai.client.token.usage`` and ``gen_ai.client.operation.duration``, kept here rather
    than in the SDK's instruments: ``Histogram.record`` cleans and hashes every attribute on
    every call (about 25 µs each with these attributes, three calls per request), where this is
    a tuple, a dict lookup and a bisect per value. The export thread takes copies under the
    lock (:meth:`collect`)."""

    def __init__(self, now_ns: int) -> None:
        self.series: dict[str, dict[SeriesKey, Series]] = {TOKEN_USAGE: {}, OPERATION_DURATION: {}}
        self.start_ns = now_ns
        self._lock = threading.Lock()

    def _add(self, metric: str, key: SeriesKey, value: float, bounds: tuple[float, ...]) -> None:
        table = self.series[metric]
        series = table.get(key)
        if series is None:
            if len(table) >= MAX_SERIES - 1:
                key = OVERFLOW
            series = table.get(key)
            if series is None:
                series = table[key] = Series(len(bounds) + 1, self.start_ns)
        series.add(value, bounds)

    def observe(self, rec: ExchangeRecord, operation: str, error: str | None) -> None:
        """One GenAI operation: its duration and, when reported, its tokens."""
        provider, request_model, model = rec.api, rec.request_model, rec.model
        key: SeriesKey
        with self._lock:
            if rec.input_tokens is not None:
                key = (operation, provider, request_model, model, "input")
                self._add(TOKEN_USAGE, key, rec.input_tokens, TOKEN_BUCKETS)
            if rec.output_tokens is not None:
                key = (operation, provider, request_model, model, "output")
                self._add(TOKEN_USAGE, key, rec.output_tokens, TOKEN_BUCKETS)
            key = (operation, provider, request_model, model, error)
            self._add(OPERATION_DURATION, key, rec.duration, DURATION_BUCKETS)

    def collect(self, now_ns: int, *, delta: bool) -> dict[str, dict[SeriesKey, Series]]:
        """Copies of every series; with ``delta``, what came since the last collect (and the
        series start again from now)."""
        with self._lock:
            if not delta:
                return {m: {k: s.copy() for k, s in t.items()} for m, t in self.series.items()}
            taken = self.series
            self.series = {metric: {} for metric in taken}
            self.start_ns = now_ns
            return taken


def histogram_delta(env: Mapping[str, str]) -> bool:
    """``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``: delta and lowmemory make
    histograms delta; cumulative (the default) keeps them cumulative."""
    preference = env.get(TEMPORALITY_ENV, "cumulative").strip().lower()
    return preference in ("delta", "lowmemory")


def export_interval(env: Mapping[str, str]) -> float:
    """Seconds between metric exports: ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds, 60000)."""
    try:
        millis = float(env.get(INTERVAL_ENV, "60000"))
    except ValueError:
        millis = 60000.0
    return millis / 1000 if millis > 0 else 60.0


# --------------------------------------------------------------------------- trace context

# W3C Trace Context, as opentelemetry's TraceContextTextMapPropagator reads it (which also
# logs a warning for each over-long header: a client could make it log per request).
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*|[ \t]*)\Z", re.DOTALL
)
TRACEPARENT_MAX: Final = 512


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a valid ``traceparent``, else None."""
    if not value or len(value) > TRACEPARENT_MAX:
        return None
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_hex, span_hex, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest.strip(" \t")):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags, 16)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def _trace_id() -> int:
    return random.getrandbits(128) or 1  # ids need uniqueness, not secrecy (as the SDK's)


def _span_id() -> int:
    return random.getrandbits(64) or 1


# --------------------------------------------------------------------------- configuration


def signal_endpoint(base: str, signal: str, env: Mapping[str, str]) -> str:
    """Where one signal goes: ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`` when set (a full
    URL, as the SDKs take it), else ``{base}/v1/{signal}``."""
    return env.get(SIGNAL_ENDPOINT_ENV[signal]) or f"{base.rstrip('/')}/v1/{signal}"


def header_values(env: Mapping[str, str]) -> list[str]:
    """The values in the OTLP header variables (``k=v,k2=v2``): collector API keys, mostly."""
    values = []
    for name in HEADER_ENVS:
        for item in env.get(name, "").split(","):
            _, sep, value = item.partition("=")
            if sep and value.strip():
                values.append(unquote(value.strip()))
    return values


def upstream_server(upstream_url: str) -> tuple[str, int]:
    """``server.address`` and ``server.port`` of the upstream."""
    url = urlsplit(upstream_url)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def sdk_disabled(env: Mapping[str, str]) -> bool:
    return env.get(SDK_DISABLED_ENV, "").strip().lower() == "true"


def from_config(
    config: Config, *, worker: int | None = None, env: Mapping[str, str] | None = None
) -> Telemetry | None:
    """A :class:`Telemetry` when the config names a collector, else None (and nothing from
    OpenTelemetry is imported). ``worker``: this process's index when there are several."""
    env = os.environ if env is None else env
    if config.telemetry.otlp_endpoint is None:
        return None
    if sdk_disabled(env):
        logger.info("telemetry off: %s=true", SDK_DISABLED_ENV)
        return None
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        raise ConfigError(
            "telemetry.otlp_endpoint: set, but OpenTelemetry is not installed; "
            "pip install 'claude-proxy[otel]'"
        )
    upstreams = {u.name: u.url for u in config.targets()} if config.upstreams else None
    return Telemetry(
        config.telemetry, config.first_url, worker=worker, env=env, upstreams=upstreams
    )


# --------------------------------------------------------------------------- the consumer


class Telemetry:
    """One process's traces and GenAI metrics.

    :meth:`on_record` and :meth:`child_traceparent` are called on the event loop's thread;
    export runs in background threads and never waits on the loop, nor the loop on it.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        upstream_url: str,
        *,
        worker: int | None = None,
        env: Mapping[str, str] | None = None,
        upstreams: Mapping[str, str] | None = None,
    ) -> None:
        """``env`` is read for the endpoints, header secrets and metric settings; the OTLP
        exporters read their own variables (headers, timeout, TLS) from ``os.environ``.
        ``upstreams``: name to URL, with several: a span names the one that answered."""
        from . import otlp  # the SDK, only now

        env = os.environ if env is None else env
        assert config.otlp_endpoint is not None
        for value in header_values(env):
            register_secret(value)
        self.server = upstream_server(upstream_url)
        self.servers = {name: upstream_server(url) for name, url in (upstreams or {}).items()}
        self.propagate = config.propagate
        self.traces_endpoint = signal_endpoint(config.otlp_endpoint, "traces", env)
        self.metrics_endpoint = signal_endpoint(config.otlp_endpoint, "metrics", env)
        self.histograms = Histograms(time.time_ns())
        self._pipeline: Pipeline = otlp.Pipeline(
            traces_endpoint=self.traces_endpoint,
            metrics_endpoint=self.metrics_endpoint,
            sample_ratio=config.sample_ratio,
            histograms=self.histograms,
            server=self.server,
            delta=histogram_delta(env),
            interval=export_interval(env),
            worker=worker,
        )
        self._sample_bound = self._pipeline.sample_bound
        logger.info(
            "telemetry: OTLP/HTTP spans to %s, metrics to %s (service.instance.id %s); "
            "sample_ratio %s, propagate %s",
            self.traces_endpoint,
            self.metrics_endpoint,
            self._pipeline.instance_id,
            config.sample_ratio,
            "on" if config.propagate else "off",
        )

    def child_traceparent(self, incoming: str | None) -> str:
        """The ``traceparent`` to send upstream, naming the span this exchange will get.

        Called at head time (``propagate = true``), given the client's ``traceparent`` or None.
        The relay keeps the value and passes it back to :meth:`on_record`, which gives the span
        exactly these ids; the sampled flag is the decision that span will get.
        """
        span_id = _span_id()
        parent = parse_traceparent(incoming)
        if parent is not None:
            return format_traceparent(parent[0], span_id, bool(parent[2] & 1))
        trace_id = _trace_id()
        return format_traceparent(
            trace_id, span_id, (trace_id & _TRACE_ID_LIMIT) < self._sample_bound
        )

    def on_record(self, rec: ExchangeRecord, sent_traceparent: str | None = None) -> None:
        """One span (and, for a GenAI operation, its metrics) for a finished exchange.

        ``sent_traceparent``: what :meth:`child_traceparent` returned for this exchange.
        """
        operation = operation_of(rec.method, rec.path)
        error = error_type(rec)
        if operation is not None:
            self.histograms.observe(rec, operation, error)
        parent = parse_traceparent(rec.traceparent)
        sent = parse_traceparent(sent_traceparent)
        # the SDK's ParentBased(TraceIdRatioBased(sample_ratio)), decided before anything is built
        if sent is not None:  # ids and decision made at head time
            trace_id, span_id, sampled = sent[0], sent[1], bool(sent[2] & 1)
        elif parent is not None:  # the parent decides
            trace_id, span_id, sampled = parent[0], _span_id(), bool(parent[2] & 1)
        else:  # a new trace: its id decides
            trace_id, span_id = _trace_id(), _span_id()
            sampled = (trace_id & _TRACE_ID_LIMIT) < self._sample_bound
        if not sampled:
            return
        server = self.servers.get(rec.upstream, self.server) if rec.upstream else self.server
        attributes = span_attributes(rec, operation, server)
        if error is not None:
            attributes[ERROR_TYPE] = error
        start = int(rec.start_time * 1e9)
        self._pipeline.span(
            span_name(operation, rec.request_model or rec.model, rec.method),
            trace_id=trace_id,
            span_id=span_id,
            parent=parent,
            start_ns=start,
            end_ns=start + int(rec.duration * 1e9),
            first_byte_ns=start + int(rec.ttfb * 1e9) if rec.ttfb is not None else None,
            attributes=attributes,
            error=error,
        )

    def force_flush(self, timeout: float = 10.0) -> bool:
        """Export what is buffered now; blocks (call it from a thread, not the loop)."""
        return self._pipeline.force_flush(timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is left and stop, within about ``timeout`` whatever the collector does;
        blocks (see :meth:`aclose`)."""
        self._pipeline.shutdown(timeout)

    async def aclose(self, timeout: float = 5.0) -> None:
        """:meth:`shutdown` in a thread, so the loop keeps serving while the last spans go."""
        await asyncio.to_thread(self._pipeline.shutdown, timeout)
