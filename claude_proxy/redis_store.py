"""Limit counts in Redis, shared by every worker and replica that names the same server.

One Lua script admits a request (one round trip); another adds a response's tokens and ends
its permit. Imported by limits.py only when ``[limits] redis_url`` is set: redis-py imports
OpenTelemetry whenever that is installed, which a proxy without Redis must not pay for.
"""

from __future__ import annotations

from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .config import LimitSettings
from .windows import CONCURRENCY_LEASE, DAY, MINUTE, Counts, window_index

__all__ = ["RedisError", "RedisStore"]


# KEYS: requests/minute, tokens/minute, tokens/day, in-flight permits (sorted set, score = end
# of lease). ARGV: the four limits (0 = none), now, permit id, lease, minute ttl, day ttl.
ADMIT_LUA: Final = """
local rpm = tonumber(redis.call('GET', KEYS[1]) or '0')
local tpm = tonumber(redis.call('GET', KEYS[2]) or '0')
local tpd = tonumber(redis.call('GET', KEYS[3]) or '0')
local now = tonumber(ARGV[5])
local conc = 0
if tonumber(ARGV[4]) > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  conc = redis.call('ZCARD', KEYS[4])
end
local code = 0
if tonumber(ARGV[3]) > 0 and tpd >= tonumber(ARGV[3]) then code = 1
elseif tonumber(ARGV[2]) > 0 and tpm >= tonumber(ARGV[2]) then code = 2
elseif tonumber(ARGV[1]) > 0 and rpm >= tonumber(ARGV[1]) then code = 3
elseif tonumber(ARGV[4]) > 0 and conc >= tonumber(ARGV[4]) then code = 4
end
if code == 0 then
  rpm = redis.call('INCR', KEYS[1])
  if rpm == 1 then redis.call('EXPIRE', KEYS[1], ARGV[8]) end
  if tonumber(ARGV[4]) > 0 then
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[7]), ARGV[6])
    redis.call('EXPIRE', KEYS[4], math.ceil(tonumber(ARGV[7])))
    conc = conc + 1
  end
end
return {code, rpm, tpm, tpd, conc}
"""

# KEYS: tokens/minute, tokens/day, permits. ARGV: tokens, permit id, minute ttl, day ttl.
RELEASE_LUA: Final = """
redis.call('ZREM', KEYS[3], ARGV[2])
local tokens = tonumber(ARGV[1])
if tokens > 0 then
  if redis.call('INCRBY', KEYS[1], tokens) == tokens then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
  if redis.call('INCRBY', KEYS[2], tokens) == tokens then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
end
return 1
"""


class RedisStore:
    """Counts in Redis, shared by every worker and replica that names the same server.

    Keys carry the window's index (from the caller's clock), so a new window is a new key and
    old ones expire by themselves; the subject sits in a hash tag to keep one subject's keys in
    one Redis Cluster slot.
    """

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self.prefix = prefix
        self.redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._admit = self.redis.register_script(ADMIT_LUA)
        self._release = self.redis.register_script(RELEASE_LUA)

    def keys(self, subject: str, now: float) -> tuple[str, str, str, str]:
        base = f"{self.prefix}{{{subject}}}"
        minute, day = window_index(now, MINUTE), window_index(now, DAY)
        return (f"{base}:rpm:{minute}", f"{base}:tpm:{minute}", f"{base}:tpd:{day}", f"{base}:c")

    async def admit(
        self, subject: str, s: LimitSettings, now: float, permit: str
    ) -> tuple[int, Counts]:
        limits = (s.requests_per_minute, s.tokens_per_minute, s.tokens_per_day, s.max_concurrent)
        args: list[float | str] = [v or 0 for v in limits]
        args += [now, permit, CONCURRENCY_LEASE, 2 * MINUTE, 2 * DAY]
        reply = await self._admit(keys=self.keys(subject, now), args=args)
        code, rpm, tpm, tpd, conc = (int(v) for v in reply)
        return code, Counts(rpm, tpm, tpd, conc)

    async def release(self, subject: str, now: float, permit: str, tokens: int) -> None:
        _, tpm, tpd, permits = self.keys(subject, now)
        await self._release(keys=[tpm, tpd, permits], args=[tokens, permit, 2 * MINUTE, 2 * DAY])

    async def counts(self, subjects: list[str], now: float) -> list[Counts]:
        """Every subject's counts in one pipelined round trip (for /usage)."""
        pipe = self.redis.pipeline(transaction=False)
        for subject in subjects:
            *windows, permits = self.keys(subject, now)
            pipe.mget(windows)
            pipe.zcount(permits, now, "+inf")
        replies = await pipe.execute()
        out = []
        for values, conc in zip(replies[::2], replies[1::2], strict=True):
            requests, tokens, day = (int(v or 0) for v in values)
            out.append(Counts(requests, tokens, day, int(conc)))
        return out

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()
