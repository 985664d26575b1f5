"""The benchmark's pure parts: config variants and the A/B/A comparison (``pytest bench``)."""

from __future__ import annotations

import json
import math
import tomllib
from typing import Any

import pytest

from bench import routing_cost
from bench.__main__ import FEATURES, SMALL_BODY, base_config
from bench.compare import (
    Comparison,
    Metric,
    alternate,
    compare,
    config_text,
    feature_cost,
    markdown_table,
    mean_run,
    merge,
    toml_dumps,
)
from claude_proxy import routing
from claude_proxy.config import parse

BASE: dict[str, Any] = {
    "upstream_url": "http://127.0.0.1:1",
    "port": 2,
    "upstream_auth": {"type": "api_key", "api_key": "k"},
    "logging": {"level": "warn"},
}


@pytest.mark.parametrize(
    "doc",
    [
        BASE,
        {"s": 'quote " backslash \\ tab \t newline \n del \x7f é ☃'},
        {"f": 0.25, "e": 1e-05, "big": 1e20, "inf": math.inf, "neg": -math.inf, "b": False},
        {"nested": {"deeper": {"x": [1, 2, 3]}}, "empty": {}},
        {"client_api_keys": [{"name": "a", "key": "1"}, {"name": "b", "key": "2"}]},
        {"dotted.key": 1, "": "empty key"},
    ],
)
def test_toml_dumps_round_trips(doc: dict[str, Any]) -> None:
    assert tomllib.loads(toml_dumps(doc)) == doc


def test_toml_dumps_refuses_what_it_cannot_write() -> None:
    with pytest.raises(TypeError, match="set"):
        toml_dumps({"x": {1, 2}})


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, BASE),
        ({"logging": {"log_path": "/l"}}, {**BASE, "logging": {"level": "warn", "log_path": "/l"}}),
        ({"logging": {"level": "info"}}, {**BASE, "logging": {"level": "info"}}),
        ({"port": 3, "admin": {"port": 0}}, {**BASE, "port": 3, "admin": {"port": 0}}),
        ({"logging": "not a table"}, {**BASE, "logging": "not a table"}),
    ],
)
def test_merge_lays_tables_over_tables(extra: dict[str, Any], expected: dict[str, Any]) -> None:
    assert merge(BASE, extra) == expected


def test_merge_leaves_its_inputs_alone() -> None:
    base = {"t": {"a": 1}}
    merge(base, {"t": {"b": 2}})
    assert base == {"t": {"a": 1}}


@pytest.mark.parametrize(
    ("extra", "expected_logging"),
    [
        ("", {"level": "warn"}),
        (
            '[logging]\nlevel = "info"\nlog_path = "${work}/logs"\n',
            {"level": "info", "log_path": "/w/logs"},
        ),
        ('logging.log_prefix = "$$x"', {"level": "warn", "log_prefix": "$x"}),
    ],
)
def test_config_text_is_the_variant_over_the_plain_config(
    extra: str, expected_logging: dict[str, str]
) -> None:
    doc = tomllib.loads(config_text(BASE, extra, work="/w"))
    assert doc == {**BASE, "logging": expected_logging}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[logging\n", "does not parse"),
        ('x = "${nowhere}"', "placeholder"),
        ("x = $", "placeholder"),
    ],
)
def test_config_text_names_a_bad_variant(extra: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_text(BASE, extra, work="/w")


def test_config_text_lets_upstreams_replace_upstream_url() -> None:
    extra = '[[upstreams]]\nname = "a"\nurl = "${upstream}"\n'
    extra += '[[upstreams]]\nname = "b"\nurl = "${upstream}"\n'
    doc = tomllib.loads(config_text(BASE, extra, upstream="http://u:9"))
    expected = {k: v for k, v in BASE.items() if k != "upstream_url"}
    upstreams = [{"name": "a", "url": "http://u:9"}, {"name": "b", "url": "http://u:9"}]
    assert doc == {**expected, "upstreams": upstreams}


def test_config_text_keeps_upstream_url_without_upstreams() -> None:
    doc = tomllib.loads(config_text(BASE, '[[routes]]\nmodels = ["m*"]\nupstreams = ["a"]\n'))
    assert doc["upstream_url"] == BASE["upstream_url"]


@pytest.mark.parametrize(("name", "extra"), FEATURES, ids=[name for name, _ in FEATURES])
def test_every_feature_row_is_a_config_the_proxy_accepts(name: str, extra: str) -> None:
    text = config_text(
        base_config("http://127.0.0.1:1", 2, 1),
        extra,
        work="/w",
        upstream="http://127.0.0.1:1",
        redis="redis://127.0.0.1:3/0",
        otlp="http://127.0.0.1:4",
    )
    config = parse(tomllib.loads(text))
    assert {t.url for t in config.targets()} == {"http://127.0.0.1:1"}


def test_the_routed_row_has_the_upstreams_and_route_timed_in_process() -> None:
    (extra,) = [toml for name, toml in FEATURES if "routes by model" in name]
    config = parse(
        tomllib.loads(config_text(base_config("http://x", 2, 1), extra, upstream="http://x"))
    )
    assert [(u.name, u.priority, u.weight) for u in config.upstreams] == list(
        routing_cost.UPSTREAMS
    )
    assert [(r.models, r.upstreams) for r in config.routes] == [
        (routing_cost.ROUTE_MODELS, routing_cost.ROUTE_UPSTREAMS)
    ]
    # the bench's small body is routed by that route
    assert routing_cost.router().serving(routing.leading_model(SMALL_BODY)) == (0, 2)


def test_the_claude_code_body_names_its_model_first() -> None:
    body = routing_cost.claude_code_body()
    doc = json.loads(body)
    assert list(doc) == [
        "model",
        "messages",
        "system",
        "tools",
        "metadata",
        "max_tokens",
        "thinking",
        "stream",
    ]
    assert 95_000 <= len(body) <= 105_000
    assert 65_000 <= len(json.dumps(doc["messages"])) <= 75_000
    assert 22_000 <= len(json.dumps(doc["tools"])) <= 28_000
    assert "model" in doc["tools"][0]["input_schema"]["properties"]
    chunks = routing_cost.chunks_of(body)
    assert chunks == [body[:65536], body[65536:]]
    assert routing.leading_model(chunks[0]) == routing_cost.MODEL


def test_the_sdk_body_leaves_the_model_to_the_full_decoder() -> None:
    body = routing_cost.sdk_body()
    doc = json.loads(body)
    assert (
        list(doc) == sorted(doc) == ["max_tokens", "messages", "model", "stream", "system", "tools"]
    )
    assert body.index(b'"model"') > 65536  # not in the first read
    assert routing.leading_model(body) is None
    assert routing.model_of(body) == routing_cost.MODEL  # the top level, not the tool's input


def test_measure_routing_reports_every_case() -> None:
    rows = routing_cost.measure_routing(SMALL_BODY, n=2, repeat=1)
    assert rows["claude_code_100kb"]["read_by"] == "leading_model"
    assert rows["sdk_100kb"]["read_by"] == "model_of"
    assert rows["leading_1kb"] | {"us": 0} == {
        "label": "1 KB body, model first",
        "us": 0,
        "bytes": len(SMALL_BODY),
        "chunks": [len(SMALL_BODY)],
        "model": "m",
        "read_by": "leading_model",
        "serving": ["ptu-east", "paygo"],
    }
    # a model no route names is served by every upstream
    assert rows["claude_code_100kb"]["serving"] == ["ptu-east", "ptu-west", "paygo"]
    assert all(rows[k]["us"] > 0 for k in ("claude_code_100kb", "sdk_100kb", "leading_1kb"))
    assert rows["within_budget"] is (rows["claude_code_100kb"]["us"] <= rows["budget_us"])


@pytest.mark.parametrize(("rounds", "order"), [(1, "ABA"), (2, "ABABA"), (3, "ABABABA")])
def test_alternate_puts_every_b_between_two_a(rounds: int, order: str) -> None:
    calls: list[str] = []

    def a() -> str:
        calls.append("A")
        return f"a{len(calls)}"

    def b() -> str:
        calls.append("B")
        return f"b{len(calls)}"

    a_runs, b_runs = alternate(a, b, rounds)
    assert "".join(calls) == order
    assert a_runs == [f"a{i + 1}" for i, c in enumerate(order) if c == "A"]
    assert b_runs == [f"b{i + 1}" for i, c in enumerate(order) if c == "B"]


def test_mean_run_averages_numbers_and_keeps_text() -> None:
    runs = [
        {"rps": 10.0, "errors": 0, "socket_errors": "x"},
        {"rps": 20.0, "errors": 2, "socket_errors": "y"},
    ]
    assert mean_run(runs) == {"rps": 15.0, "errors": 1.0, "socket_errors": "x", "runs": 2}


RPS = Metric("req/s", "rps", "req/s", relative=True)
CPU = Metric("CPU per request", "cpu_us", "µs")


@pytest.mark.parametrize(
    ("metric", "a", "b", "change", "noise"),
    [
        (RPS, [100.0, 110.0], [100.0], "+5.0 %", "10.0 %"),
        (RPS, [90.0, 90.0], [100.0], "-10.0 %", "0.0 %"),
        (CPU, [30.0, 31.0], [28.0], "+2.50 µs", "1.00 µs"),
        (Metric("added p99", "p99_ms", "ms", minus=3.0), [5.0, 7.0], [4.0], "+2.00 ms", "2.00 ms"),
        (RPS, [100.0, 100.0], [0.0], "+nan %", "0.0 %"),
    ],
)
def test_comparison_is_this_code_against_the_baseline(
    metric: Metric, a: list[float], b: list[float], change: str, noise: str
) -> None:
    (row,) = compare("case", [metric], [{metric.key: v} for v in a], [{metric.key: v} for v in b])
    assert row.change() == change
    assert row.noise() == noise
    assert row.this == pytest.approx(sum(a) / len(a) - metric.minus)


def test_a_missing_figure_is_nan_not_an_error() -> None:
    (row,) = compare("case", [CPU], [{"rps": 1.0}], [{"cpu_us": 1.0}])
    assert math.isnan(row.this)


def test_markdown_table_has_a_row_per_comparison() -> None:
    rows = [
        Comparison("small POST c=64", RPS, (33000.0, 34000.0), (32000.0,)),
        Comparison("small POST c=64", CPU, (28.0, 29.0), (28.0,)),
    ]
    lines = markdown_table(rows, "abc+dirty", "HEAD~1 = def").splitlines()
    assert lines[0].startswith("| case | this code (abc+dirty) | baseline (HEAD~1 = def) |")
    assert lines[2] == "| small POST c=64, req/s | 33,500 req/s | 32,000 req/s | +4.7 % | 3.0 % |"
    assert (
        lines[3]
        == "| small POST c=64, CPU per request | 28.50 µs | 28.00 µs | +0.50 µs | 1.00 µs |"
    )


def test_feature_cost_is_against_the_plain_runs_around_it() -> None:
    cost = feature_cost(
        {"rps": 90.0, "cpu_us": 33.0},
        {"rps": 100.0, "cpu_us": 30.0},
        {"rps": 100.0, "cpu_us": 32.0},
    )
    assert cost == {
        "rps": 90.0,
        "cpu_us": 33.0,
        "rps_change": pytest.approx(-0.1),
        "cpu_us_added": 2.0,
    }
