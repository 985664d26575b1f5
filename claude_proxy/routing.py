"""Which upstreams a request may go to, in which order, and which are resting: pure logic.

Nothing here does I/O or reads a clock: the relay passes ``now`` (monotonic seconds) and a
random source in, so every rule is tested with plain values.

* :func:`routing_model` reads the top-level ``"model"`` of a JSON request body without
  changing (or, usually, reading) more than its first bytes; :func:`deployment_of` takes the
  deployment from a legacy ``/openai/deployments/<name>/`` path.
* :class:`Router` turns a model into candidates: the first ``[[routes]]`` entry whose glob
  matches names the upstreams, otherwise every upstream serves; lower ``priority`` first, and
  among equals a weighted random order, so ``weight`` is each one's share of first attempts.
* :class:`Health` is one upstream's standing, a state machine::

      READY ──429/503/529──▶ COOLING (until the retry hint, or failover.cooldown) ──▶ READY
        └──circuit_failures connect failures in a row──▶ OPEN (failover.cooldown)
      OPEN ──cooldown over, one request let through──▶ PROBING ──connected──▶ READY
                                                         └──fails──▶ OPEN
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from .config import FailoverConfig, RouteConfig, UpstreamConfig

# --------------------------------------------------------------------------- the model


class _ModelOnly(msgspec.Struct):
    model: object = None


_MODEL_DECODER: Final = msgspec.json.Decoder(_ModelOnly)
_WS: Final = b" \t\r\n"
_KEY: Final = b'"model"'
_CONTROL: Final = re.compile(rb"[\x00-\x1f]")


def model_of(body: bytes) -> str | None:
    """The top-level ``"model"`` of a JSON body, read exactly (the whole body is decoded,
    other fields skipped, not built); None when there is none or the body is not JSON. With
    a key given twice, the last one counts, as in most JSON parsers."""
    try:
        model = _MODEL_DECODER.decode(body).model
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return model if isinstance(model, str) else None


def leading_model(body: bytes) -> str | None:
    """The model when it is the body's first member (``{"model":"x",...``, as Claude Code and
    Codex send it), from the first bytes alone; None when it is not first, or is escaped."""
    i = 0
    n = len(body)
    while i < n and body[i] in _WS:
        i += 1
    if i >= n or body[i] != 0x7B:  # {
        return None
    i += 1
    while i < n and body[i] in _WS:
        i += 1
    if not body.startswith(_KEY, i):
        return None
    i += len(_KEY)
    while i < n and body[i] in _WS:
        i += 1
    if i >= n or body[i] != 0x3A:  # :
        return None
    i += 1
    while i < n and body[i] in _WS:
        i += 1
    if i >= n or body[i] != 0x22:  # "
        return None
    end = body.find(b'"', i + 1)
    if end < 0:
        return None
    raw = body[i + 1 : end]
    if b"\\" in raw or _CONTROL.search(raw) is not None:
        return None  # an escape, or a control character JSON forbids: the decoder decides
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def routing_model(body: bytes) -> str | None:
    """The model a request is routed by: the leading member if it is the model (a few bytes
    read), else the whole body decoded (RFC 8259 §4: a name given twice is unpredictable;
    here the fast path takes the first)."""
    model = leading_model(body)
    return model if model is not None else model_of(body)


_DEPLOYMENTS: Final = b"/openai/deployments/"


def deployment_of(target: bytes) -> str | None:
    """The deployment of a legacy Azure OpenAI target, ``/openai/deployments/<name>/...``."""
    path = target.split(b"?", 1)[0]  # never the query: it is the client's to fill
    start = path.find(_DEPLOYMENTS)
    if start < 0:
        return None
    start += len(_DEPLOYMENTS)
    end = path.find(b"/", start)
    name = path[start:] if end < 0 else path[start:end]
    return name.decode("latin-1") if name else None


# --------------------------------------------------------------------------- retry hints


def retry_hint(headers: Iterable[tuple[bytes, bytes]], now_wall: float) -> float | None:
    """Seconds an answer asks to wait: ``retry-after-ms`` or ``x-ms-retry-after-ms`` (Azure's,
    in milliseconds) first, else ``retry-after`` (RFC 9110 §10.2.3: seconds or an HTTP-date,
    judged against ``now_wall``). None when there is no usable hint."""
    millis: float | None = None
    after: bytes | None = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"retry-after-ms" or lname == b"x-ms-retry-after-ms":
            try:
                ms = float(value.strip())
            except ValueError:
                continue
            if math.isfinite(ms) and ms >= 0:
                millis = ms if millis is None else max(millis, ms)
        elif lname == b"retry-after":
            after = value.strip()
    if millis is not None:
        return millis / 1000.0
    if after is None:
        return None
    if after.isdigit():
        return float(int(after))
    try:
        when = email.utils.parsedate_to_datetime(after.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" forms: an HTTP-date is always UTC (§5.6.7)
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now_wall)


# --------------------------------------------------------------------------- health


class Standing(enum.Enum):
    READY = "ready"
    COOLING = "cooling"  # refused with 429/503/529: skipped until ``until``
    OPEN = "open"  # connect failures in a row: skipped until ``until``, then probed
    PROBING = "probing"  # one request is finding out whether it is back


READY, COOLING, OPEN, PROBING = Standing.READY, Standing.COOLING, Standing.OPEN, Standing.PROBING

# Answers that say the upstream is overloaded: they cool it down, whatever on_status holds.
COOLING_STATUS: Final = frozenset({429, 503, 529})


class Health:
    """One upstream's standing; every change goes through :meth:`_to`."""

    __slots__ = ("failures", "settings", "standing", "until")

    def __init__(self, settings: FailoverConfig) -> None:
        self.settings = settings
        self.standing = READY
        self.until = 0.0  # when COOLING or OPEN ends; when a PROBING request is given up
        self.failures = 0  # connect failures in a row

    def _to(self, standing: Standing, until: float = 0.0) -> None:
        self.standing = standing
        self.until = until

    def usable(self, now: float) -> bool:
        """Whether a request could be sent here now (without claiming the probe)."""
        return self.standing is READY or now >= self.until

    def take(self, now: float, probe_for: float) -> bool:
        """Claim this upstream for one request. Past an open circuit's cooldown the request
        becomes the probe, and others skip the upstream until it reports (or ``probe_for``
        seconds pass without it reporting)."""
        standing = self.standing
        if standing is READY:
            return True
        if now < self.until:
            return False
        if standing is COOLING:
            self._to(READY)
        else:  # OPEN, or a probe that never reported
            self._to(PROBING, now + probe_for)
        return True

    def refused(self, now: float, hint: float | None) -> None:
        """It answered 429, 503 or 529: rest for the hint (capped), or ``cooldown``. A rest
        under way is never shortened, and a hint of 0 asks for none."""
        rest = self.settings.cooldown if hint is None else hint
        rest = min(rest, self.settings.max_cooldown)
        if rest > 0:
            self._to(COOLING, max(now + rest, self.until if self.standing is not READY else 0.0))

    def connected(self) -> None:
        """A connection to it is up: the circuit closes."""
        self.failures = 0
        if self.standing is PROBING or self.standing is OPEN:
            self._to(READY)

    def connect_failed(self, now: float) -> None:
        self.failures += 1
        if self.standing is PROBING or self.failures >= self.settings.circuit_failures:
            later = self.until if self.standing is COOLING else 0.0  # a longer rest stays
            self._to(OPEN, max(now + self.settings.cooldown, later))

    def standing_at(self, now: float) -> Standing:
        """The standing as it reads at ``now``: a cooldown that is over reads as ready."""
        if self.standing is COOLING and now >= self.until:
            return READY
        return self.standing

    def recovers_in(self, now: float) -> float:
        """Seconds until it may be tried again (0 when it may now)."""
        return 0.0 if self.standing is READY else max(0.0, self.until - now)


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True, slots=True)
class _Route:
    patterns: tuple[str, ...]
    upstreams: tuple[int, ...]


class Router:
    """Upstreams in the order one request tries them."""

    __slots__ = (
        "_all",
        "_groups",
        "_priority",
        "_routes",
        "_weight",
        "names",
        "needs_model",
        "single",
    )

    def __init__(self, upstreams: Sequence[UpstreamConfig], routes: Sequence[RouteConfig]):
        self.names = tuple(u.name for u in upstreams)
        index = {name: i for i, name in enumerate(self.names)}
        self._priority = tuple(u.priority for u in upstreams)
        self._weight = tuple(float(u.weight) for u in upstreams)
        self._all = tuple(range(len(upstreams)))
        self._routes = tuple(
            _Route(r.models, tuple(index[name] for name in r.upstreams)) for r in routes
        )
        self.needs_model = bool(self._routes)  # without routes every upstream serves all
        self.single = len(upstreams) == 1 and not self._routes
        # each serving set split by priority once, so a plan draws only where weights decide
        self._groups = {
            s: self._by_priority(s) for s in (self._all, *(r.upstreams for r in self._routes))
        }

    def _by_priority(self, indices: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        levels = sorted({self._priority[i] for i in indices})
        return tuple(tuple(i for i in indices if self._priority[i] == p) for p in levels)

    def serving(self, model: str | None) -> tuple[int, ...]:
        """The upstreams that serve ``model``: the first route that matches, else all."""
        if model is not None:
            for route in self._routes:
                for pattern in route.patterns:
                    if fnmatch.fnmatchcase(model, pattern):
                        return route.upstreams
        return self._all

    def order(self, indices: Sequence[int], random: Callable[[], float]) -> list[int]:
        """``indices`` by priority, and within a priority in a weighted random order (each
        one's chance of going first is its share of the weights: Efraimidis-Spirakis keys)."""
        if len(indices) == 1:
            return [indices[0]]
        priority, weight = self._priority, self._weight
        keyed = [(priority[i], -(random() ** (1.0 / weight[i])), i) for i in indices]
        keyed.sort()
        return [i for _, _, i in keyed]

    def plan(self, model: str | None, random: Callable[[], float]) -> list[int]:
        """:meth:`order` of :meth:`serving`, with the priority levels split in advance."""
        out: list[int] = []
        for group in self._groups[self.serving(model)]:
            out.extend(self.order(group, random) if len(group) > 1 else group)
        return out


def soonest(healths: Iterable[Health], now: float) -> float:
    """Seconds until the first of these upstreams may be tried again."""
    return min((h.recovers_in(now) for h in healths), default=0.0)
