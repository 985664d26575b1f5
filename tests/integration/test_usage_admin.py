"""/usage on the real admin listener, fed by a real limiter (in-process and on Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from claude_proxy.admin import AdminServer
from claude_proxy.config import ClientKey, LimitsConfig
from claude_proxy.limits import Limiter, LimitName, RateLimited, Rules

from ..redis_server import RedisServer

KEYS = (
    ClientKey(name="team-a", key="ka", requests_per_minute=2, tokens_per_day=1000),
    ClientKey(name="team-b", key="kb"),
)


class Seen:
    def __init__(self) -> None:
        self.refused: list[str] = []
        self.errors = 0
        self.up: list[bool] = []

    def limit_refused(self, limit: LimitName) -> None:
        self.refused.append(limit)

    def limits_store_error(self) -> None:
        self.errors += 1

    def limits_store_up(self, up: bool) -> None:
        self.up.append(up)


async def get(port: int, path: str) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.json()


async def serve(limiter: Limiter | None) -> AdminServer:
    admin = AdminServer(
        "127.0.0.1",
        0,
        lambda: b"",
        lambda: (True, "ok"),
        usage=limiter.usage if limiter is not None else None,
    )
    await admin.start()
    return admin


def traffic(lim: Limiter) -> None:
    a = Rules.of_key(KEYS[0])
    for _ in range(2):
        permit = lim.check_now("key", "team-a", a, "claude-sonnet-4-5")
        assert permit is not None
        permit.finish(100, 50)
    with pytest.raises(RateLimited):
        lim.check_now("key", "team-a", a, "claude-sonnet-4-5")
    for i in range(3):
        user = lim.check_now("user", f"oid-{i}", None, "m", display=f"u{i}@contoso.example")
        assert user is not None
        user.finish(1, 1)


async def test_usage_in_process() -> None:
    seen = Seen()
    lim = Limiter(LimitsConfig(), observer=seen)
    lim.preload(KEYS)
    traffic(lim)
    admin = await serve(lim)
    try:
        status, doc = await get(admin.port, "/usage")
    finally:
        await admin.close()
    assert status == 200
    team = doc["keys"]["team-a"]
    assert team["requests"] == 2 and team["tokens"] == 300
    assert team["refused"] == {"requests_per_minute": 1}
    assert team["left"] == {"requests_per_minute": 0, "tokens_per_day": 700}
    assert team["limits"] == {"requests_per_minute": 2, "tokens_per_day": 1000}
    assert doc["keys"]["team-b"] == {
        "policy": None,
        "requests": 0,
        "tokens": 0,
        "refused": {},
        "in_flight": 0,
    }
    assert sorted(doc["users"]) == ["oid-0", "oid-1", "oid-2"]
    assert doc["users"]["oid-1"]["name"] == "u1@contoso.example"
    assert seen.refused == ["requests_per_minute"]


async def test_usage_is_404_without_limits() -> None:
    admin = await serve(None)
    try:
        status, _ = await get(admin.port, "/usage")
    finally:
        await admin.close()
    assert status == 404


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


async def test_usage_from_redis_in_a_process_that_served_nothing(
    redis_server: RedisServer,
) -> None:
    """A supervisor's admin listener: its limiter saw no request, Redis has the windows."""
    config = LimitsConfig(redis_url=redis_server.url, redis_timeout=2.0, key_prefix="u:")
    seen = Seen()
    worker, supervisor = Limiter(config), Limiter(config, observer=seen)
    supervisor.preload(KEYS)
    a = Rules.of_key(KEYS[0])
    permit = await worker.check("key", "team-a", a, "claude-sonnet-4-5")
    permit.finish(400, 100)
    await worker.drain()
    admin = await serve(supervisor)
    try:
        _, doc = await get(admin.port, "/usage")
        team = doc["keys"]["team-a"]
        assert team["requests"] == 0  # since this process started
        assert team["window"]["requests_this_minute"] == 1
        assert team["left"] == {"requests_per_minute": 1, "tokens_per_day": 500}
        redis_server.stop()
        _, doc = await get(admin.port, "/usage")
        assert doc["store_ok"] is False and "window" not in doc["keys"]["team-a"]
        assert seen.errors == 1 and seen.up == [False]
    finally:
        await admin.close()
        await worker.close()
        await supervisor.close()
