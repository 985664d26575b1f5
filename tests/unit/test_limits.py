"""Limits without I/O: windows on an injected clock, the in-process store, models, expiry."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from claude_proxy.config import (
    ClientJwtConfig,
    ClientKey,
    Config,
    LimitsConfig,
    UpstreamAuthConfig,
)
from claude_proxy.errors import render_error
from claude_proxy.limits import (
    ConcurrencyLimited,
    DailyBudgetExhausted,
    KeyExpired,
    Limiter,
    LimitRefusal,
    ModelNotAllowed,
    RateLimited,
    Rules,
    TokenRateLimited,
    check_static,
    needs_limiter,
    resets_in,
)
from claude_proxy.routing import model_of


def head(error: LimitRefusal) -> bytes:
    """The head the relay sends for ``error`` (errors.render_error, the one renderer)."""
    return render_error(error, "anthropic", close=False).split(b"\r\n\r\n")[0] + b"\r\n"


T0 = 1_800_000_000.0 - (1_800_000_000 % 86400)  # 00:00:00 UTC on some day


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rules(**limits: Any) -> Rules:
    rules = Rules.of_key(ClientKey(name="team-a", key="k", **limits))
    assert rules is not None
    return rules


def limiter(clock: Clock) -> Limiter:
    return Limiter(LimitsConfig(), clock=clock, monotonic=clock)


def admit(lim: Limiter, r: Rules | None, model: str | None = "m", **kw: Any) -> Any:
    permit = lim.check_now("key", "team-a", r, model, **kw)
    assert permit is not None, "the in-process store never needs an await"
    return permit


ANTHROPIC = {"model": "claude-sonnet-4-5", "max_tokens": 9, "messages": [{"role": "user"}]}
OPENAI = {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-5-mini", "stream": True}


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (json.dumps(ANTHROPIC).encode(), "claude-sonnet-4-5"),
        (json.dumps(OPENAI).encode(), "gpt-5-mini"),
        (b'{"messages": [], "metadata": {"model": "nested-is-not-it"}}', None),
        (b'{"model": 7}', None),
        (b"not json", None),
        (b"", None),
    ],
)
def test_model_of_reads_the_top_level_model(body: bytes, model: str | None) -> None:
    assert model_of(body) == model


ALLOWED = ("claude-sonnet-*", "gpt-5*")


@pytest.mark.parametrize(
    ("body", "has_body", "refused"),
    [
        (ANTHROPIC, True, False),
        ({**ANTHROPIC, "model": "claude-opus-4-1"}, True, True),
        (OPENAI, True, False),
        ({**OPENAI, "model": "gpt-4o"}, True, True),
        ({**OPENAI, "model": "GPT-5"}, True, True),  # deployment names are case-sensitive
        ({"messages": []}, True, True),  # a body with no model
        (None, False, False),  # no body (GET /v1/models): nothing to check
    ],
)
def test_allowed_models_globs(body: dict[str, Any] | None, has_body: bool, refused: bool) -> None:
    model = model_of(json.dumps(body).encode()) if body is not None else None
    r = rules(allowed_models=ALLOWED)
    if refused:
        with pytest.raises(ModelNotAllowed) as info:
            check_static(r, model, has_body, T0)
        assert info.value.status == 403 and not info.value.should_retry
        assert "claude-sonnet-*, gpt-5*" in info.value.message
    else:
        check_static(r, model, has_body, T0)


@pytest.mark.parametrize(
    ("today", "expired"),
    [(datetime.date(2027, 6, 30), False), (datetime.date(2027, 7, 1), True)],
)
def test_expires_is_the_last_valid_day(today: datetime.date, expired: bool) -> None:
    now = datetime.datetime(today.year, today.month, today.day, 23, 59, tzinfo=datetime.UTC)
    r = rules(expires=datetime.date(2027, 6, 30))
    if expired:
        with pytest.raises(KeyExpired) as info:
            check_static(r, "m", True, now.timestamp())
        assert info.value.status == 401 and not info.value.should_retry
        assert "2027-06-30" in info.value.message
        assert b"x-should-retry: false" in head(info.value)
    else:
        check_static(r, "m", True, now.timestamp())


@pytest.mark.parametrize(("offset", "left"), [(0, 60), (0.5, 59.5), (59.9, 0.1), (60, 60)])
def test_minute_windows_are_aligned_to_the_clock(offset: float, left: float) -> None:
    assert resets_in(T0 + offset, 60) == pytest.approx(left)


def test_requests_per_minute_then_the_window_resets() -> None:
    clock = Clock(T0 + 20)
    lim = limiter(clock)
    r = rules(requests_per_minute=3)
    for _ in range(3):
        admit(lim, r).finish()
    with pytest.raises(RateLimited) as info:
        admit(lim, r)
    error = info.value
    assert error.status == 429 and error.should_retry and error.retry_after == 40
    assert b"retry-after: 40\r\n" in head(error) and b"x-should-retry: true" in head(error)
    assert "3 requests per minute" in error.message and "40 s" in error.message
    clock.now = T0 + 60  # the next minute
    admit(lim, r).finish()


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert RateLimited("x", 0.2).retry_after == 1
    assert b"retry-after: 41\r\n" in head(RateLimited("x", 40.01))


def test_tokens_per_minute_refuse_the_next_request_until_the_window_allows() -> None:
    clock = Clock(T0 + 5)
    lim = limiter(clock)
    r = rules(tokens_per_minute=1000)
    admit(lim, r).finish(600, 300)  # 900: under
    big = admit(lim, r)  # admitted: its tokens are known only after it
    big.finish(50, 100)  # 1050: over
    with pytest.raises(TokenRateLimited) as info:
        admit(lim, r)
    assert info.value.openai_type == "tokens" and "1000 tokens per minute" in info.value.message
    clock.now = T0 + 61
    admit(lim, r).finish()


def test_tokens_per_day_is_a_budget_not_worth_retrying_before_midnight() -> None:
    clock = Clock(T0 + 3600)
    lim = limiter(clock)
    r = rules(tokens_per_day=100, tokens_per_minute=10_000)
    admit(lim, r).finish(100, 0)
    with pytest.raises(DailyBudgetExhausted) as info:
        admit(lim, r)
    error = info.value
    assert error.status == 429 and not error.should_retry
    assert b"x-should-retry: false" in head(error) and b"retry-after" not in head(error)
    assert "100 tokens per day" in error.message and "00:00:00 UTC" in error.message
    clock.now = T0 + 86400
    admit(lim, r)


def test_concurrency_is_held_by_permits_until_they_finish() -> None:
    lim = limiter(Clock())
    r = rules(max_concurrent=2)
    held = [admit(lim, r), admit(lim, r)]
    with pytest.raises(ConcurrencyLimited):
        admit(lim, r)
    held[0].finish()
    held[0].finish()  # a second finish does nothing
    third = admit(lim, r)
    with pytest.raises(ConcurrencyLimited):
        admit(lim, r)
    held[1].finish()
    third.finish()


def test_a_key_without_limits_is_counted_for_usage_only() -> None:
    lim = limiter(Clock())
    for _ in range(1000):
        admit(lim, None).finish(1, 1)
    assert lim.memory._subjects == {}


async def test_usage_reports_windows_and_budgets_left() -> None:
    clock = Clock(T0 + 30)
    lim = limiter(clock)
    r = rules(requests_per_minute=10, tokens_per_day=1000)
    admit(lim, r).finish(100, 20)
    held = admit(lim, r)
    with pytest.raises(LimitRefusal):
        lim.check_now("key", "team-b", rules(allowed_models=("x",)), "y")
    lim.check_now("user", "oid-1", None, "m", display="alice@example.com")
    doc = await lim.usage()
    team = doc["keys"]["team-a"]
    assert team["requests"] == 2 and team["tokens"] == 120 and team["in_flight"] == 1
    assert doc["keys"]["team-b"]["refused"] == {"allowed_models": 1}
    assert lim.refusals["allowed_models"] == 1
    assert team["window"]["requests_this_minute"] == 2
    assert team["left"]["requests_per_minute"] == 8 and team["left"]["tokens_per_day"] == 880
    assert doc["users"]["oid-1"]["name"] == "alice@example.com"
    assert doc["store"] == "memory" and doc["minute_resets_in"] == 30
    json.dumps(doc)
    held.finish()


@pytest.mark.parametrize(
    ("changes", "needed"),
    [
        ({}, False),
        ({"client_api_keys": (ClientKey(name="a", key="k"),)}, False),
        ({"client_api_keys": (ClientKey(name="a", key="k", allowed_models=("c*",)),)}, True),
        ({"client_api_keys": (ClientKey(name="a", key="k", max_concurrent=1),)}, True),
        ({"client_jwt": ClientJwtConfig(issuer="https://i.example", audience="a")}, True),
    ],
)
def test_needs_limiter(changes: dict[str, Any], needed: bool) -> None:
    config = Config(
        upstream_url="http://127.0.0.1:9",
        upstream_auth=UpstreamAuthConfig(type="api_key", api_key="u"),
        **changes,
    )
    assert needs_limiter(config) is needed
