"""What a span and a metric say, trace context, and the [telemetry] table: pure functions."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as semconv
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from opentelemetry.trace import get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from claude_proxy import telemetry as tm
from claude_proxy.config import parse
from claude_proxy.errors import ConfigError
from claude_proxy.otlp import ExportHealth, short_reason
from claude_proxy.record import ExchangeRecord

from ..records import exchange_record

SERVER = ("res.services.ai.azure.com", 443)
BASE: dict[str, Any] = {
    "upstream_url": "https://res.services.ai.azure.com",
    "upstream_auth": {"type": "api_key", "api_key": "k" * 8},
}


def record(**changes: Any) -> ExchangeRecord:
    mine = {"request_id": "ab12-1", "start_time": 1_700_000_000.0, "client_addr": "127.0.0.1"}
    timing = {"bytes_in": 100, "bytes_out": 200, "ttfb": 0.25, "duration": 1.5}
    return exchange_record(**(mine | timing | changes))


@pytest.mark.parametrize(
    ("method", "path", "operation"),
    [
        ("POST", "/anthropic/v1/messages", "chat"),
        ("POST", "/v1/messages", "chat"),
        ("POST", "/v1/messages/", "chat"),
        ("POST", "/anthropic/v1/messages/count_tokens", None),
        ("POST", "/openai/v1/chat/completions", "chat"),
        ("POST", "/openai/deployments/gpt-4o/chat/completions", "chat"),
        ("POST", "/openai/v1/responses", "chat"),
        ("GET", "/openai/v1/responses/resp_123", None),
        ("POST", "/openai/v1/completions", "text_completion"),
        ("POST", "/openai/v1/embeddings", "embeddings"),
        ("GET", "/anthropic/v1/messages", None),
        ("HEAD", "/anthropic", None),
        ("GET", "/v1/models", None),
    ],
)
def test_operation_of(method: str, path: str, operation: str | None) -> None:
    assert tm.operation_of(method, path) == operation


def test_operation_names_are_the_conventions() -> None:
    known = {v.value for v in semconv.GenAiOperationNameValues}
    assert {op for _, op in tm.OPERATIONS} <= known


@pytest.mark.parametrize(
    ("operation", "model", "method", "name"),
    [
        ("chat", "claude-sonnet-4-5", "POST", "chat claude-sonnet-4-5"),
        ("chat", None, "POST", "chat"),
        ("embeddings", "text-embedding-3-small", "POST", "embeddings text-embedding-3-small"),
        (None, "ignored", "HEAD", "HEAD"),
    ],
)
def test_span_name(operation: str | None, model: str | None, method: str, name: str) -> None:
    assert tm.span_name(operation, model, method) == name


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({}, None),
        ({"outcome": "client_aborted"}, None),  # the client's choice, nobody's fault
        ({"status": 429}, "429"),
        ({"status": 502, "outcome": "rejected"}, "502"),
        ({"outcome": "upstream_aborted"}, "upstream_aborted"),
        ({"outcome": "idle_timeout"}, "idle_timeout"),
        ({"status": 0, "outcome": "drain_cut"}, "drain_cut"),
    ],
)
def test_error_type(changes: dict[str, Any], error: str | None) -> None:
    assert tm.error_type(record(**changes)) == error


def test_span_attributes_full() -> None:
    rec = record(
        request_model="claude-sonnet-4-5",
        model="claude-sonnet-4-5-20250929",
        input_tokens=31877,
        output_tokens=402,
        upstream="foundry-east",
        upstream_request_id="apim-1",
        user_agent="claude-cli/2.0",
        attempts=2,
    )
    assert tm.span_attributes(rec, "chat", SERVER) == {
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
        "http.request.body.size": 100,
        "http.response.body.size": 200,
        "claude_proxy.outcome": "complete",
        "claude_proxy.client_key": "alice",
        "claude_proxy.request_id": "ab12-1",
        "claude_proxy.upstream": "foundry-east",
        "claude_proxy.upstream_request_id": "apim-1",
        "user_agent.original": "claude-cli/2.0",
        "claude_proxy.attempts": 2,
    }


def test_span_attributes_leave_out_what_is_unknown() -> None:
    rec = record(method="HEAD", path="/anthropic", status=0, outcome="client_aborted", ttfb=None)
    attributes = tm.span_attributes(rec, None, SERVER)
    for absent in (
        "gen_ai.operation.name",
        "gen_ai.request.model",
        "gen_ai.response.model",
        "gen_ai.usage.input_tokens",
        "http.response.status_code",
        "claude_proxy.upstream",
        "claude_proxy.attempts",
    ):
        assert absent not in attributes
    assert all(v is not None for v in attributes.values())


def test_attribute_names_are_the_conventions() -> None:
    assert tm.PROVIDER == semconv.GEN_AI_PROVIDER_NAME
    assert tm.SYSTEM == semconv.GEN_AI_SYSTEM
    assert tm.REQUEST_MODEL == semconv.GEN_AI_REQUEST_MODEL
    assert tm.RESPONSE_MODEL == semconv.GEN_AI_RESPONSE_MODEL
    assert tm.INPUT_TOKENS == semconv.GEN_AI_USAGE_INPUT_TOKENS
    assert tm.OUTPUT_TOKENS == semconv.GEN_AI_USAGE_OUTPUT_TOKENS
    assert tm.TOKEN_TYPE == semconv.GEN_AI_TOKEN_TYPE
    assert tm.TOKEN_USAGE == gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE
    assert tm.OPERATION_DURATION == gen_ai_metrics.GEN_AI_CLIENT_OPERATION_DURATION


def test_buckets_are_the_advised_ones() -> None:
    assert tm.TOKEN_BUCKETS[:3] == (1, 4, 16) and tm.TOKEN_BUCKETS[-1] == 67108864
    assert len(tm.TOKEN_BUCKETS) == len(tm.DURATION_BUCKETS) == 14
    assert tm.DURATION_BUCKETS[0] == 0.01 and tm.DURATION_BUCKETS[-1] == pytest.approx(81.92)


@pytest.mark.parametrize(
    ("metric", "key", "expected"),
    [
        (
            tm.TOKEN_USAGE,
            ("chat", "openai", "gpt-4o", "gpt-4o-2024-08-06", "input"),
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o",
                "gen_ai.response.model": "gpt-4o-2024-08-06",
                "gen_ai.token.type": "input",
                "server.address": "res.services.ai.azure.com",
                "server.port": 443,
            },
        ),
        (
            tm.OPERATION_DURATION,
            ("chat", "anthropic", None, None, "502"),
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "anthropic",
                "error.type": "502",
                "server.address": "res.services.ai.azure.com",
                "server.port": 443,
            },
        ),
        (tm.OPERATION_DURATION, tm.OVERFLOW, {"otel.metric.overflow": True}),
    ],
)
def test_series_attributes(metric: str, key: tm.SeriesKey, expected: dict[str, Any]) -> None:
    assert tm.series_attributes(metric, key, SERVER) == expected


def test_histograms_count_per_series_and_bucket() -> None:
    h = tm.Histograms(now_ns=1)
    h.observe(
        record(request_model="m", input_tokens=16, output_tokens=17, duration=0.01), "chat", None
    )
    h.observe(record(request_model="m", input_tokens=1, duration=100.0), "chat", None)
    h.observe(record(request_model="m", duration=0.5), "chat", "500")
    taken = h.collect(now_ns=2, delta=False)
    usage = taken[tm.TOKEN_USAGE]
    inputs = usage[("chat", "anthropic", "m", None, "input")]
    assert (inputs.count, inputs.sum, inputs.min, inputs.max) == (2, 17.0, 1, 16)
    assert inputs.buckets[0] == 1 and inputs.buckets[2] == 1  # 1 in (..1], 16 in (4, 16]
    assert usage[("chat", "anthropic", "m", None, "output")].buckets[3] == 1  # (16, 64]
    ok = taken[tm.OPERATION_DURATION][("chat", "anthropic", "m", None, None)]
    assert ok.buckets[0] == 1 and ok.buckets[-1] == 1  # 0.01 in the first, 100 s past 81.92
    assert taken[tm.OPERATION_DURATION][("chat", "anthropic", "m", None, "500")].count == 1
    again = h.collect(now_ns=3, delta=False)[tm.OPERATION_DURATION]
    assert sum(s.count for s in again.values()) == 3  # cumulative: nothing is taken away


def test_delta_histograms_start_again() -> None:
    h = tm.Histograms(now_ns=1)
    h.observe(record(duration=1.0), "chat", None)
    first = h.collect(now_ns=5, delta=True)[tm.OPERATION_DURATION]
    assert [s.start_ns for s in first.values()] == [1]
    assert h.collect(now_ns=6, delta=True)[tm.OPERATION_DURATION] == {}
    h.observe(record(duration=1.0), "chat", None)
    assert [
        s.start_ns for s in h.collect(now_ns=7, delta=True)[tm.OPERATION_DURATION].values()
    ] == [6]


def test_series_past_the_limit_overflow() -> None:
    h = tm.Histograms(now_ns=1)
    for i in range(tm.MAX_SERIES + 10):
        h.observe(record(request_model=f"model-{i}"), "chat", None)
    table = h.collect(now_ns=2, delta=False)[tm.OPERATION_DURATION]
    assert len(table) == tm.MAX_SERIES
    assert table[tm.OVERFLOW].count == 11


@pytest.mark.parametrize(
    ("env", "delta", "interval"),
    [
        ({}, False, 60.0),
        ({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "DELTA"}, True, 60.0),
        ({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "lowmemory"}, True, 60.0),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "15000"}, False, 15.0),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "soon"}, False, 60.0),
    ],
)
def test_metric_settings_from_the_environment(
    env: dict[str, str], delta: bool, interval: float
) -> None:
    assert tm.histogram_delta(env) is delta
    assert tm.export_interval(env) == interval


TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-00",
        f"  00-{TRACE}-{SPAN}-01 \t",
        f"01-{TRACE}-{SPAN}-01-future-fields",
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has nothing after the flags
        f"ff-{TRACE}-{SPAN}-01",
        f"00-{'0' * 32}-{SPAN}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}",
        f"00-{TRACE}-{SPAN}-01" + " " * 600,  # over the 512 characters the spec allows
        "",
        "garbage",
    ],
)
def test_parse_traceparent_agrees_with_the_propagator(value: str) -> None:
    context = TraceContextTextMapPropagator().extract({"traceparent": value})
    official = get_current_span(context).get_span_context()
    ours = tm.parse_traceparent(value)
    if not official.is_valid:
        assert ours is None
    else:
        assert ours == (official.trace_id, official.span_id, int(official.trace_flags))


def test_format_traceparent_round_trips() -> None:
    value = tm.format_traceparent(int(TRACE, 16), int(SPAN, 16), True)
    assert value == f"00-{TRACE}-{SPAN}-01"
    assert tm.parse_traceparent(value) == (int(TRACE, 16), int(SPAN, 16), 1)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_head_time_sampling_matches_the_sampler(ratio: float) -> None:
    """child_traceparent's sampled flag is the decision the span gets later."""
    sampler = ParentBased(TraceIdRatioBased(ratio))
    bound = TraceIdRatioBased(ratio).bound
    for n in range(0, 1 << 64, (1 << 64) // 97):
        trace_id = (n << 64) | n
        expected = sampler.should_sample(None, trace_id, "chat").decision.is_sampled()
        assert ((trace_id & ((1 << 64) - 1)) < bound) is expected


@pytest.mark.parametrize(
    ("env", "signal", "endpoint"),
    [
        ({}, "traces", "http://collector:4318/v1/traces"),
        ({}, "metrics", "http://collector:4318/v1/metrics"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://tempo:4318/v1/traces"},
            "traces",
            "http://tempo:4318/v1/traces",
        ),
    ],
)
def test_signal_endpoint(env: dict[str, str], signal: str, endpoint: str) -> None:
    assert tm.signal_endpoint("http://collector:4318/", signal, env) == endpoint


def test_header_values_are_the_secrets() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "x-honeycomb-team=hc%20key, dd-api-key = dd-key ,bare",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20t0ken",
    }
    assert tm.header_values(env) == ["hc key", "dd-key", "Bearer t0ken"]


@pytest.mark.parametrize(
    ("url", "server"),
    [
        ("https://res.services.ai.azure.com", ("res.services.ai.azure.com", 443)),
        ("http://127.0.0.1:9000/prefix", ("127.0.0.1", 9000)),
        ("http://upstream", ("upstream", 80)),
    ],
)
def test_upstream_server(url: str, server: tuple[str, int]) -> None:
    assert tm.upstream_server(url) == server


# --------------------------------------------------------------------------- config


def test_telemetry_is_off_by_default() -> None:
    config = parse(BASE)
    assert config.telemetry.otlp_endpoint is None
    assert tm.from_config(config, env={}) is None


def test_telemetry_table() -> None:
    raw = {
        **BASE,
        "telemetry": {
            "otlp_endpoint": "http://collector:4318",
            "sample_ratio": 0,
            "propagate": True,
        },
    }
    config = parse(raw)
    assert config.telemetry.otlp_endpoint == "http://collector:4318"
    assert config.telemetry.sample_ratio == 0.0
    assert config.telemetry.propagate is True


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"otlp_endpoint": "collector:4318"}, "telemetry.otlp_endpoint"),
        ({"otlp_endpoint": "grpc://collector:4317"}, "expected http(s)://host[:port]"),
        ({"otlp_endpoint": "http://collector:4318/v1/traces"}, "appends /v1/traces"),
        ({"otlp_endpoint": "http://u:p@collector:4318"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ({"otlp_endpoint": "http://collector:99999"}, "bad port"),
        ({"sample_ratio": 1.5}, "telemetry.sample_ratio: expected a number from 0.0 to 1.0"),
        ({"sample_ratio": "all"}, "telemetry.sample_ratio: expected float"),
        ({"propagate": "yes"}, "telemetry.propagate: expected bool"),
        ({"endpoint": "http://c:4318"}, "telemetry.endpoint: unknown key"),
    ],
)
def test_telemetry_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse({**BASE, "telemetry": table})


def test_the_standard_variable_names_the_collector(tmp_path: Any) -> None:
    from claude_proxy.config import load_config

    env = {
        "CLAUDE_PROXY__UPSTREAM_URL": "https://api.anthropic.com",
        "CLAUDE_PROXY__UPSTREAM_AUTH__TYPE": "api_key",
        "CLAUDE_PROXY__UPSTREAM_AUTH__API_KEY": "upstream-key",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318",
    }
    assert load_config(None, {}, env).config.telemetry.otlp_endpoint == "http://otel:4318"
    path = tmp_path / "config.toml"
    path.write_text('[telemetry]\notlp_endpoint = "http://file:4318"\n')
    config = load_config(str(path), {}, env).config
    assert config.telemetry.otlp_endpoint == "http://file:4318"  # the explicit setting wins
    env["CLAUDE_PROXY__TELEMETRY__SAMPLE_RATIO"] = "0.1"
    assert load_config(str(path), {}, env).config.telemetry.sample_ratio == 0.1


def test_sdk_disabled_turns_it_off(caplog: pytest.LogCaptureFixture) -> None:
    config = parse({**BASE, "telemetry": {"otlp_endpoint": "http://collector:4318"}})
    with caplog.at_level(logging.INFO, "claude_proxy.telemetry"):
        assert tm.from_config(config, env={"OTEL_SDK_DISABLED": "true"}) is None
    assert "OTEL_SDK_DISABLED" in caplog.text


def test_without_the_extra_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    config = parse({**BASE, "telemetry": {"otlp_endpoint": "http://collector:4318"}})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=re.escape("pip install 'claude-proxy[otel]'")):
        tm.from_config(config, env={})


# --------------------------------------------------------------------------- export health


def test_short_reason() -> None:
    line = (
        "Transient error HTTPConnectionPool(host='127.0.0.1', port=1): refused encountered "
        "while exporting spans batch, retrying in 0.98s."
    )
    assert short_reason(line) == "HTTPConnectionPool(host='127.0.0.1', port=1): refused"
    assert short_reason("Failed to export spans batch code: 400") == (
        "Failed to export spans batch code: 400"
    )
    assert short_reason(None) == "no reason given"
    assert short_reason(
        "Failed to export spans batch due to timeout, max retries or shutdown."
    ).startswith("no answer within the export timeout")


def test_health_logs_state_changes_only(caplog: pytest.LogCaptureFixture) -> None:
    health = ExportHealth({"spans": "http://c/v1/traces", "metrics": "http://c/v1/metrics"})
    exporter_log = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    health.attach()
    try:
        with caplog.at_level(logging.INFO):
            health.report("spans", True)  # working from the start: nothing to say
            for _ in range(5):
                exporter_log.error("Failed to export %s batch code: %s", "spans", 503)
                health.report("spans", False)
            health.report("metrics", True)
            health.report("spans", True)
            health.report("spans", True)
    finally:
        health.detach()
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "claude_proxy.telemetry",
            "WARNING",
            "telemetry: export of spans to http://c/v1/traces failing: Failed to export spans "
            "batch code: 503; spans are dropped until it works again (one line then)",
        ),
        (
            "claude_proxy.telemetry",
            "INFO",
            "telemetry: export of spans to http://c/v1/traces works again",
        ),
    ]


def test_health_tells_a_full_queue_once(caplog: pytest.LogCaptureFixture) -> None:
    health = ExportHealth({"spans": "http://c/v1/traces", "metrics": "http://c/v1/metrics"})
    queue_log = logging.getLogger("opentelemetry.sdk._shared_internal")
    health.attach()
    try:
        with caplog.at_level(logging.INFO):
            record = logging.LogRecord(
                queue_log.name, logging.WARNING, "", 0, "Queue full, dropping %s.", ("span",), None
            )
            for _ in range(3):
                assert health.filter(record) is False
            other = logging.LogRecord(
                queue_log.name, logging.ERROR, "", 0, "Exception while exporting", (), None
            )
            assert health.filter(other) is True
    finally:
        health.detach()
    assert [r.getMessage() for r in caplog.records if "queue is full" in r.getMessage()] == [
        "telemetry: the span queue is full; spans are dropped until the export to "
        "http://c/v1/traces catches up (logged again after it works again)"
    ]
