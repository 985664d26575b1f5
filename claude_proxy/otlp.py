"""The OpenTelemetry SDK behind :mod:`claude_proxy.telemetry`: the tracer provider, the OTLP/HTTP
exporters and the health of the export. Imported only when telemetry is on.

Spans go through a ``BatchSpanProcessor``: the loop appends each finished span to a queue and
the SDK's thread encodes and posts it. The GenAI histograms are counted in plain numbers
(:class:`~claude_proxy.telemetry.Histograms`, far cheaper than the SDK's instruments) and
posted by :class:`MetricsExport`'s thread every ``OTEL_METRIC_EXPORT_INTERVAL``, in the SDK's
data model, through the official OTLP metric exporter.

The OTLP exporters log every failed export and every retry; here their lines are kept as the
reason and one line is logged per change of state instead: when a signal's export starts
failing, and when it works again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Final

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from . import __version__
from .telemetry import (
    DURATION_BUCKETS,
    FIRST_BYTE_EVENT,
    OPERATION_DURATION,
    TOKEN_BUCKETS,
    TOKEN_USAGE,
    Attributes,
    Histograms,
    series_attributes,
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


# What the conventions say of each metric: unit, description, bucket boundaries.
METRICS: Final = {
    TOKEN_USAGE: ("{token}", "Number of input and output tokens used", TOKEN_BUCKETS),
    OPERATION_DURATION: ("s", "GenAI operation duration", DURATION_BUCKETS),
}


class MetricsExport:
    """Exports :class:`~claude_proxy.telemetry.Histograms` every ``interval`` seconds from a
    thread of its own, through the official OTLP metric exporter."""

    def __init__(
        self,
        exporter: OTLPMetricExporter,
        histograms: Histograms,
        health: ExportHealth,
        *,
        resource: Resource,
        server: tuple[str, int],
        delta: bool,
        interval: float,
    ) -> None:
        self.exporter = exporter
        self.histograms = histograms
        self.health = health
        self.resource = resource
        self.server = server
        self.delta = delta
        self.interval = interval
        self.scope = InstrumentationScope(SCOPE, __version__)
        self._lock = threading.Lock()  # one export at a time: the periodic one or a flush
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claude-proxy-otlp-metrics")
        self._thread.daemon = True  # never holds up an exit; shutdown exports what is left
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.export()

    def data(self, now_ns: int) -> MetricsData | None:
        """What the histograms hold now, as the SDK's data model (which the exporter encodes)."""
        temporality = (
            AggregationTemporality.DELTA if self.delta else AggregationTemporality.CUMULATIVE
        )
        metrics = []
        for name, table in self.histograms.collect(now_ns, delta=self.delta).items():
            unit, description, bounds = METRICS[name]
            points = [
                HistogramDataPoint(
                    attributes=series_attributes(name, key, self.server),
                    start_time_unix_nano=series.start_ns,
                    time_unix_nano=now_ns,
                    count=series.count,
                    sum=series.sum,
                    bucket_counts=series.buckets,
                    explicit_bounds=bounds,
                    min=series.min,
                    max=series.max,
                )
                for key, series in table.items()
                if series.count
            ]
            if points:
                data = Histogram(data_points=points, aggregation_temporality=temporality)
                metrics.append(Metric(name, description, unit, data))
        if not metrics:
            return None
        scope = ScopeMetrics(scope=self.scope, metrics=metrics, schema_url="")
        return MetricsData([ResourceMetrics(self.resource, [scope], self.resource.schema_url)])

    def export(self) -> bool:
        with self._lock:
            data = self.data(time.time_ns())
            if data is None:
                return True
            try:
                result = self.exporter.export(data)
            except Exception:  # as for spans: a state change, not a traceback per export
                result = MetricExportResult.FAILURE
            ok = result is MetricExportResult.SUCCESS
            self.health.report("metrics", ok)
            return ok

    def shutdown(self, timeout: float) -> None:
        self._stop.set()
        if "metrics" not in self.health.failing:
            run_bounded(self.export, timeout)
        self.exporter.shutdown()


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


ERROR: Final = Status(StatusCode.ERROR)
UNSET: Final = Status(StatusCode.UNSET)
SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)


class Pipeline:
    """Spans and the metrics' export over OTLP/HTTP, with this process's resource.

    A span is built finished, as the SDK's ``ReadableSpan`` handed to the batch processor, not
    started and ended through a tracer: the exchange is over when its record arrives, its
    attributes are already clean, and the sampling decision is made before (the same rules as
    ``ParentBased(TraceIdRatioBased)``, in :meth:`Telemetry.on_record`). The tracer's way
    costs about 50 µs of the loop's time per span; this, a few.
    """

    def __init__(
        self,
        *,
        traces_endpoint: str,
        metrics_endpoint: str,
        sample_ratio: float,
        histograms: Histograms,
        server: tuple[str, int],
        delta: bool,
        interval: float,
        worker: int | None = None,
    ) -> None:
        self.health = ExportHealth({"spans": traces_endpoint, "metrics": metrics_endpoint})
        self.health.attach()
        self.resource = resource = make_resource(worker)
        self.instance_id = str(resource.attributes.get("service.instance.id"))
        self.scope = InstrumentationScope(SCOPE, __version__)
        self.sample_bound = TraceIdRatioBased(sample_ratio).bound
        self.span_exporter = WatchedSpans(OTLPSpanExporter(endpoint=traces_endpoint), self.health)
        self.processor = BatchSpanProcessor(self.span_exporter)
        self.metrics = MetricsExport(
            OTLPMetricExporter(endpoint=metrics_endpoint),
            histograms,
            self.health,
            resource=resource,
            server=server,
            delta=delta,
            interval=interval,
        )

    def span(
        self,
        name: str,
        *,
        trace_id: int,
        span_id: int,
        parent: tuple[int, int, int] | None,
        start_ns: int,
        end_ns: int,
        first_byte_ns: int | None,
        attributes: Attributes,
        error: str | None,
    ) -> None:
        """Queue one finished, sampled span for export."""
        remote = None
        if parent is not None:
            remote = SpanContext(parent[0], parent[1], True, TraceFlags(parent[2]))
        events = () if first_byte_ns is None else (Event(FIRST_BYTE_EVENT, None, first_byte_ns),)
        span = ReadableSpan(
            name,
            SpanContext(trace_id, span_id, False, SAMPLED),
            remote,
            self.resource,
            attributes,
            events,
            kind=SpanKind.CLIENT,
            status=UNSET if error is None else ERROR,
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=self.scope,
        )
        self.processor.on_end(span)

    def force_flush(self, timeout: float) -> bool:
        millis = int(timeout * 1000)
        return run_bounded(
            lambda: (self.processor.force_flush(millis), self.metrics.export()), timeout
        )

    def shutdown(self, timeout: float) -> None:
        """Flush and stop within about ``timeout``: a collector that is already known to be
        down gets no flush, and the exporters are closed, which cuts their retries short."""
        deadline = time.monotonic() + timeout
        if "spans" not in self.health.failing:
            run_bounded(self.processor.force_flush, timeout / 2)
        self.health.closing = True
        self.span_exporter.shutdown()  # cuts a retry short; what is left in the queue is dropped
        run_bounded(self.processor.shutdown, deadline - time.monotonic())
        self.health.closing = False  # the metrics' last export is news, if it fails
        self.metrics.shutdown(deadline - time.monotonic())
        self.health.detach()
