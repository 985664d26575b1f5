"""Limits shared through a real redis-server on loopback by two limiters, as two replicas.

Windows are moved by the limiters' injected clock (the window's index is part of each key),
so a reset needs no sleep; Redis is stopped and started again mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from claude_proxy.config import ClientKey, LimitsConfig
from claude_proxy.errors import render_error
from claude_proxy.limits import (
    ConcurrencyLimited,
    DailyBudgetExhausted,
    Limiter,
    LimitRefusal,
    LimitsUnavailable,
    Permit,
    RateLimited,
    Rules,
    TokenRateLimited,
)

from ..redis_server import RedisServer

T0 = 1_800_000_000.0 - (1_800_000_000 % 86400) + 3600.0  # 01:00:00 UTC


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def rules(**limits: Any) -> Rules:
    found = Rules.of_key(ClientKey(name="team-a", key="k", **limits))
    assert found is not None
    return found


class Replicas:
    """Two limiters on one Redis, one clock (replicas agree on the time)."""

    def __init__(self, url: str, **config: Any) -> None:
        self.clock = Clock()
        config = {"redis_timeout": 2.0, "key_prefix": f"t-{uuid.uuid4().hex[:8]}:", **config}
        self.a, self.b = (
            Limiter(LimitsConfig(redis_url=url, **config), clock=self.clock, monotonic=self.clock)
            for _ in range(2)
        )

    async def close(self) -> None:
        await self.a.close()
        await self.b.close()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Replicas]:
    made = Replicas(redis_server.url)
    yield made
    await made.close()


async def check(lim: Limiter, r: Rules | None, who: str = "team-a") -> Permit:
    return await lim.check("key", who, r, "claude-sonnet-4-5")


async def test_n_per_minute_lets_exactly_n_through_across_both(replicas: Replicas) -> None:
    r = rules(requests_per_minute=7)
    outcomes = await asyncio.gather(
        *(check(lim, r) for _ in range(10) for lim in (replicas.a, replicas.b)),
        return_exceptions=True,
    )
    admitted = [o for o in outcomes if isinstance(o, Permit)]
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(admitted) == 7 and len(refused) == 13, outcomes
    assert all(e.retry_after == 60 for e in refused)
    for p in admitted:
        p.finish()


async def test_a_new_window_admits_again(replicas: Replicas) -> None:
    r = rules(requests_per_minute=2)
    (await check(replicas.a, r)).finish()
    (await check(replicas.b, r)).finish()
    replicas.clock.now = T0 + 59.5
    with pytest.raises(RateLimited) as info:
        await check(replicas.a, r)
    assert info.value.retry_after == 1  # 0.5 s, in whole seconds rounded up
    replicas.clock.now = T0 + 60
    (await check(replicas.b, r)).finish()
    (await check(replicas.a, r)).finish()
    with pytest.raises(RateLimited):
        await check(replicas.b, r)


async def test_tokens_counted_on_one_replica_refuse_on_the_other(replicas: Replicas) -> None:
    r = rules(tokens_per_minute=1000, tokens_per_day=1500)
    (await check(replicas.a, r)).finish(700, 400)  # 1100 tokens, known after the response
    await replicas.a.drain()
    with pytest.raises(TokenRateLimited) as info:
        await check(replicas.b, r)
    assert info.value.should_retry and "1000 tokens per minute" in info.value.message
    replicas.clock.now = T0 + 60  # a new minute: the day still holds 1100
    (await check(replicas.b, r)).finish(300, 200)
    await replicas.b.drain()
    with pytest.raises(DailyBudgetExhausted) as day:
        await check(replicas.a, r)
    assert not day.value.should_retry
    assert day.value.retry_after == 86400 - 3600 - 60
    replicas.clock.now = T0 + 23 * 3600  # 00:00 UTC next day
    (await check(replicas.a, r)).finish()


async def test_concurrency_held_by_streams_on_both_replicas(replicas: Replicas) -> None:
    r = rules(max_concurrent=3)
    held = [await check(replicas.a, r), await check(replicas.b, r), await check(replicas.a, r)]
    for lim in (replicas.a, replicas.b):
        with pytest.raises(ConcurrencyLimited):
            await check(lim, r)
    held.pop().finish()  # one stream ends on replica a...
    await replicas.a.drain()
    held.append(await check(replicas.b, r))  # ...and its slot is free on replica b
    with pytest.raises(ConcurrencyLimited):
        await check(replicas.a, r)
    for p in held:
        p.finish()
    await replicas.a.drain()
    await replicas.b.drain()
    doc = await replicas.b.usage()
    assert doc["keys"]["team-a"]["window"]["concurrent"] == 0
    assert doc["keys"]["team-a"]["window"]["requests_this_minute"] == 4


async def test_usage_reads_the_shared_windows(replicas: Replicas) -> None:
    r = rules(requests_per_minute=100, tokens_per_day=10_000)
    (await check(replicas.a, r)).finish(10, 5)
    (await check(replicas.b, r)).finish(20, 5)
    await replicas.a.drain()
    await replicas.b.drain()
    doc = await replicas.a.usage()
    team = doc["keys"]["team-a"]
    assert doc["store"] == "redis" and doc["store_ok"]
    assert team["requests"] == 1 and team["tokens"] == 15  # this replica, since start
    assert team["window"] == {
        "requests_this_minute": 2,
        "tokens_this_minute": 40,
        "tokens_today": 40,
        "concurrent": 0,
    }
    assert team["left"] == {"requests_per_minute": 98, "tokens_per_day": 9960}


async def test_a_key_without_counted_limits_never_asks_redis(own_redis: RedisServer) -> None:
    own_redis.stop()  # would fail any call
    lim = Limiter(LimitsConfig(redis_url=own_redis.url, redis_timeout=2.0))
    for r in (None, rules(allowed_models=("claude-*",))):
        permit = lim.check_now("key", "team-a", r, "claude-x")
        assert permit is not None and not permit.tracked
        permit.finish(5, 5)
    assert lim.store_errors == 0
    await lim.close()


@pytest.mark.parametrize("on_error", ["allow", "deny"])
async def test_redis_stopped_mid_run(
    own_redis: RedisServer, on_error: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "claude_proxy.limits")
    reps = Replicas(own_redis.url, on_redis_error=on_error)
    r = rules(requests_per_minute=1000)
    (await check(reps.a, r)).finish(1, 1)
    await reps.a.drain()
    own_redis.stop()
    for _ in range(3):
        if on_error == "allow":
            permit = await check(reps.a, r)
            assert not permit.tracked
            permit.finish(10, 10)  # nothing to write: no task, no error
        else:
            with pytest.raises(LimitsUnavailable) as info:
                await check(reps.a, r)
            assert info.value.status == 503 and info.value.should_retry
        reps.clock.now += 0.1  # within the retry pace: decided without Redis
    assert reps.a.store_errors == 1 and not reps.a.store_ok
    assert reps.a.refusals["store_unavailable"] == (3 if on_error == "deny" else 0)
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(down) == 1, "logged once per change of state"
    reps.clock.now += 5  # past the pace: Redis is tried again, and still fails
    with pytest.raises(LimitsUnavailable) if on_error == "deny" else _nothing():
        (await check(reps.a, r)).finish()
    assert reps.a.store_errors == 2
    own_redis.start()
    reps.clock.now += 5
    (await check(reps.a, r)).finish()
    assert reps.a.store_ok
    assert [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
    await reps.close()


async def test_a_hung_redis_costs_a_request_at_most_redis_timeout() -> None:
    """A server that accepts and never answers: the limiter gives up after redis_timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    lim = Limiter(LimitsConfig(redis_url=url, redis_timeout=0.05))
    try:
        permit = await check(lim, rules(requests_per_minute=5))
        assert not permit.tracked and lim.store_errors == 1
        permit.finish()
    finally:
        await lim.close()
        listener.close()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_refusals_are_proxy_errors_the_relay_can_render() -> None:
    for cls in (RateLimited, TokenRateLimited, ConcurrencyLimited, DailyBudgetExhausted):
        error: LimitRefusal = cls("m", 3.2)
        assert error.status == 429 and error.retry_after == 4
        rendered = render_error(error, "openai", close=False)
        assert (b"retry-after: 4\r\n" in rendered) is error.should_retry


async def test_a_cancelled_admission_frees_its_slot(replicas: Replicas) -> None:
    """The client goes away while Redis decides: whatever Redis did, the slot comes back."""
    r = rules(max_concurrent=1)
    task = asyncio.ensure_future(check(replicas.a, r))
    await asyncio.sleep(0)  # one turn: the script is on its way, its answer is not
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        (await task).finish()  # it may have finished first
    await replicas.a.drain()
    (await check(replicas.b, r)).finish()
