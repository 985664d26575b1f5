"""Routing and failover without I/O: the model of a body, retry hints, health, the order of tries.

Every rule here is pure: ``now`` (monotonic seconds), the wall clock for HTTP-dates and the
random source are passed in, so nothing sleeps and nothing depends on timing.
"""

from __future__ import annotations

import email.utils
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from claude_proxy.config import FailoverConfig, RouteConfig, UpstreamConfig
from claude_proxy.routing import (
    COOLING,
    OPEN,
    PROBING,
    READY,
    Health,
    Router,
    Standing,
    deployment_of,
    leading_model,
    model_of,
    retry_hint,
    routing_model,
    soonest,
)

# ----------------------------------------------------------------- leading_model


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model":"x","messages":[]}', "x"),
        (b'{"model":"claude-sonnet-4-5"}', "claude-sonnet-4-5"),
        (b'{ "model" : "x" , "stream": true}', "x"),
        (b' \t\r\n{\n  "model":\t"x",\n  "messages": []\n}', "x"),
        (b'{"model":   "x"}', "x"),
        (b'{"model":""}', ""),
        ('{"model":"modèle-été-日本"}'.encode(), "modèle-été-日本"),
        # the value alone is read: what follows it is not looked at
        (b'{"model":"x", then anything', "x"),
        # not first: left to the full decoder
        (b'{"messages":[],"model":"x"}', None),
        (b'{"stream":true, "model":"x"}', None),
        # a longer key that starts with "model"
        (b'{"models":"x"}', None),
        (b'{"model_id":"x"}', None),
        # an escape in the value: left to the full decoder
        (b'{"model":"a\\"b"}', None),
        (b'{"model":"caf\\u00e9"}', None),
        (b'{"model":"a\\\\b"}', None),
        # not a string
        (b'{"model":7}', None),
        (b'{"model":null}', None),
        (b'{"model":true}', None),
        (b'{"model":["x"]}', None),
        (b'{"model":{"name":"x"}}', None),
        # no colon, or not an object at all
        (b'{"model" "x"}', None),
        (b'["model","x"]', None),
        (b'"model"', None),
        (b"model", None),
        (b"not json", None),
        (b"", None),
        (b"   ", None),
        (b"{", None),
        (b"{}", None),
        # truncated: the first bytes of a body still arriving
        (b'{"model":"abc', None),
        (b'{"model":"', None),
        (b'{"model":', None),
        (b'{"model"', None),
        (b'{"mod', None),
        # not UTF-8
        (b'{"model":"\xff\xfe"}', None),
    ],
)
def test_leading_model(body: bytes, model: str | None) -> None:
    """The fast path takes only an unescaped string that is the body's first member; anything
    else is None, so the exact decoder decides."""
    assert leading_model(body) == model


# ----------------------------------------------------------------- routing_model

TASK_TOOL = {
    "name": "Task",
    "description": "Launch a new agent to handle complex, multi-step tasks autonomously.",
    "input_schema": {
        "type": "object",
        "properties": {
            "description": {"type": "string"},
            "prompt": {"type": "string"},
            # a tool parameter named "model": nested, never the request's model
            "model": {"type": "string", "enum": ["sonnet", "opus", "haiku"]},
        },
        "required": ["description", "prompt"],
        "additionalProperties": False,
        "$schema": "http://json-schema.org/draft-07/schema#",
    },
}

CLAUDE_CODE: dict[str, Any] = {
    "model": "claude-sonnet-4-5-20250929",
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": 'set "model": "claude-opus-4-1" in settings.json'},
                {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
            ],
        }
    ],
    "temperature": 1,
    "system": [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
        {"type": "text", "text": 'The model is named by {"model": "x"}.'},
    ],
    "tools": [TASK_TOOL, {"name": "Bash", "input_schema": {"type": "object"}}],
    "metadata": {"user_id": "user_abc_account_def_session_123"},
    "max_tokens": 32000,
    "stream": True,
}

ANTHROPIC_SDK: dict[str, Any] = {
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Hello, Claude"}],
    "model": "claude-opus-4-1",
    "stream": True,
    "system": "Answer briefly.",
    "tools": [TASK_TOOL],
}

OPENAI_SDK: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": 'Reply with {"model": "gpt-3.5"} when asked.'},
        {"role": "user", "content": "Which model are you?"},
    ],
    "model": "gpt-4o",
    "stream": True,
    "stream_options": {"include_usage": True},
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "pick",
                "parameters": {"type": "object", "properties": {"model": {"type": "string"}}},
            },
        }
    ],
}

CODEX_RESPONSES: dict[str, Any] = {
    "model": "gpt-5-codex",
    "instructions": "You are Codex, based on GPT-5. You are running as a coding agent.",
    "input": [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "use model o3 for this"}],
        }
    ],
    "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0199a1b2-c3d4",
}

DUMPS: dict[str, Callable[[Any], str]] = {
    "default": json.dumps,
    "compact": lambda obj: json.dumps(obj, separators=(",", ":")),
    "indented": lambda obj: json.dumps(obj, indent=2),
    "utf-8": lambda obj: json.dumps(obj, ensure_ascii=False),
}

SHAPES: dict[str, tuple[dict[str, Any], str]] = {
    "claude-code": (CLAUDE_CODE, "claude-sonnet-4-5-20250929"),
    "anthropic-sdk": (ANTHROPIC_SDK, "claude-opus-4-1"),
    "anthropic-sdk-sorted": (dict(sorted(ANTHROPIC_SDK.items())), "claude-opus-4-1"),
    "openai-sdk": (OPENAI_SDK, "gpt-4o"),
    "codex-responses": (CODEX_RESPONSES, "gpt-5-codex"),
    "claude-code-unicode": ({**CLAUDE_CODE, "model": "modèle-日本"}, "modèle-日本"),
    "sdk-unicode": ({**ANTHROPIC_SDK, "model": "modèle-日本"}, "modèle-日本"),
    "escaped-quote": ({**CLAUDE_CODE, "model": 'a"b'}, 'a"b'),
}


@pytest.mark.parametrize("dumps", sorted(DUMPS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_routing_model_equals_the_exact_decoder(shape: str, dumps: str) -> None:
    """Whichever path reads it, the model routed by is the one the upstream will see."""
    payload, model = SHAPES[shape]
    body = DUMPS[dumps](payload).encode()
    assert model_of(body) == model
    assert routing_model(body) == model


@pytest.mark.parametrize(
    ("payload", "fast"),
    [(CLAUDE_CODE, True), (CODEX_RESPONSES, True), (ANTHROPIC_SDK, False), (OPENAI_SDK, False)],
)
def test_routing_model_reads_the_first_bytes_when_the_model_leads(
    payload: dict[str, Any], fast: bool
) -> None:
    """Claude Code and Codex put the model first, so their bodies are not decoded whole."""
    body = json.dumps(payload).encode()
    assert (leading_model(body) is not None) is fast
    assert leading_model(body[:40]) == (payload["model"] if fast else None)


@pytest.mark.parametrize(
    "payload",
    [
        {"messages": [], "metadata": {"model": "nested-is-not-it"}},
        {"tools": [TASK_TOOL], "messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": '{"model":"in-a-string"}'}]},
        {"system": '"model": "in-a-string"', "max_tokens": 1},
        {"input": [{"model": "in-a-list"}]},
        {"model": None, "messages": []},
        {"model": 4, "messages": []},
        {"model": ["gpt-4o"], "messages": []},
        {},
    ],
)
def test_routing_model_is_none_without_a_top_level_string_model(payload: dict[str, Any]) -> None:
    """A "model" nested in the body, or inside a string value, is never taken as the request's."""
    body = json.dumps(payload).encode()
    assert model_of(body) is None
    assert routing_model(body) is None


@pytest.mark.parametrize(
    ("payload", "model"),
    [
        ({"messages": [{"content": '{"model":"evil"}'}], "model": "real"}, "real"),
        ({"system": '"model":"evil",', "model": "real"}, "real"),
        ({"tools": [TASK_TOOL], "model": "real"}, "real"),
    ],
)
def test_a_model_inside_a_value_is_not_taken(payload: dict[str, Any], model: str) -> None:
    """Text that looks like a model member, earlier in the body, does not win over the real one."""
    body = json.dumps(payload).encode()
    assert routing_model(body) == model
    assert routing_model(body) == model_of(body)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"", b"{", b'{"messages": [', b'{"messages":[],"model":"x"', b"\xff\xfe"],
)
def test_routing_model_of_invalid_json_is_none(body: bytes) -> None:
    """A body that is not JSON routes as no model (every upstream serves it)."""
    assert routing_model(body) is None


# ----------------------------------------------------------------- deployment_of


@pytest.mark.parametrize(
    ("target", "deployment"),
    [
        (b"/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "gpt-4o"),
        (b"/openai/deployments/gpt-4o?api-version=2024-10-21", "gpt-4o"),
        (b"/openai/deployments/gpt-4o", "gpt-4o"),
        (b"/openai/deployments/gpt-4o/", "gpt-4o"),
        (b"/openai/deployments/my.deploy_1-x/embeddings", "my.deploy_1-x"),
        (b"/prefix/openai/deployments/o3-mini/completions", "o3-mini"),
        (b"/openai/deployments/", None),
        (b"/openai/deployments//chat/completions", None),
        (b"/openai/deployments/?api-version=1", None),
        (b"/openai/deployments", None),
        (b"/openai/v1/chat/completions", None),
        (b"/v1/messages", None),
        (b"/v1/responses?stream=true", None),
        (b"/", None),
        (b"", None),
    ],
)
def test_deployment_of(target: bytes, deployment: str | None) -> None:
    """A legacy Azure path names its deployment, which routes like a body's model."""
    assert deployment_of(target) == deployment


# ----------------------------------------------------------------- retry_hint

NOW_WALL = 1_800_000_000.0


@pytest.mark.parametrize(
    ("headers", "hint"),
    [
        ([(b"retry-after", b"30")], 30.0),
        ([(b"retry-after", b" 30 ")], 30.0),
        ([(b"retry-after", b"0")], 0.0),
        ([(b"retry-after-ms", b"1500")], 1.5),
        ([(b"retry-after-ms", b"1500.5")], 1.5005),
        ([(b"x-ms-retry-after-ms", b"250")], 0.25),
        ([(b"retry-after-ms", b"0")], 0.0),
        # the milliseconds win over retry-after, whichever comes first
        ([(b"retry-after", b"30"), (b"retry-after-ms", b"1500")], 1.5),
        ([(b"retry-after-ms", b"1500"), (b"retry-after", b"30")], 1.5),
        ([(b"x-ms-retry-after-ms", b"250"), (b"retry-after", b"30")], 0.25),
        # both millisecond forms: the longer
        ([(b"retry-after-ms", b"100"), (b"x-ms-retry-after-ms", b"250")], 0.25),
        # names in any case
        ([(b"Retry-After", b"30")], 30.0),
        ([(b"RETRY-AFTER", b"7")], 7.0),
        ([(b"Retry-After-Ms", b"1500")], 1.5),
        ([(b"X-Ms-Retry-After-Ms", b"250")], 0.25),
        ([(b"X-MS-RETRY-AFTER-MS", b"250"), (b"Retry-After", b"9")], 0.25),
        # other headers are not hints
        ([(b"content-type", b"application/json"), (b"retry-after", b"5")], 5.0),
        ([(b"x-ratelimit-reset-requests", b"30")], None),
        ([], None),
        # unusable values
        ([(b"retry-after", b"soon")], None),
        ([(b"retry-after", b"")], None),
        ([(b"retry-after", b"1.5")], None),
        ([(b"retry-after", b"-5")], None),
        ([(b"retry-after", b"\xff\xfe")], None),
        ([(b"retry-after-ms", b"soon")], None),
        ([(b"retry-after-ms", b"")], None),
        # negative, infinite or NaN milliseconds are ignored ...
        ([(b"retry-after-ms", b"-100")], None),
        ([(b"retry-after-ms", b"inf")], None),
        ([(b"x-ms-retry-after-ms", b"-inf")], None),
        ([(b"retry-after-ms", b"nan")], None),
        # ... and retry-after then counts
        ([(b"retry-after-ms", b"nan"), (b"retry-after", b"30")], 30.0),
        ([(b"retry-after-ms", b"garbage"), (b"retry-after", b"30")], 30.0),
        ([(b"retry-after-ms", b"-1"), (b"x-ms-retry-after-ms", b"250")], 0.25),
    ],
)
def test_retry_hint(headers: list[tuple[bytes, bytes]], hint: float | None) -> None:
    """The wait an answer asks for, in seconds; None when it gives none that can be used."""
    assert retry_hint(headers, NOW_WALL) == hint


@pytest.mark.parametrize("ahead", [20, 1, 3600])
@pytest.mark.parametrize("name", [b"retry-after", b"Retry-After"])
def test_retry_hint_http_date(ahead: int, name: bytes) -> None:
    """An HTTP-date is judged against the wall clock passed in (dates have whole seconds)."""
    date = email.utils.formatdate(NOW_WALL + ahead, usegmt=True).encode()
    hint = retry_hint([(name, date)], NOW_WALL)
    assert hint is not None
    assert hint == pytest.approx(ahead, abs=1.0)


@pytest.mark.parametrize("behind", [0, 1, 20, 86400 * 365])
def test_retry_hint_http_date_in_the_past_is_zero(behind: int) -> None:
    """A date already gone asks for no wait; it is never negative."""
    date = email.utils.formatdate(NOW_WALL - behind, usegmt=True).encode()
    assert retry_hint([(b"retry-after", date)], NOW_WALL) == 0.0


def test_retry_hint_milliseconds_win_over_an_http_date() -> None:
    date = email.utils.formatdate(NOW_WALL + 60, usegmt=True).encode()
    headers = [(b"retry-after", date), (b"x-ms-retry-after-ms", b"500")]
    assert retry_hint(headers, NOW_WALL) == 0.5


# ----------------------------------------------------------------- Health

SETTINGS = FailoverConfig(cooldown=10, max_cooldown=300, circuit_failures=3)
T = 1000.0  # monotonic seconds; any value
PROBE_FOR = 5.0


def health(settings: FailoverConfig = SETTINGS) -> Health:
    return Health(settings)


def opened(at: float = T) -> Health:
    """An upstream whose circuit opened at ``at``."""
    h = health()
    for _ in range(SETTINGS.circuit_failures):
        h.connect_failed(at)
    assert h.standing is OPEN
    return h


def test_a_fresh_upstream_is_ready() -> None:
    h = health()
    assert h.standing is READY
    assert h.standing_at(T) is READY
    assert h.usable(T)
    assert h.recovers_in(T) == 0.0
    assert h.take(T, PROBE_FOR)
    assert h.take(T, PROBE_FOR), "a ready upstream takes any number of requests"
    assert h.standing is READY


def test_a_refusal_cools_it_down_for_the_hint() -> None:
    """After a 429 with retry-after: 30 no request goes there for 30 s, then it is ready."""
    h = health()
    h.refused(T, 30)
    assert h.standing is COOLING
    assert h.until == T + 30
    assert not h.usable(T)
    assert not h.usable(T + 29.999)
    assert not h.take(T + 29.999, PROBE_FOR)
    assert h.standing is COOLING
    assert h.usable(T + 30)
    assert h.take(T + 30, PROBE_FOR)
    assert h.standing is READY
    assert h.take(T + 30, PROBE_FOR), "a cooldown ends for every request, not one"


@pytest.mark.parametrize(
    ("hint", "rest"),
    [
        (None, 10.0),  # no hint: failover.cooldown
        (30.0, 30.0),
        (0.5, 0.5),
        (300.0, 300.0),
        (301.0, 300.0),  # capped at failover.max_cooldown
        (86400.0, 300.0),
    ],
)
def test_refusal_rest(hint: float | None, rest: float) -> None:
    """The rest is the hint, or cooldown without one, never longer than max_cooldown."""
    h = health()
    h.refused(T, hint)
    assert h.standing is COOLING
    assert h.until == T + rest
    assert h.recovers_in(T) == rest
    assert not h.usable(T + rest - 0.001)
    assert h.usable(T + rest)


def test_a_refusal_asking_for_no_wait_leaves_it_ready() -> None:
    """retry-after: 0 says "again now": the upstream is not skipped."""
    h = health()
    h.refused(T, 0.0)
    assert h.standing is READY
    assert h.usable(T)
    assert h.recovers_in(T) == 0.0


@pytest.mark.parametrize("second", [None, 1.0, 5.0, 29.0])
def test_a_shorter_refusal_does_not_shorten_a_cooldown(second: float | None) -> None:
    """Another request refused later with a shorter hint does not bring the upstream back early."""
    h = health()
    h.refused(T, 30)
    h.refused(T + 1, second)
    assert h.standing is COOLING
    assert h.until == T + 30


def test_a_longer_refusal_extends_a_cooldown() -> None:
    h = health()
    h.refused(T, 30)
    h.refused(T + 10, 60)
    assert h.until == T + 70


def test_connect_failures_open_the_circuit_at_the_threshold() -> None:
    """Two failures in a row are bad luck; the third takes the upstream out for cooldown."""
    h = health()
    h.connect_failed(T)
    h.connect_failed(T)
    assert h.standing is READY
    assert h.failures == 2
    assert h.usable(T)
    assert h.take(T, PROBE_FOR)
    h.connect_failed(T + 1)
    assert h.standing is OPEN
    assert h.until == T + 1 + SETTINGS.cooldown
    assert not h.usable(T + 1)
    assert not h.take(T + 1, PROBE_FOR)
    assert not h.take(T + 10.999, PROBE_FOR)
    assert h.standing is OPEN


def test_a_connection_resets_the_count_of_failures() -> None:
    """Only failures in a row count: one good connection starts the count again."""
    h = health()
    h.connect_failed(T)
    h.connect_failed(T)
    h.connected()
    assert h.failures == 0
    h.connect_failed(T)
    h.connect_failed(T)
    assert h.standing is READY


def test_one_failure_opens_with_circuit_failures_1() -> None:
    h = health(FailoverConfig(circuit_failures=1))
    h.connect_failed(T)
    assert h.standing is OPEN
    assert h.until == T + 10


def test_after_the_cooldown_a_single_probe_goes() -> None:
    """Past an open circuit's cooldown one request finds out; the others skip the upstream."""
    h = opened(T)
    assert h.usable(T + 10)
    assert h.take(T + 10, PROBE_FOR)
    assert h.standing is PROBING
    assert h.until == T + 10 + PROBE_FOR
    assert not h.usable(T + 10)
    assert not h.take(T + 10, PROBE_FOR), "a second request does not probe too"
    assert not h.take(T + 14.999, PROBE_FOR)
    assert h.standing is PROBING


def test_a_probe_that_connects_closes_the_circuit() -> None:
    h = opened(T)
    assert h.take(T + 10, PROBE_FOR)
    h.connected()
    assert h.standing is READY
    assert h.failures == 0
    assert h.until == 0.0
    assert h.take(T + 10, PROBE_FOR)
    assert h.take(T + 10, PROBE_FOR)
    h.connect_failed(T + 11)
    assert h.standing is READY, "the count starts again from zero"


def test_a_probe_that_fails_reopens_at_once() -> None:
    """One failed probe is enough: the circuit does not wait for circuit_failures again."""
    h = opened(T)
    assert h.take(T + 10, PROBE_FOR)
    h.connect_failed(T + 12)
    assert h.standing is OPEN
    assert h.until == T + 12 + SETTINGS.cooldown
    assert not h.take(T + 21.999, PROBE_FOR)
    assert h.take(T + 22, PROBE_FOR)
    assert h.standing is PROBING


def test_a_probe_that_never_reports_is_given_up() -> None:
    """A probe lost without a word does not keep the upstream out for good."""
    h = opened(T)
    assert h.take(T + 10, PROBE_FOR)
    assert not h.take(T + 10 + PROBE_FOR - 0.001, PROBE_FOR)
    assert h.usable(T + 10 + PROBE_FOR)
    assert h.take(T + 10 + PROBE_FOR, PROBE_FOR)
    assert h.standing is PROBING
    assert h.until == T + 10 + 2 * PROBE_FOR
    assert not h.take(T + 10 + PROBE_FOR, PROBE_FOR), "still one probe at a time"


def test_connected_while_cooling_keeps_the_cooldown() -> None:
    """A connection says the upstream is reachable, not that it stopped refusing."""
    h = health()
    h.refused(T, 30)
    h.connected()
    assert h.standing is COOLING
    assert h.until == T + 30


def cooling() -> Health:
    h = health()
    h.refused(T, 30)
    return h


def probing() -> Health:
    h = opened(T)
    assert h.take(T + 10, PROBE_FOR)
    return h


@pytest.mark.parametrize(
    ("make", "now", "standing", "recovers_in"),
    [
        (health, T, READY, 0.0),
        (health, T + 1e6, READY, 0.0),
        (cooling, T, COOLING, 30.0),
        (cooling, T + 12.5, COOLING, 17.5),
        (cooling, T + 30, READY, 0.0),  # a cooldown that is over reads as ready
        (cooling, T + 99, READY, 0.0),
        (opened, T, OPEN, 10.0),
        (opened, T + 4, OPEN, 6.0),
        (opened, T + 10, OPEN, 0.0),  # over, but open until a probe says otherwise
        (opened, T + 99, OPEN, 0.0),
        (probing, T + 10, PROBING, PROBE_FOR),
        (probing, T + 12, PROBING, PROBE_FOR - 2),
        (probing, T + 99, PROBING, 0.0),
    ],
)
def test_standing_at_and_recovers_in(
    make: Callable[[], Health], now: float, standing: Standing, recovers_in: float
) -> None:
    """What the dashboard and the 503's retry-after show, at a given moment."""
    h = make()
    assert h.standing_at(now) is standing
    assert h.recovers_in(now) == recovers_in


@pytest.mark.parametrize(
    ("makes", "now", "wait"),
    [
        ((), T, 0.0),
        ((health,), T, 0.0),
        ((cooling, health, opened), T, 0.0),  # one is ready
        ((cooling, opened), T, 10.0),
        ((opened, cooling), T, 10.0),
        ((cooling, opened), T + 4, 6.0),
        ((cooling, opened), T + 10, 0.0),
        ((cooling, cooling), T + 20, 10.0),
        ((cooling,), T + 31, 0.0),
    ],
)
def test_soonest(makes: tuple[Callable[[], Health], ...], now: float, wait: float) -> None:
    """The wait until the first of several upstreams may be tried again."""
    assert soonest([make() for make in makes], now) == wait


# ----------------------------------------------------------------- Router


def up(name: str, priority: int = 1, weight: int = 1) -> UpstreamConfig:
    return UpstreamConfig(name, f"https://{name}.example", priority=priority, weight=weight)


def route(models: tuple[str, ...], upstreams: tuple[str, ...]) -> RouteConfig:
    return RouteConfig(models, upstreams)


def no_random() -> float:
    raise AssertionError("the order of one upstream needs no random draw")


@pytest.mark.parametrize(
    ("upstreams", "routes", "single", "needs_model"),
    [
        ([up("a")], [], True, False),
        ([up("a")], [route(("claude-*",), ("a",))], False, True),
        ([up("a"), up("b")], [], False, False),
        ([up("a"), up("b", priority=2)], [], False, False),
        ([up("a"), up("b")], [route(("gpt-*",), ("b",))], False, True),
    ],
)
def test_single_and_needs_model(
    upstreams: list[UpstreamConfig], routes: list[RouteConfig], single: bool, needs_model: bool
) -> None:
    """One upstream without routes takes the plain relay path; only routes need a body's model."""
    router = Router(upstreams, routes)
    assert router.single is single
    assert router.needs_model is needs_model
    assert router.names == tuple(u.name for u in upstreams)


ROUTED_UPSTREAMS = [up("ptu"), up("paygo", priority=2), up("openai"), up("spare", priority=3)]
ROUTED = Router(
    ROUTED_UPSTREAMS,
    [
        route(("claude-opus-*",), ("ptu",)),
        route(("claude-*", "anthropic.*"), ("paygo", "ptu")),
        route(("gpt-?o", "o[0-9]*"), ("openai",)),
        route(("claude-opus-4-1",), ("spare",)),  # never reached: an earlier route matches
    ],
)


@pytest.mark.parametrize(
    ("model", "serving"),
    [
        ("claude-opus-4-1", (0,)),
        ("claude-opus-", (0,)),
        ("claude-sonnet-4-5", (1, 0)),
        ("claude-", (1, 0)),
        ("anthropic.claude-v2", (1, 0)),
        ("gpt-4o", (2,)),
        ("o3", (2,)),
        ("o3-mini", (2,)),
        ("gpt-4o-mini", (0, 1, 2, 3)),  # "gpt-?o" is the whole name
        # case-sensitive
        ("Claude-opus-4-1", (0, 1, 2, 3)),
        ("CLAUDE-SONNET", (0, 1, 2, 3)),
        ("GPT-4O", (0, 1, 2, 3)),
        # no route: every upstream
        ("mistral-large", (0, 1, 2, 3)),
        ("", (0, 1, 2, 3)),
        (None, (0, 1, 2, 3)),
    ],
)
def test_serving_takes_the_first_matching_route(model: str | None, serving: tuple[int]) -> None:
    """The first route whose glob matches names the upstreams; with none, every upstream serves."""
    assert ROUTED.serving(model) == serving


def test_serving_without_routes_is_every_upstream() -> None:
    router = Router([up("a"), up("b"), up("c")], [])
    assert router.serving("claude-opus-4-1") == (0, 1, 2)
    assert router.serving(None) == (0, 1, 2)


BY_PRIORITY = [
    up("p2-heavy", priority=2, weight=50),
    up("p1-a", priority=1, weight=1),
    up("p3", priority=3, weight=100),
    up("p1-b", priority=1, weight=7),
    up("p2-light", priority=2, weight=1),
    up("p0", priority=0, weight=1),
    up("neg", priority=-1, weight=1),
]
PRIORITIES = Router(BY_PRIORITY, [])


@pytest.mark.parametrize("seed", range(200))
def test_order_is_by_priority_whatever_the_weights(seed: int) -> None:
    """A lower priority (PTU) is always tried before a higher one, however heavy that is."""
    draw = random.Random(seed).random
    indices = list(range(len(PRIORITIES.names)))
    random.Random(seed ^ 0x5A5A).shuffle(indices)
    order = PRIORITIES.order(indices, draw)
    assert sorted(order) == sorted(indices)
    priorities = [BY_PRIORITY[i].priority for i in order]
    assert priorities == sorted(priorities)
    assert order[0] == 6
    assert order[-1] == 2


@pytest.mark.parametrize("indices", [(0,), (3,)])
def test_order_of_one_upstream(indices: tuple[int, ...]) -> None:
    assert PRIORITIES.order(indices, no_random) == [indices[0]]


def test_order_of_none() -> None:
    assert PRIORITIES.order((), random.Random(0).random) == []


PLANS = 30_000


@pytest.mark.parametrize(
    ("weights", "share"),
    [
        ((2, 1), 2 / 3),
        ((1, 2), 1 / 3),
        ((1, 1), 1 / 2),
        ((3, 1), 3 / 4),
        ((10, 10), 1 / 2),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2026])
def test_weight_is_the_share_of_first_attempts(
    weights: tuple[int, int], share: float, seed: int
) -> None:
    """Within one priority, each upstream goes first in proportion to its weight."""
    router = Router([up("a", weight=weights[0]), up("b", weight=weights[1])], [])
    draw = random.Random(seed).random
    first = sum(router.order((0, 1), draw)[0] == 0 for _ in range(PLANS))
    assert abs(first / PLANS - share) <= 0.02


@pytest.mark.parametrize("seed", [0, 7])
def test_weight_share_does_not_depend_on_the_listed_order(seed: int) -> None:
    router = Router([up("a", weight=1), up("b", weight=2)], [])
    draw = random.Random(seed).random
    first = sum(router.order((1, 0), draw)[0] == 1 for _ in range(PLANS))
    assert abs(first / PLANS - 2 / 3) <= 0.02


def test_weight_share_among_three() -> None:
    """Efraimidis-Spirakis keys: the first is drawn with probability weight / total."""
    router = Router([up("a", weight=3), up("b", weight=2), up("c", weight=1)], [])
    draw = random.Random(11).random
    counts = [0, 0, 0]
    for _ in range(PLANS):
        counts[router.order((0, 1, 2), draw)[0]] += 1
    for count, share in zip(counts, (3 / 6, 2 / 6, 1 / 6), strict=True):
        assert abs(count / PLANS - share) <= 0.02


@pytest.mark.parametrize(
    "model",
    ["claude-opus-4-1", "claude-sonnet-4-5", "gpt-4o", "mistral-large", "", None],
)
@pytest.mark.parametrize("seed", range(20))
def test_plan_is_serving_then_order(model: str | None, seed: int) -> None:
    """A request's plan is the upstreams serving its model, by priority (the draws within a
    priority are :meth:`Router.order`'s, checked above; a plan draws only where it must)."""
    plan = ROUTED.plan(model, random.Random(seed).random)
    assert sorted(plan) == sorted(ROUTED.serving(model))
    priorities = [ROUTED_UPSTREAMS[i].priority for i in plan]
    assert priorities == sorted(priorities)


@pytest.mark.parametrize(
    ("model", "plan"),
    [
        ("claude-opus-4-1", [0]),
        ("claude-sonnet-4-5", [0, 1]),  # ptu (priority 1) before paygo (2), as listed or not
        ("gpt-4o", [2]),
    ],
)
def test_plan_examples(model: str, plan: list[int]) -> None:
    assert ROUTED.plan(model, random.Random(0).random) == plan


# ------------------------------------------------------------------ found in review, fixed


@pytest.mark.skipif(not hasattr(__import__("time"), "tzset"), reason="time.tzset is POSIX")
@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Tokyo"])
@pytest.mark.parametrize(
    "form", ["%a %b %e %H:%M:%S %Y", "%a, %d %b %Y %H:%M:%S -0000"], ids=["asctime", "-0000"]
)
def test_an_http_date_is_utc_whatever_the_servers_zone(
    monkeypatch: pytest.MonkeyPatch, tz: str, form: str
) -> None:
    import time

    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        now = 1.8e9
        date = time.strftime(form, time.gmtime(now + 20)).encode()
        assert retry_hint([(b"retry-after", date)], now) == 20.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_zero_hint_never_ends_a_rest_under_way() -> None:
    health = Health(FailoverConfig(cooldown=10, circuit_failures=1))
    health.refused(0.0, 30.0)
    health.refused(1.0, 0.0)
    assert health.standing is Standing.COOLING and health.until == 30.0
    opened = Health(FailoverConfig(cooldown=10, circuit_failures=1))
    opened.connect_failed(0.0)
    opened.refused(1.0, 0.0)
    assert opened.standing is Standing.OPEN and not opened.usable(5.0)


def test_connect_failures_during_a_long_rest_keep_it() -> None:
    health = Health(FailoverConfig(cooldown=10, circuit_failures=3))
    health.refused(0.0, 300.0)
    for _ in range(3):
        health.connect_failed(1.0)
    assert health.standing is Standing.OPEN and health.until == 300.0


def test_the_query_never_names_a_deployment() -> None:
    assert deployment_of(b"/v1/messages?next=/openai/deployments/evil/x") is None
    assert deployment_of(b"/openai/deployments/gpt-4o?x=/openai/deployments/evil/") == "gpt-4o"


@pytest.mark.parametrize("raw", [b'{"model":"a\nb"}', b'{"model":"a\tb"}', b'{"model":"a\x00"}'])
def test_a_control_character_in_the_model_is_left_to_the_decoder(raw: bytes) -> None:
    assert leading_model(raw) is None
    assert routing_model(raw) is None  # not JSON: no model at all


def test_a_plan_draws_the_weights_as_order_does() -> None:
    """Within a priority, a plan's first pick follows the weights (2:1 here)."""
    router = Router(
        [
            UpstreamConfig("a", "http://a", priority=1, weight=2),
            UpstreamConfig("b", "http://b", priority=1, weight=1),
            UpstreamConfig("c", "http://c", priority=2),
        ],
        [],
    )
    draw = random.Random(7).random
    firsts = [router.plan(None, draw)[0] for _ in range(30_000)]
    assert abs(firsts.count(0) / 30_000 - 2 / 3) <= 0.02
    assert all(router.plan(None, draw)[2] == 2 for _ in range(100))  # priority 2 is last
