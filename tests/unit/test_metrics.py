"""Metrics from exchange records: the labels a dashboard needs, bounded, and folded exactly."""

from __future__ import annotations

import platform
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from claude_proxy import __version__
from claude_proxy.config import AdminConfig, parse
from claude_proxy.errors import ConfigError
from claude_proxy.metrics import (
    LATENCY_BUCKETS,
    MAX_MODELS,
    Metrics,
    exposition,
)
from claude_proxy.record import OUTCOMES, ExchangeRecord

from ..records import exchange_record


def record(**changes: Any) -> ExchangeRecord:
    mine = {"bytes_in": 10, "bytes_out": 20, "ttfb": 0.01, "duration": 0.02}
    return exchange_record(**(mine | {"request_model": "claude-a", "model": "claude-a"} | changes))


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def requests_by(metrics: Metrics, *labels: str) -> dict[tuple[str, ...], float]:
    """claude_proxy_requests_total summed by ``labels``, as PromQL's ``sum by`` would."""
    exposition(metrics)
    out: dict[tuple[str, ...], float] = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == "claude_proxy_requests_total":
                key = tuple(s.labels[label] for label in labels)
                out[key] = out.get(key, 0) + s.value
    return out


@pytest.mark.parametrize(
    ("status", "code", "status_class"),
    [
        (200, "200", "2xx"),
        (101, "101", "1xx"),
        (401, "401", "4xx"),
        (429, "429", "4xx"),
        (599, "599", "5xx"),
        (600, "other", "other"),
        (99, "other", "other"),
        (0, "other", "other"),  # nothing was sent
    ],
)
def test_exact_status_code_is_a_bounded_label(status: int, code: str, status_class: str) -> None:
    metrics = Metrics()
    metrics.observe_record(record(status=status))
    assert requests_by(metrics, "code", "status") == {(code, status_class): 1}


def test_upstream_429s_are_counted_apart_from_the_proxys() -> None:
    metrics = Metrics()
    metrics.observe_record(record(status=429))  # relayed from Foundry
    metrics.observe_record(record(status=429))
    metrics.observe_record(
        record(status=429, outcome="rejected", origin="proxy", model=None)
    )  # made here
    metrics.observe_record(
        record(status=401, outcome="rejected", origin="proxy", client_key="rejected")
    )
    assert requests_by(metrics, "code", "origin") == {
        ("429", "upstream"): 2,
        ("429", "proxy"): 1,
        ("401", "proxy"): 1,
    }


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_every_outcome_is_a_label(outcome: str) -> None:
    metrics = Metrics()
    metrics.observe_record(record(outcome=outcome))
    assert requests_by(metrics, "outcome") == {(outcome,): 1}


def test_model_labels_are_capped() -> None:
    metrics = Metrics(max_models=3)
    for name in ("m1", "m2", "m3", "m4", "m5"):
        metrics.observe_record(record(model=name, request_model=name))
    metrics.observe_record(record(model="m1"))
    assert requests_by(metrics, "model") == {("m1",): 2, ("m2",): 1, ("m3",): 1, ("other",): 2}
    exposition(metrics)
    durations = samples(metrics.registry, "claude_proxy_request_duration_seconds_count")
    assert {dict(k)["model"] for k in durations} == {"m1", "m2", "m3", "other"}


@pytest.mark.parametrize(
    ("changes", "label"),
    [
        # the upstream reported it: a label, even on a failure
        ({"model": "m-reported", "request_model": "junk", "status": 500}, "m-reported"),
        # only the client named it, and it succeeded: the upstream knows it
        ({"model": None, "request_model": "deployment-1"}, "deployment-1"),
        # only the client named it and it failed: not admitted
        ({"model": None, "request_model": "junk-1", "status": 404}, "other"),
        ({"model": None, "request_model": "junk-2", "outcome": "rejected"}, "other"),
        ({"model": None, "request_model": None}, "unknown"),
        ({"model": None, "request_model": ""}, "unknown"),
    ],
)
def test_which_model_names_become_labels(changes: dict[str, Any], label: str) -> None:
    metrics = Metrics()
    metrics.observe_record(record(**changes))
    assert requests_by(metrics, "model") == {(label,): 1}


def test_a_failed_name_is_labelled_once_it_has_succeeded() -> None:
    metrics = Metrics()
    metrics.observe_record(record(model=None, request_model="d1", status=429))
    metrics.observe_record(record(model=None, request_model="d1"))
    metrics.observe_record(record(model=None, request_model="d1", status=429))
    assert requests_by(metrics, "model", "code") == {
        ("other", "429"): 1,
        ("d1", "200"): 1,
        ("d1", "429"): 1,
    }


def test_junk_names_do_not_use_up_the_cap() -> None:
    metrics = Metrics(max_models=2)
    for i in range(100):
        metrics.observe_record(record(model=None, request_model=f"junk-{i}", status=404))
    metrics.observe_record(record(model="real"))
    assert requests_by(metrics, "model") == {("other",): 100, ("real",): 1}
    assert len(metrics._tallies) == 2


def test_tallies_fold_into_what_observe_would_have_recorded() -> None:
    """The tallies are folded through prometheus-client's internals; this pins them down."""
    metrics = Metrics()
    reference = CollectorRegistry()
    duration = Histogram("d", "d", ["route", "model"], buckets=LATENCY_BUCKETS, registry=reference)
    ttfb = Histogram("t", "t", ["route", "model"], buckets=LATENCY_BUCKETS, registry=reference)
    labels = ["route", "status", "code", "client", "model", "outcome", "origin"]
    requests = Counter("r", "r", labels, registry=reference)
    values = [0.0, 0.0005, 0.001, 0.0011, 0.05, 0.3, 2.5, 29.9, 600, 1800, 1800.5, 7200]
    for round_ in range(2):  # folding twice must not count anything twice
        for i, value in enumerate(values):
            status = (200, 404, 503)[i % 3]
            first = value / 2 if i % 4 else None
            rec = record(api="openai", status=status, ttfb=first, duration=value, model="m")
            metrics.observe_record(rec)
            duration.labels("openai", "m").observe(value)
            if first is not None:
                ttfb.labels("openai", "m").observe(first)
            cls = f"{status // 100}xx"
            requests.labels("openai", cls, str(status), "alice", "m", "complete", "upstream").inc()
        exposition(metrics)
        got = metrics.registry
        for mine, theirs in (
            ("claude_proxy_request_duration_seconds_bucket", "d_bucket"),
            ("claude_proxy_request_duration_seconds_sum", "d_sum"),
            ("claude_proxy_request_duration_seconds_count", "d_count"),
            ("claude_proxy_time_to_first_byte_seconds_bucket", "t_bucket"),
            ("claude_proxy_time_to_first_byte_seconds_sum", "t_sum"),
            ("claude_proxy_requests_total", "r_total"),
        ):
            assert samples(got, mine) == pytest.approx(samples(reference, theirs)), (round_, mine)
    assert samples(got, "claude_proxy_request_bytes_total") == {(("route", "openai"),): 240}
    assert samples(got, "claude_proxy_response_bytes_total") == {(("route", "openai"),): 480}


def test_tokens_from_records_by_client_and_model() -> None:
    metrics = Metrics()
    metrics.observe_record(record(input_tokens=3, output_tokens=4))
    metrics.observe_record(record(input_tokens=1, output_tokens=None))
    metrics.observe_record(
        record(client_key="bob", model=None, request_model=None, output_tokens=5)
    )
    metrics.observe_record(record(input_tokens=0, output_tokens=0))
    exposition(metrics)
    metrics.observe_record(record(output_tokens=10))
    exposition(metrics)
    assert samples(metrics.registry, "claude_proxy_tokens_total") == {
        (("client", "alice"), ("kind", "input"), ("model", "claude-a")): 4,
        (("client", "alice"), ("kind", "output"), ("model", "claude-a")): 14,
        (("client", "bob"), ("kind", "output"), ("model", "unknown")): 5,
    }


def test_build_info() -> None:
    metrics = Metrics()
    assert samples(metrics.registry, "claude_proxy_build_info") == {
        (("python", platform.python_version()), ("version", __version__)): 1.0
    }


def test_the_default_cap_is_the_configs() -> None:
    assert AdminConfig().max_model_labels == MAX_MODELS


@pytest.mark.parametrize("value", [0, -1, 10001])
def test_max_model_labels_is_validated(value: int) -> None:
    raw = {
        "upstream_url": "https://x.example",
        "upstream_auth": {"type": "azure_cli"},
        "admin": {"max_model_labels": value},
    }
    with pytest.raises(ConfigError, match=r"admin\.max_model_labels: expected 1\.\.10000"):
        parse(raw)
