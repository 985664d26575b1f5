"""Limits per key or per JWT user: requests and tokens per window, concurrency, models, expiry.

Windows are fixed and aligned to the clock: a minute window resets at the next whole minute, a
day window at 00:00 UTC. Before a request goes upstream, :meth:`Limiter.check_now` (or, when it
returns None, ``await`` :meth:`Limiter.check`) admits it or raises one of the refusals below;
the :class:`Permit` it returns is finished once with the tokens the response reported, which
count against the token windows of later requests (a response's tokens are known only after it).

Counts live in this process (:class:`MemoryStore`), or in Redis (:class:`RedisStore`) shared by
workers and replicas: one Lua script per admission, atomic, and none for a key without counted
limits. While Redis cannot be reached, ``on_redis_error`` decides, and Redis is tried again at
most once a second, so a request waits for it at most ``redis_timeout``.
"""

from __future__ import annotations

import asyncio
import datetime
import fnmatch
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol

from .config import ClientKey, Config, JwtPolicy, LimitsConfig, LimitSettings
from .errors import ProxyError
from .windows import DAY, MINUTE, Counts, window_index

if TYPE_CHECKING:
    from .redis_store import RedisStore

logger = logging.getLogger(__name__)

RETRY_DOWN_EVERY: Final = 1.0  # while Redis is unreachable, try it at most this often
MAX_TRACKED: Final = 10000  # subjects kept for /usage; the oldest seen goes first

Clock = Callable[[], float]
LimitName = Literal[
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "max_concurrent",
    "allowed_models",
    "expires",
    "store_unavailable",
]
LIMIT_NAMES: Final[tuple[LimitName, ...]] = (
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "max_concurrent",
    "allowed_models",
    "expires",
    "store_unavailable",
)


# --------------------------------------------------------------------------- refusals


class LimitRefusal(ProxyError):
    """A request refused by a limit; ``limit`` names it (a bounded set, for metrics).

    ``retry_after`` is whole seconds to the limit's reset, rounded up (the relay sends it as
    ``retry-after`` when ``should_retry``).
    """

    should_retry = True
    limit: ClassVar[LimitName]

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))


class RateLimited(LimitRefusal):
    status = 429
    anthropic_type = "rate_limit_error"
    openai_type = "requests"
    openai_code = "rate_limit_exceeded"
    limit: ClassVar[LimitName] = "requests_per_minute"


class TokenRateLimited(RateLimited):
    openai_type = "tokens"
    limit: ClassVar[LimitName] = "tokens_per_minute"


class ConcurrencyLimited(RateLimited):
    limit: ClassVar[LimitName] = "max_concurrent"


class DailyBudgetExhausted(LimitRefusal):
    """429 as a quota is in both APIs, but not worth retrying before the day's reset."""

    status = 429
    anthropic_type = "rate_limit_error"
    openai_type = "insufficient_quota"
    openai_code = "insufficient_quota"
    should_retry = False
    limit = "tokens_per_day"


class ModelNotAllowed(LimitRefusal):
    status = 403
    anthropic_type = "permission_error"
    openai_type = "permission_error"
    openai_code = "model_not_allowed"
    should_retry = False
    limit = "allowed_models"


class KeyExpired(LimitRefusal):
    status = 401
    anthropic_type = "authentication_error"
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"
    should_retry = False
    limit = "expires"


class LimitsUnavailable(LimitRefusal):
    """Redis unreachable and ``on_redis_error = "deny"``."""

    status = 503
    openai_code = "limits_unavailable"
    limit = "store_unavailable"


# --------------------------------------------------------------------------- rules (pure)


@dataclass(frozen=True, slots=True)
class Rules:
    """The limits of one key or policy; ``name`` (bounded) is what logs and metrics show."""

    name: str
    settings: LimitSettings
    counted: bool = False  # some limit needs counts kept (set from settings)

    @classmethod
    def of(cls, name: str, settings: LimitSettings) -> Rules:
        return cls(name, settings, settings.counted())

    @classmethod
    def of_key(cls, key: ClientKey) -> Rules | None:
        return cls.of(key.name, key) if key.limited() else None

    @classmethod
    def of_policy(cls, policy: JwtPolicy) -> Rules:
        return cls.of(policy.label, policy)

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {
            "requests_per_minute": s.requests_per_minute,
            "tokens_per_minute": s.tokens_per_minute,
            "tokens_per_day": s.tokens_per_day,
            "max_concurrent": s.max_concurrent,
            "allowed_models": list(s.allowed_models) if s.allowed_models is not None else None,
            "expires": s.expires.isoformat() if s.expires else None,
        }
        return {k: v for k, v in out.items() if v is not None}


def needs_limiter(config: Config) -> bool:
    """Whether a :class:`Limiter` is wanted: a key with limits, or JWT users (whose policies
    and /usage entries it keeps). Without one the request path never calls into this module."""
    return config.client_jwt is not None or any(k.limited() for k in config.client_keys())


def model_allowed(patterns: tuple[str, ...], model: str) -> bool:
    """Whether ``model`` matches one of the globs (case-sensitive, as deployment names are)."""
    return any(fnmatch.fnmatchcase(model, p) for p in patterns)


def check_static(rules: Rules, model: str | None, has_body: bool, now: float) -> None:
    """The limits decided from the request alone: expiry, then the model. Raises a refusal.

    ``model`` is the body's top-level ``"model"`` (None when absent or not read); a request
    without a body (``has_body`` False, e.g. ``GET /v1/models``) is not checked for a model.
    """
    s = rules.settings
    if s.expires is not None:
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        if today > s.expires:
            raise KeyExpired(
                f"This key ({rules.name}) expired at the end of {s.expires.isoformat()} UTC; "
                f"ask the proxy's operator for a new one."
            )
    if s.allowed_models is None or not has_body:
        return
    allowed = ", ".join(s.allowed_models)
    if model is None:
        raise ModelNotAllowed(
            f"{rules.name} may use only the models {allowed}, and this request names no model."
        )
    if not model_allowed(s.allowed_models, model):
        raise ModelNotAllowed(f"{rules.name} may not use model {model!r}; allowed: {allowed}.")


def resets_in(now: float, period: int) -> float:
    """Seconds until the current window of ``period`` seconds ends."""
    return (window_index(now, period) + 1) * period - now


def _utc(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# Which check refused: 0 none; the order below is the order they are checked in.
OK, OVER_DAY, OVER_TPM, OVER_RPM, OVER_CONCURRENT = 0, 1, 2, 3, 4


def decide(s: LimitSettings, c: Counts) -> int:
    """The first counted limit ``c`` is at or over (a budget before a rate), or OK."""
    if s.tokens_per_day is not None and c.tokens_day >= s.tokens_per_day:
        return OVER_DAY
    if s.tokens_per_minute is not None and c.tokens_minute >= s.tokens_per_minute:
        return OVER_TPM
    if s.requests_per_minute is not None and c.requests_minute >= s.requests_per_minute:
        return OVER_RPM
    if s.max_concurrent is not None and c.concurrent >= s.max_concurrent:
        return OVER_CONCURRENT
    return OK


def refusal(code: int, rules: Rules, now: float) -> LimitRefusal:
    """The error for a refused check, naming the limit and when it resets."""
    s = rules.settings
    name = rules.name
    if code == OVER_DAY:
        at = (window_index(now, DAY) + 1) * DAY
        return DailyBudgetExhausted(
            f"{name} has used its {s.tokens_per_day} tokens per day; "
            f"the budget resets at {_utc(at)}.",
            resets_in(now, DAY),
        )
    if code == OVER_TPM:
        wait = resets_in(now, MINUTE)
        return TokenRateLimited(
            f"{name} is over its {s.tokens_per_minute} tokens per minute; "
            f"the window resets in {math.ceil(wait)} s.",
            wait,
        )
    if code == OVER_RPM:
        wait = resets_in(now, MINUTE)
        return RateLimited(
            f"{name} is over its {s.requests_per_minute} requests per minute; "
            f"the window resets in {math.ceil(wait)} s.",
            wait,
        )
    return ConcurrencyLimited(
        f"{name} already has {s.max_concurrent} requests in flight (max_concurrent); "
        f"retry when one finishes.",
        1.0,
    )


# --------------------------------------------------------------------------- stores


@dataclass(slots=True)
class _Windows:
    minute: int = -1
    day: int = -1
    requests_minute: int = 0
    tokens_minute: int = 0
    tokens_day: int = 0
    permits: set[str] = field(default_factory=set)

    def roll(self, now: float) -> None:
        minute, day = window_index(now, MINUTE), window_index(now, DAY)
        if minute != self.minute:
            self.minute, self.requests_minute, self.tokens_minute = minute, 0, 0
        if day != self.day:
            self.day, self.tokens_day = day, 0

    def counts(self) -> Counts:
        return Counts(self.requests_minute, self.tokens_minute, self.tokens_day, len(self.permits))


class MemoryStore:
    """Counts in this process: one worker, nothing else to run. Every call is synchronous."""

    def __init__(self) -> None:
        self._subjects: dict[str, _Windows] = {}

    def _at(self, subject: str, now: float) -> _Windows:
        w = self._subjects.get(subject)
        if w is None:
            w = self._subjects[subject] = _Windows()
        w.roll(now)
        return w

    def admit(self, subject: str, s: LimitSettings, now: float, permit: str) -> int:
        w = self._at(subject, now)
        code = decide(s, w.counts())
        if code == OK:
            w.requests_minute += 1
            if s.max_concurrent is not None:
                w.permits.add(permit)
        return code

    def release(self, subject: str, now: float, permit: str, tokens: int) -> None:
        w = self._at(subject, now)
        w.permits.discard(permit)
        w.tokens_minute += tokens
        w.tokens_day += tokens

    def counts(self, subject: str, now: float) -> Counts:
        w = self._subjects.get(subject)
        if w is None:
            return Counts()
        w.roll(now)
        return w.counts()

    def forget(self, subject: str) -> None:
        self._subjects.pop(subject, None)


# --------------------------------------------------------------------------- the limiter


class LimitObserver(Protocol):
    """What metrics learn from the limiter (labels from bounded sets only: never a user)."""

    def limit_refused(self, limit: LimitName) -> None: ...

    def limits_store_error(self) -> None: ...

    def limits_store_up(self, up: bool) -> None: ...


@dataclass(slots=True)
class Tally:
    """Since this process started: what one key or user did (for /usage)."""

    kind: Literal["key", "user"]
    id: str  # the key's name or the user's identity claim
    rules: Rules | None
    display: str | None = None  # a JWT user's name_claim
    requests: int = 0
    tokens: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0


class Permit:
    """One admitted request; :meth:`finish` it once, with the tokens its response used."""

    __slots__ = ("_done", "_holds_slot", "_id", "_limiter", "_subject", "_tally", "tracked")

    def __init__(self, limiter: Limiter, tally: Tally, subject: str, pid: str, tracked: bool):
        self._limiter = limiter
        rules = tally.rules
        self._holds_slot = rules is not None and rules.settings.max_concurrent is not None
        self._tally = tally
        self._subject = subject
        self._id = pid
        self._done = False
        self.tracked = tracked  # False: nothing to release (no counted limits, or store down)

    def finish(self, input_tokens: int | None = None, output_tokens: int | None = None) -> None:
        """Count the tokens and end the permit. Synchronous: with Redis, the write is a task
        the limiter owns (off the request path); later calls do nothing."""
        if self._done:
            return
        self._done = True
        tokens = max(0, input_tokens or 0) + max(0, output_tokens or 0)
        self._tally.tokens += tokens
        self._tally.in_flight -= 1
        if self.tracked and (tokens or self._holds_slot):
            self._limiter._release(self._subject, self._id, tokens)


class Limiter:
    """Admits or refuses requests by their key's or user's :class:`Rules`.

    ``clock`` is wall time (windows are aligned to it and shared across replicas);
    ``monotonic`` paces retries of an unreachable Redis. Both are injectable for tests.
    """

    def __init__(
        self,
        config: LimitsConfig,
        *,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        observer: LimitObserver | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        self.clock = clock
        self.monotonic = monotonic
        self.memory = MemoryStore()
        self.redis: RedisStore | None = None
        # what a failing store raises; redis-py is imported only when Redis is configured
        # (it imports OpenTelemetry when that is installed)
        self._store_errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
        if config.redis_url:
            from .redis_store import RedisError, RedisStore

            self.redis = RedisStore(config.redis_url, config.key_prefix, config.redis_timeout)
            self._store_errors = (OSError, TimeoutError, RedisError)
        self.started = clock()
        self.store_ok = True
        self.store_errors = 0  # failed Redis calls, for metrics
        self.refusals: dict[str, int] = dict.fromkeys(LIMIT_NAMES, 0)  # by limit, for metrics
        self._down_since = -math.inf
        # permit ids are members of a sorted set every replica shares: unique across them
        self._instance = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- admission

    def check_now(
        self,
        kind: Literal["key", "user"],
        id: str,
        rules: Rules | None,
        model: str | None,
        *,
        has_body: bool = True,
        display: str | None = None,
    ) -> Permit | None:
        """Admit without waiting, raise a :class:`LimitRefusal`, or return None: then the
        answer needs Redis and the caller awaits :meth:`check` with the same arguments."""
        now = self.clock()
        tally = self._tally(kind, id, rules, display)
        if rules is None:
            return self._admitted(tally, "", tracked=False)
        try:
            check_static(rules, model, has_body, now)
        except LimitRefusal as exc:
            self._refused(tally, exc)
            raise
        if not rules.counted:
            return self._admitted(tally, "", tracked=False)
        subject = f"{kind}:{id}"
        if self.redis is None:
            pid = self._next_id()
            code = self.memory.admit(subject, rules.settings, now, pid)
            return self._decided(tally, subject, rules, code, now, pid)
        if not self.store_ok and self.monotonic() - self._down_since < RETRY_DOWN_EVERY:
            return self._store_down(tally, subject)
        return None

    async def check(
        self,
        kind: Literal["key", "user"],
        id: str,
        rules: Rules | None,
        model: str | None,
        *,
        has_body: bool = True,
        display: str | None = None,
    ) -> Permit:
        """:meth:`check_now`, waiting at most ``redis_timeout`` for Redis when it must."""
        permit = self.check_now(kind, id, rules, model, has_body=has_body, display=display)
        if permit is not None:
            return permit
        assert self.redis is not None and rules is not None
        tally = self._tally(kind, id, rules, display)
        subject = f"{kind}:{id}"
        now = self.clock()
        pid = self._next_id()
        try:
            async with asyncio.timeout(self.config.redis_timeout):
                code, _ = await self.redis.admit(subject, rules.settings, now, pid)
        except self._store_errors as exc:
            self._abandon(subject, pid, rules)
            self._store_failed(exc)
            return self._store_down(tally, subject)
        except asyncio.CancelledError:  # the client went away while Redis decided
            self._abandon(subject, pid, rules)
            raise
        self._store_recovered()
        return self._decided(tally, subject, rules, code, now, pid)

    def _abandon(self, subject: str, pid: str, rules: Rules) -> None:
        """Redis may have admitted a request whose answer never arrived: free its slot."""
        if rules.settings.max_concurrent is not None:
            self._release(subject, pid, 0)

    def _next_id(self) -> str:
        return f"{self._instance}-{next(self._ids)}"

    def _decided(
        self, tally: Tally, subject: str, rules: Rules, code: int, now: float, pid: str
    ) -> Permit:
        if code != OK:
            error = refusal(code, rules, now)
            self._refused(tally, error)
            raise error
        return self._admitted(tally, subject, tracked=True, pid=pid)

    def _admitted(self, tally: Tally, subject: str, *, tracked: bool, pid: str = "") -> Permit:
        tally.requests += 1
        tally.in_flight += 1
        return Permit(self, tally, subject, pid, tracked)

    def _refused(self, tally: Tally, error: LimitRefusal) -> None:
        tally.refused[error.limit] = tally.refused.get(error.limit, 0) + 1
        self.refusals[error.limit] += 1
        if self.observer is not None:
            self.observer.limit_refused(error.limit)

    def _store_down(self, tally: Tally, subject: str) -> Permit:
        if self.config.on_redis_error == "allow":
            return self._admitted(tally, subject, tracked=False)
        error = LimitsUnavailable(
            "The proxy cannot reach its limits store and is set to refuse requests until it "
            "can (limits.on_redis_error = deny).",
            RETRY_DOWN_EVERY,
        )
        self._refused(tally, error)
        raise error

    # ---- Redis health: logged once per change of state

    def _store_failed(self, exc: BaseException) -> None:
        self.store_errors += 1
        self._down_since = self.monotonic()
        if self.observer is not None:
            self.observer.limits_store_error()
        if self.store_ok:
            self.store_ok = False
            if self.observer is not None:
                self.observer.limits_store_up(False)
            logger.warning(
                "limits: Redis unreachable (%s); requests are %s until it answers",
                type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}",
                "allowed without limits" if self.config.on_redis_error == "allow" else "refused",
            )

    def _store_recovered(self) -> None:
        if not self.store_ok:
            self.store_ok = True
            if self.observer is not None:
                self.observer.limits_store_up(True)
            logger.warning("limits: Redis answers again; limits are enforced")

    # ---- release

    def _release(self, subject: str, pid: str, tokens: int) -> None:
        now = self.clock()
        if self.redis is None:
            self.memory.release(subject, now, pid, tokens)
            return
        task = asyncio.get_running_loop().create_task(self._release_redis(subject, pid, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release_redis(self, subject: str, pid: str, tokens: int) -> None:
        assert self.redis is not None
        try:
            # Off the request path, so it may wait longer than an admission does.
            async with asyncio.timeout(max(1.0, self.config.redis_timeout)):
                await self.redis.release(subject, self.clock(), pid, tokens)
        except self._store_errors as exc:
            self._store_failed(exc)
            logger.debug("limits: %d tokens of %s not counted: %r", tokens, subject, exc)

    async def drain(self) -> None:
        """Wait for the Redis writes that finished permits started (before close or a test)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        if self.redis is not None:
            await self.redis.close()

    # ---- usage

    def preload(self, keys: tuple[ClientKey, ...]) -> None:
        """List the configured keys in /usage before their first request (with Redis, their
        shared windows show even in a process that serves no request, e.g. a supervisor)."""
        for key in keys:
            self._tally("key", key.name, Rules.of_key(key), None)

    def _tally(
        self, kind: Literal["key", "user"], id: str, rules: Rules | None, display: str | None
    ) -> Tally:
        tally = self._tallies.get((kind, id))
        if tally is None:
            if len(self._tallies) >= MAX_TRACKED:
                oldest = next(iter(self._tallies))
                del self._tallies[oldest]
                self.memory.forget(f"{oldest[0]}:{oldest[1]}")
            tally = self._tallies[(kind, id)] = Tally(kind, id, rules, display)
        else:
            tally.rules = rules
            if display is not None:
                tally.display = display
        return tally

    def tallies(self) -> Iterator[Tally]:
        return iter(list(self._tallies.values()))

    async def usage(self) -> dict[str, Any]:
        """/usage: per key name and per JWT user, since start and in the current windows."""
        now = self.clock()
        tallies = list(self._tallies.values())
        counted = [t for t in tallies if t.rules is not None and t.rules.counted]
        windows: dict[tuple[str, str], Counts] = {}
        if self.redis is None:
            for t in counted:
                windows[(t.kind, t.id)] = self.memory.counts(f"{t.kind}:{t.id}", now)
        elif counted:
            try:
                async with asyncio.timeout(max(1.0, self.config.redis_timeout)):
                    got = await self.redis.counts([f"{t.kind}:{t.id}" for t in counted], now)
            except self._store_errors as exc:
                self._store_failed(exc)
            else:
                windows = {(t.kind, t.id): c for t, c in zip(counted, got, strict=True)}
        doc: dict[str, Any] = {
            "since": _utc(self.started),
            "store": "redis" if self.redis is not None else "memory",
            "store_ok": self.store_ok,
            "store_errors": self.store_errors,
            "minute_resets_in": math.ceil(resets_in(now, MINUTE)),
            "day_resets_in": math.ceil(resets_in(now, DAY)),
            "keys": {},
            "users": {},
        }
        for t in tallies:
            entry = usage_entry(t, windows.get((t.kind, t.id)))
            doc["keys" if t.kind == "key" else "users"][t.id] = entry
        return doc


def usage_entry(t: Tally, c: Counts | None) -> dict[str, Any]:
    """One key's or user's /usage entry; ``c`` None when no window counts are at hand."""
    entry: dict[str, Any] = {
        "policy": t.rules.name if t.rules else None,
        "requests": t.requests,
        "tokens": t.tokens,
        "refused": dict(t.refused),
        "in_flight": t.in_flight,
    }
    if t.display is not None:
        entry["name"] = t.display
    if t.rules is None:
        return entry
    entry["limits"] = t.rules.as_dict()
    if c is None:
        return entry
    s = t.rules.settings
    entry["window"] = {
        "requests_this_minute": c.requests_minute,
        "tokens_this_minute": c.tokens_minute,
        "tokens_today": c.tokens_day,
        "concurrent": c.concurrent,
    }
    left: dict[str, int] = {}
    for name, limit, used in (
        ("requests_per_minute", s.requests_per_minute, c.requests_minute),
        ("tokens_per_minute", s.tokens_per_minute, c.tokens_minute),
        ("tokens_per_day", s.tokens_per_day, c.tokens_day),
        ("max_concurrent", s.max_concurrent, c.concurrent),
    ):
        if limit is not None:
            left[name] = max(0, limit - used)
    entry["left"] = left
    return entry
