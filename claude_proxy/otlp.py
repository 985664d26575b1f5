"""The OpenTelemetry SDK behind :mod:`claude_proxy.telemetry`: providers, OTLP/HTTP exporters
and the health of the export. Imported only when telemetry is on.

Spans go through a ``BatchSpanProcessor`` and metrics through a
``PeriodicExportingMetricReader``: the request path appends to a queue, the SDK's threads
encode and post. The OTLP exporters log every failed export (and every retry); here their
lines are kept as the reason and one line is logged per change of state instead: when a
signal's export starts failing, and when it works again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from . import __version__
from .telemetry import (
    DURATION_BUCKETS,
    ERROR_TYPE,
    FIRST_BYTE_EVENT,
    OPERATION_DURATION,
    TOKEN_BUCKETS,
    TOKEN_TYPE,
    TOKEN_USAGE,
    Attributes,
)

logger = logging.getLogger("claude_proxy.telemetry")

SCOPE: Final = "claude_proxy"
# The loggers the OTLP exporters write each failure to, and the signal each one exports.
EXPORTER_LOGGERS: Final = {
    "opentelemetry.exporter.otlp.proto.http.trace_exporter": "spans",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter": "metrics",
}
# The batch processor's logger: "Queue full, dropping span." per span dropped (20 s apart).
QUEUE_LOGGER: Final = "opentelemetry.sdk._shared_internal"


class ExportHealth(logging.Filter):
    """One line per state change of each signal's export, instead of one per failure.

    As a filter on the exporters' loggers it keeps their first line since the last export as
    the reason and drops every one; the watched exporters call :meth:`report` with each
    export's result. Runs in the SDK's export threads.
    """

    def __init__(self, endpoints: dict[str, str]) -> None:
        super().__init__()
        self.endpoints = endpoints
        self.failing: set[str] = set()
        self.closing = False  # exports failing because the exporters were shut are no news
        self._reasons: dict[str, str] = {}
        self._queue_full_told = False
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == QUEUE_LOGGER:
            return self._queue_line(record)
        signal = EXPORTER_LOGGERS.get(record.name)
        if signal is not None:
            with self._lock:
                self._reasons.setdefault(signal, record.getMessage())
        return False

    def _queue_line(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Queue full"):
            return True
        with self._lock:
            told, self._queue_full_told = self._queue_full_told, True
        if not told:
            logger.warning(
                "telemetry: the span queue is full; spans are dropped until the export to "
                "%s catches up (logged again after it works again)",
                self.endpoints["spans"],
            )
        return False

    def report(self, signal: str, ok: bool) -> None:
        with self._lock:
            reason = self._reasons.pop(signal, None)
            if self.closing or ok == (signal not in self.failing):
                return
            if ok:
                self.failing.discard(signal)
                self._queue_full_told = False
            else:
                self.failing.add(signal)
        if ok:
            logger.info("telemetry: export of %s to %s works again", signal, self.endpoints[signal])
        else:
            logger.warning(
                "telemetry: export of %s to %s failing: %s; %s are dropped until it works "
                "again (one line then)",
                signal,
                self.endpoints[signal],
                short_reason(reason),
                signal,
            )

    def attach(self) -> None:
        for name in (*EXPORTER_LOGGERS, QUEUE_LOGGER):
            logging.getLogger(name).addFilter(self)

    def detach(self) -> None:
        for name in (*EXPORTER_LOGGERS, QUEUE_LOGGER):
            logging.getLogger(name).removeFilter(self)


_TRANSIENT = re.compile(r"Transient error (.*) encountered while exporting", re.DOTALL)


def short_reason(line: str | None) -> str:
    """The cause in an exporter's log line, without its retry schedule."""
    if not line:
        return "no reason given"
    match = _TRANSIENT.match(line)
    if match:
        return match.group(1)
    if "due to timeout, max retries or shutdown" in line:
        return "no answer within the export timeout (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by default)"
    return line


class WatchedSpans(SpanExporter):
    """The OTLP span exporter, reporting each export's result to :class:`ExportHealth`."""

    def __init__(self, inner: OTLPSpanExporter, health: ExportHealth) -> None:
        self.inner = inner
        self.health = health
        self.closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # the batch processor would log each one: a state change instead
            result = SpanExportResult.FAILURE
        self.health.report("spans", result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        if not self.closed:  # the exporter warns when shut twice
            self.closed = True
            self.inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class WatchedMetrics(MetricExporter):
    """The OTLP metric exporter, reporting each export's result to :class:`ExportHealth`."""

    def __init__(self, inner: OTLPMetricExporter, health: ExportHealth) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.health = health

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        self.health.report("metrics", result is MetricExportResult.SUCCESS)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis, **kwargs)


class ChosenIds(IdGenerator):
    """Random ids, except that the next span may be given its ids: those already sent upstream
    in a ``traceparent``. Used on the event loop's thread only."""

    def __init__(self) -> None:
        self.random = RandomIdGenerator()
        self.next_trace_id = 0
        self.next_span_id = 0

    def generate_span_id(self) -> int:
        span_id, self.next_span_id = self.next_span_id, 0
        return span_id or self.random.generate_span_id()

    def generate_trace_id(self) -> int:
        trace_id, self.next_trace_id = self.next_trace_id, 0
        return trace_id or self.random.generate_trace_id()


def make_resource(worker: int | None) -> Resource:
    """``service.name`` claude-proxy (``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
    win), and a ``service.instance.id`` of this process's own, so workers never share one."""
    given = OTELResourceDetector().detect().attributes
    attributes: dict[str, str | int] = {"service.version": __version__}
    if "service.name" not in given:
        attributes["service.name"] = "claude-proxy"
    instance = given.get("service.instance.id")
    if instance is None:
        attributes["service.instance.id"] = str(uuid.uuid4())
    elif worker is not None:
        attributes["service.instance.id"] = f"{instance}-{worker}"
    if worker is not None:
        attributes["claude_proxy.worker"] = worker
    return Resource.create(attributes)


def run_bounded(fn: Callable[[], object], timeout: float) -> bool:
    """Run ``fn`` in a daemon thread for at most ``timeout`` seconds; False if it overran
    (it is left to finish on its own: the SDK's flushes ignore their own timeouts)."""
    thread = threading.Thread(target=fn, name="claude-proxy-otel-close", daemon=True)
    thread.start()
    thread.join(max(timeout, 0.0))
    return not thread.is_alive()


class Pipeline:
    """Tracer and meter providers exporting over OTLP/HTTP, with this process's resource."""

    def __init__(
        self,
        *,
        traces_endpoint: str,
        metrics_endpoint: str,
        sample_ratio: float,
        worker: int | None = None,
    ) -> None:
        self.health = ExportHealth({"spans": traces_endpoint, "metrics": metrics_endpoint})
        self.health.attach()
        resource = make_resource(worker)
        self.instance_id = str(resource.attributes.get("service.instance.id"))
        root = TraceIdRatioBased(sample_ratio)
        self.sample_bound = root.bound
        self.ids = ChosenIds()
        self.span_exporter = WatchedSpans(OTLPSpanExporter(endpoint=traces_endpoint), self.health)
        self.processor = BatchSpanProcessor(self.span_exporter)
        self.traces = TracerProvider(
            sampler=ParentBased(root),
            resource=resource,
            shutdown_on_exit=False,  # an exit must not wait 30 s for a collector that is down
            id_generator=self.ids,
        )
        self.traces.add_span_processor(self.processor)
        self.tracer = self.traces.get_tracer(SCOPE, __version__)
        self.metric_exporter = OTLPMetricExporter(endpoint=metrics_endpoint)
        self.reader = PeriodicExportingMetricReader(
            WatchedMetrics(self.metric_exporter, self.health)
        )
        self.meters = MeterProvider(
            metric_readers=[self.reader], resource=resource, shutdown_on_exit=False
        )
        meter = self.meters.get_meter(SCOPE, __version__)
        self.token_usage = meter.create_histogram(
            TOKEN_USAGE,
            unit="{token}",
            description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.duration = meter.create_histogram(
            OPERATION_DURATION,
            unit="s",
            description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    def span(
        self,
        name: str,
        *,
        parent: tuple[int, int, int] | None,
        ids: tuple[int, int] | None,
        start_ns: int,
        end_ns: int,
        first_byte_ns: int | None,
        attributes: Attributes,
        error: str | None,
    ) -> None:
        """Record one finished span; ``ids`` (trace, span) when they were chosen beforehand."""
        context = None
        if parent is not None:
            remote = SpanContext(parent[0], parent[1], True, TraceFlags(parent[2]))
            context = set_span_in_context(NonRecordingSpan(remote))
        if ids is not None:
            self.ids.next_trace_id, self.ids.next_span_id = ids
        try:
            span = self.tracer.start_span(
                name, context, SpanKind.CLIENT, attributes, start_time=start_ns
            )
        finally:
            self.ids.next_trace_id = self.ids.next_span_id = 0
        if not span.is_recording():
            return
        if first_byte_ns is not None:
            span.add_event(FIRST_BYTE_EVENT, timestamp=first_byte_ns)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end_ns)

    def measure(
        self,
        attributes: Attributes,
        duration: float,
        error: str | None,
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> None:
        """The GenAI client metrics of one operation."""
        if input_tokens is not None:
            self.token_usage.record(input_tokens, {**attributes, TOKEN_TYPE: "input"})
        if output_tokens is not None:
            self.token_usage.record(output_tokens, {**attributes, TOKEN_TYPE: "output"})
        if error is not None:
            attributes = {**attributes, ERROR_TYPE: error}
        self.duration.record(duration, attributes)

    def force_flush(self, timeout: float) -> bool:
        millis = int(timeout * 1000)
        return run_bounded(
            lambda: (self.traces.force_flush(millis), self.meters.force_flush(millis)), timeout
        )

    def shutdown(self, timeout: float) -> None:
        """Flush and stop within about ``timeout``: a collector that is already known to be
        down gets no flush, and the exporters are closed, which cuts their retries short."""
        deadline = time.monotonic() + timeout
        if "spans" not in self.health.failing:
            run_bounded(self.processor.force_flush, timeout / 2)
        self.health.closing = True
        self.span_exporter.shutdown()  # cuts a retry short; what is left in the queue is dropped
        run_bounded(self.traces.shutdown, deadline - time.monotonic())
        millis = max(0.0, (deadline - time.monotonic()) * 1000)
        run_bounded(lambda: self.meters.shutdown(timeout_millis=millis), millis / 1000)
        self.health.detach()
