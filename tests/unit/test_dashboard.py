"""The shipped Grafana dashboard asks only for metrics and labels the proxy exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from claude_proxy.metrics import Metrics

from ..records import exchange_record

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "claude-proxy.json"


def exported() -> dict[str, set[str]]:
    """Every sample name a live registry exports (with its _total, _bucket, _sum, _count,
    _created suffixes), and its label names: each metric used once so each has samples."""
    metrics = Metrics()
    metrics.bind_state(lambda: 1.0, lambda: 1.0, lambda: 3600.0, lambda: 1.0)
    metrics.observe_record(
        exchange_record(
            bytes_in=10,
            bytes_out=20,
            ttfb=0.01,
            duration=0.02,
            request_model="m",
            model="m",
            input_tokens=3,
            output_tokens=4,
            upstream="east",
            upstream_ttfb=0.005,
        )
    )
    metrics.bind_upstreams([("east", lambda: "ready", lambda: 0.0)])
    metrics.failover("east", "west", "429")
    metrics.upstream_error("closed")
    metrics.acquisitions.inc()
    metrics.failures.inc()
    metrics.limit_refused("requests_per_minute")
    metrics.limits_store_error()
    metrics.fold()
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        assert family.samples, f"{family.name} has no samples: use it above"
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


EXPORTED = exported()
# PromQL words that are not metric names (functions are recognised by their parenthesis)
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"${var['name']}", var["query"]["query"]))
    return out


def parse(expr: str) -> tuple[set[str], list[tuple[str, str]], set[str]]:
    """(metric names, (metric, label) pairs from selectors, labels named in by/without)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings may hold anything
    pairs = []
    for metric, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        pairs += [(metric, label) for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body)]
    grouped = set()
    for body in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouped.update(x.strip() for x in body.split(",") if x.strip())
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", " ", expr)
    # label_values(metric, label): the second argument is a label
    expr = re.sub(r"label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)", r"\1", expr)
    words = re.findall(r"(?<![\w.$:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    metrics = {w for w in words if w not in KEYWORDS}
    return metrics, pairs, grouped


def test_the_parser_finds_what_it_should() -> None:
    metrics, pairs, grouped = parse(
        'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$m",x="}"}[5m])))'
        " / on() b_total"
    )
    assert metrics == {"a_bucket", "b_total"}
    assert pairs == [("a_bucket", "model"), ("a_bucket", "x")]
    assert grouped == {"le", "model"}


DOC = json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize(("where", "expr"), expressions(DOC), ids=lambda v: str(v)[:60])
def test_every_expression_names_exported_metrics_and_labels(where: str, expr: str) -> None:
    metrics, pairs, grouped = parse(expr)
    assert metrics, f"{where}: no metric in {expr!r}"
    unknown = metrics - EXPORTED.keys()
    assert not unknown, f"{where}: {sorted(unknown)} not exported; have {sorted(EXPORTED)}"
    for metric, label in pairs:
        assert label in EXPORTED[metric], f"{where}: {metric} has no label {label!r}"
    labels = set().union(*(EXPORTED[m] for m in metrics))
    assert grouped <= labels, f"{where}: grouped by {sorted(grouped - labels)}, not a label"


def test_the_dashboard_covers_what_an_operator_asks() -> None:
    text = json.dumps(DOC)
    for needed in (
        "claude_proxy_requests_total",
        "claude_proxy_request_duration_seconds_bucket",
        "claude_proxy_time_to_first_byte_seconds_bucket",
        "claude_proxy_tokens_total",
        'origin=\\"upstream\\"',
        "by (outcome)",
        "claude_proxy_requests_in_flight",
        "claude_proxy_open_streams",
        "claude_proxy_credential_expires_in_seconds",
        "claude_proxy_build_info",
    ):
        assert needed in text, needed
    ids = [panel["id"] for panel in DOC["panels"]]
    assert len(ids) == len(set(ids))


def test_family_names_alone_are_not_exported() -> None:
    """A counter is scraped as ..._total and a histogram as ..._bucket/_sum/_count: a dashboard
    asking for the bare family name would show nothing."""
    assert "claude_proxy_requests_total" in EXPORTED
    assert "claude_proxy_requests" not in EXPORTED
    assert {"le", "model", "route"} <= EXPORTED["claude_proxy_request_duration_seconds_bucket"]
    assert "claude_proxy_request_duration_seconds" not in EXPORTED
