"""OTLP/HTTP export checked at a real receiver on loopback, decoded with opentelemetry-proto.

Records go in as the relay hands them over; what the collector receives is read back and its
attributes checked. A dead collector (a bound port nobody listens on) must neither raise nor
hold up ``on_record``, and must cost one log line, not one per export.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from claude_proxy.config import TelemetryConfig
from claude_proxy.record import ExchangeRecord
from claude_proxy.telemetry import DURATION_BUCKETS, TOKEN_BUCKETS, Telemetry
from tests.helpers import secret
from tests.records import exchange_record

UPSTREAM = "https://res.services.ai.azure.com"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def value_of(kv: KeyValue) -> Any:
    v = kv.value
    return getattr(v, v.WhichOneof("value"))


def attrs(items: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv) for kv in items}


class Collector:
    """An OTLP/HTTP receiver: keeps every span and metric it is sent; ``status`` is its answer."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []  # (resource attributes, span)
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.status = 200
        self.posts = 0
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def traces(self, request: web.Request) -> web.Response:
        self.posts += 1
        self.headers.append(dict(request.headers))
        if self.status != 200:
            return web.Response(status=self.status)
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for rs in message.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                self.spans += [(resource, span) for span in ss.spans]
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def metrics_post(self, request: web.Request) -> web.Response:
        self.posts += 1
        if self.status != 200:
            return web.Response(status=self.status)
        message = ExportMetricsServiceRequest()
        message.ParseFromString(await request.read())
        self.metrics.append(message)
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        app.router.add_post("/v1/metrics", self.metrics_post)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}"

    def histogram(self, name: str) -> list[Any]:
        """Every data point of the metric ``name`` in the last export that carried it."""
        for message in reversed(self.metrics):
            for rm in message.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name == name:
                            return list(metric.histogram.data_points)
        return []


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    await c.start()
    yield c
    assert c.runner is not None
    await c.runner.cleanup()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def lines() -> Iterator[Lines]:
    """What our telemetry logger says, and anything OpenTelemetry's own loggers let through."""
    handler = Lines()
    loggers = [logging.getLogger("claude_proxy.telemetry"), logging.getLogger("opentelemetry")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


@pytest.fixture(autouse=True)
def short_export_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # a refused connection is retried for up to this long; the exporters read it at start
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)


def make(url: str, **changes: Any) -> Telemetry:
    config = dataclasses.replace(TelemetryConfig(otlp_endpoint=url), **changes)
    return Telemetry(config, UPSTREAM)


def record(**changes: Any) -> ExchangeRecord:
    return exchange_record(
        **{
            "request_id": "ab12-1",
            "start_time": time.time(),
            "client_addr": "127.0.0.1",
            "bytes_in": 1200,
            "bytes_out": 800,
            "ttfb": 0.4,
            "duration": 0.9,
            "request_model": "claude-sonnet-4-5",
            "model": "claude-sonnet-4-5-20250929",
            "input_tokens": 31877,
            "output_tokens": 402,
        }
        | changes
    )


def streamed(**changes: Any) -> ExchangeRecord:
    """An SSE response: first byte early, the end much later, usage from the stream."""
    return record(
        request_id="ab12-2",
        path="/openai/v1/chat/completions",
        api="openai",
        ttfb=0.05,
        duration=12.5,
        request_model="gpt-4o",
        model="gpt-4o-2024-08-06",
        input_tokens=12,
        output_tokens=3000,
        **changes,
    )


async def flush(telemetry: Telemetry) -> bool:
    return await asyncio.to_thread(telemetry.force_flush, 5.0)


def nanos(seconds: float) -> int:
    return int(seconds * 1e9)


async def test_spans_of_a_reply_and_a_stream(collector: Collector) -> None:
    telemetry = make(collector.url)
    reply = record(traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", upstream="foundry-east")
    stream = streamed()
    telemetry.on_record(reply)
    telemetry.on_record(stream)
    assert await flush(telemetry)
    await asyncio.to_thread(telemetry.shutdown, 5.0)

    spans = {span.name: (resource, span) for resource, span in collector.spans}
    assert set(spans) == {"chat claude-sonnet-4-5", "chat gpt-4o"}
    resource, span = spans["chat claude-sonnet-4-5"]
    assert resource["service.name"] == "claude-proxy"
    assert resource["service.instance.id"]
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert span.trace_id.hex() == CLIENT_TRACE  # the client's trace
    assert span.parent_span_id.hex() == CLIENT_SPAN
    start = nanos(reply.start_time)
    assert span.start_time_unix_nano == start
    assert span.end_time_unix_nano == start + nanos(0.9)
    assert [(e.name, e.time_unix_nano) for e in span.events] == [
        ("claude_proxy.first_byte", start + nanos(0.4))
    ]
    a = attrs(span.attributes)
    assert a == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.system": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-5",
        "gen_ai.response.model": "claude-sonnet-4-5-20250929",
        "gen_ai.usage.input_tokens": 31877,
        "gen_ai.usage.output_tokens": 402,
        "http.request.method": "POST",
        "url.path": "/anthropic/v1/messages",
        "http.response.status_code": 200,
        "server.address": "res.services.ai.azure.com",
        "server.port": 443,
        "http.request.body.size": 1200,
        "http.response.body.size": 800,
        "claude_proxy.outcome": "complete",
        "claude_proxy.client_key": "alice",
        "claude_proxy.request_id": "ab12-1",
        "claude_proxy.upstream": "foundry-east",
    }
    assert span.status.code == Status.STATUS_CODE_UNSET

    _, span = spans["chat gpt-4o"]
    assert len(span.trace_id) == 16 and not span.parent_span_id  # a new trace
    assert span.end_time_unix_nano - span.start_time_unix_nano == nanos(12.5)
    assert span.events[0].time_unix_nano - span.start_time_unix_nano == nanos(0.05)
    a = attrs(span.attributes)
    assert a["gen_ai.provider.name"] == "openai"
    assert a["url.path"] == "/openai/v1/chat/completions"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (12, 3000)


async def test_errors_and_other_requests(collector: Collector) -> None:
    telemetry = make(collector.url)
    telemetry.on_record(record(status=429, request_id="r429"))
    telemetry.on_record(record(status=200, outcome="upstream_aborted", request_id="cut"))
    telemetry.on_record(
        record(
            method="HEAD",
            path="/anthropic",
            status=200,
            request_id="head",
            request_model=None,
            model=None,
            input_tokens=None,
            output_tokens=None,
            ttfb=None,
        )
    )
    assert await flush(telemetry)
    await asyncio.to_thread(telemetry.shutdown, 5.0)
    by_id = {attrs(s.attributes)["claude_proxy.request_id"]: s for _, s in collector.spans}
    assert attrs(by_id["r429"].attributes)["error.type"] == "429"
    assert by_id["r429"].status.code == Status.STATUS_CODE_ERROR
    assert attrs(by_id["cut"].attributes)["error.type"] == "upstream_aborted"
    head = by_id["head"]
    assert head.name == "HEAD" and not head.events
    assert "gen_ai.operation.name" not in attrs(head.attributes)
    assert head.status.code == Status.STATUS_CODE_UNSET


async def test_gen_ai_metrics(collector: Collector) -> None:
    telemetry = make(collector.url)
    telemetry.on_record(record())
    telemetry.on_record(record(input_tokens=100, output_tokens=50))
    telemetry.on_record(streamed())
    telemetry.on_record(record(status=500, input_tokens=None, output_tokens=None))
    telemetry.on_record(record(method="GET", path="/v1/models"))  # not a GenAI operation
    assert await flush(telemetry)
    await asyncio.to_thread(telemetry.shutdown, 5.0)

    usage = collector.histogram("gen_ai.client.token.usage")
    points = {
        (attrs(p.attributes)["gen_ai.request.model"], attrs(p.attributes)["gen_ai.token.type"]): p
        for p in usage
    }
    assert set(points) == {
        ("claude-sonnet-4-5", "input"),
        ("claude-sonnet-4-5", "output"),
        ("gpt-4o", "input"),
        ("gpt-4o", "output"),
    }
    sonnet_in = points[("claude-sonnet-4-5", "input")]
    assert (sonnet_in.count, sonnet_in.sum) == (2, 31877 + 100)
    assert list(sonnet_in.explicit_bounds) == list(TOKEN_BUCKETS)
    assert attrs(sonnet_in.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-5",
        "gen_ai.response.model": "claude-sonnet-4-5-20250929",
        "gen_ai.token.type": "input",
        "server.address": "res.services.ai.azure.com",
        "server.port": 443,
    }
    assert points[("gpt-4o", "output")].sum == 3000

    duration = collector.histogram("gen_ai.client.operation.duration")
    assert sum(p.count for p in duration) == 4  # the GET is no operation
    assert list(duration[0].explicit_bounds) == pytest.approx(DURATION_BUCKETS)
    failed = [p for p in duration if "error.type" in attrs(p.attributes)]
    assert [(attrs(p.attributes)["error.type"], p.count) for p in failed] == [("500", 1)]


async def test_propagate_gives_the_span_the_ids_sent_upstream(collector: Collector) -> None:
    telemetry = make(collector.url, propagate=True)
    incoming = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    child = telemetry.child_traceparent(incoming)
    _, trace_hex, span_hex, flags = child.split("-")
    assert (trace_hex, flags) == (CLIENT_TRACE, "01") and span_hex != CLIENT_SPAN
    root = telemetry.child_traceparent(None)
    telemetry.on_record(record(traceparent=incoming, request_id="child"), child)
    telemetry.on_record(record(request_id="root"), root)
    assert await flush(telemetry)
    await asyncio.to_thread(telemetry.shutdown, 5.0)
    by_id = {attrs(s.attributes)["claude_proxy.request_id"]: s for _, s in collector.spans}
    span = by_id["child"]
    assert (span.trace_id.hex(), span.span_id.hex()) == (CLIENT_TRACE, span_hex)
    assert span.parent_span_id.hex() == CLIENT_SPAN
    span = by_id["root"]
    assert f"00-{span.trace_id.hex()}-{span.span_id.hex()}-01" == root
    assert not span.parent_span_id


async def test_sample_ratio_zero_keeps_metrics_and_follows_a_sampled_parent(
    collector: Collector,
) -> None:
    telemetry = make(collector.url, sample_ratio=0.0, propagate=True)
    assert telemetry.child_traceparent(None).endswith("-00")
    telemetry.on_record(record(request_id="dropped"))
    sampled_parent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    telemetry.on_record(record(request_id="kept", traceparent=sampled_parent))
    assert await flush(telemetry)
    await asyncio.to_thread(telemetry.shutdown, 5.0)
    ids = [attrs(s.attributes)["claude_proxy.request_id"] for _, s in collector.spans]
    assert ids == ["kept"]
    assert sum(p.count for p in collector.histogram("gen_ai.client.operation.duration")) == 2


async def test_headers_from_the_environment_reach_the_collector(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = secret("hc-team-key-0123456789")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-honeycomb-team={key}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")
    telemetry = make(collector.url)
    telemetry.on_record(record())
    assert await flush(telemetry)
    await asyncio.to_thread(telemetry.shutdown, 5.0)
    assert collector.headers[0]["x-honeycomb-team"] == key
    resource, _ = collector.spans[0]
    assert resource["service.name"] == "gateway-eu"
    assert resource["deployment.environment"] == "prod"


def dead_port() -> socket.socket:
    """A port that refuses connections: bound, never listening (and so not reused meanwhile)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_a_dead_collector_costs_one_line_and_never_holds_on_record(
    lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.2")  # shorter than the first backoff
    sock = dead_port()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        telemetry = make(url)
        calls = 0
        for i in range(3000):  # more than the span queue holds (2048)
            telemetry.on_record(record(request_id=f"r{i}"))
            calls += 1
        assert calls == 3000
        for _ in range(3):
            await asyncio.to_thread(telemetry.force_flush, 5.0)
        await asyncio.to_thread(telemetry.shutdown, 3.0)
    finally:
        sock.close()
    said = [(r.name, r.levelname, r.getMessage()) for r in lines.records]
    assert not [s for s in said if s[0].startswith("opentelemetry")], said
    failing = [s for s in said if "failing" in s[2]]
    assert {s[2].split(" to ")[0] for s in failing} == {
        "telemetry: export of spans",
        "telemetry: export of metrics",
    }
    assert len(failing) == 2, said  # one per signal, not one per export
    # the cause, when the exporter said it (a refusal is retried, then the time is up)
    assert "refused" in failing[0][2] or "no answer within the export timeout" in failing[0][2]
    assert len([s for s in said if "queue is full" in s[2]]) <= 1


async def test_recovery_is_one_line(collector: Collector, lines: Lines) -> None:
    collector.status = 400  # not retried by the exporter: each export fails at once
    telemetry = make(collector.url)
    for _ in range(3):
        telemetry.on_record(record())
        await flush(telemetry)
    collector.status = 200
    telemetry.on_record(record(request_id="after"))
    await flush(telemetry)
    await asyncio.to_thread(telemetry.shutdown, 5.0)
    said = [r.getMessage() for r in lines.records if r.name == "claude_proxy.telemetry"]
    spans_lines = [s for s in said if "export of spans" in s]
    assert len(spans_lines) == 2, said
    assert "failing: Failed to export spans batch code: 400" in spans_lines[0]
    assert spans_lines[1].endswith("/v1/traces works again")
    assert [attrs(s.attributes)["claude_proxy.request_id"] for _, s in collector.spans] == ["after"]


async def test_shutdown_with_a_dead_collector_is_bounded() -> None:
    sock = dead_port()
    try:
        telemetry = make(f"http://127.0.0.1:{sock.getsockname()[1]}")
        telemetry.on_record(record())
        await telemetry.aclose(1.0)  # returns: the pytest timeout is the judge, not a clock
    finally:
        sock.close()


def test_with_telemetry_off_nothing_of_opentelemetry_is_imported() -> None:
    code = """
import sys
import claude_proxy.cli, claude_proxy.server, claude_proxy.relay, claude_proxy.supervisor
import claude_proxy.telemetry as telemetry
from claude_proxy.config import parse
config = parse({"upstream_url": "https://x.example", "upstream_auth": {"type": "api_key",
                "api_key": "k" * 8}})
assert telemetry.from_config(config, env={}) is None
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
assert not loaded, loaded
print("clean")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
