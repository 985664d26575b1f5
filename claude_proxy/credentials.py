"""Upstream credentials: a static API key, or Entra ID tokens kept fresh off the request path.

:class:`TokenAuth` puts one cache in front of an ``azure.identity.aio`` credential:

* one acquisition in flight at a time, however many requests want a token (azure-identity has
  no single-flight, and ``AzureCliCredential`` caches nothing);
* the first token is fetched at start-up and refreshed in the background before it expires, so
  after start-up no request waits;
* during an outage the still-valid token keeps being served while refreshes back off; state
  changes are logged once, not per request;
* no valid token: :class:`~claude_proxy.errors.CredentialUnavailable` (503) with safe text;
* an upstream 401 to a token gets that token one replacement, however many requests it failed:
  requests wait for the fresh one (bounded by the acquisition's timeout). When the fresh token is
  rejected too, or the source hands back the rejected one, the next try is backed off (doubling,
  capped) and requests meanwhile carry the latest token, so the upstream's own 401 reaches the
  client instead of a proxy error for everything.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import UpstreamAuthConfig
from .errors import CredentialUnavailable
from .headers import UpstreamCredential
from .logs import register_secret

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

    from .metrics import Metrics

logger = logging.getLogger(__name__)

# A token this close to expiry is no longer handed out.
EXPIRY_MARGIN = 10.0
# Refresh this long before expiry (or half the lifetime, for short-lived tokens). Below 300 s,
# azure-identity's own cache agrees that a refresh is due and really fetches a new token.
REFRESH_BEFORE = 240.0
BACKOFF_FIRST = 1.0
MIN_INTERVAL = 0.5
BACKOFF_MAX = 30.0
# A rejection streak is forgotten after this many back-off caps without a 401.
FORGET_AFTER_CAPS = 10.0


class UpstreamAuth:
    """How the proxy authenticates to the upstream; ``credential_now`` is on the hot path."""

    description = "none"
    metrics: Metrics | None = None

    def credential_now(self) -> UpstreamCredential | None:
        """The credential to send, or None when one is being fetched (then ``credential_wait``).

        Raises CredentialUnavailable when none can be had.
        """
        raise NotImplementedError

    async def credential_wait(self) -> UpstreamCredential:
        raise NotImplementedError

    def rejected(self, credential: UpstreamCredential) -> None:
        """The upstream answered 401 to a request carrying ``credential``."""

    def ready(self) -> bool:
        return True

    @property
    def token_expires_on(self) -> float | None:
        return None

    async def start(self) -> None:
        """Called inside the running loop before the listener opens."""

    async def close(self) -> None:
        """Release what ``start`` made."""

    def status(self) -> dict[str, Any]:
        return {"type": self.description}


class ApiKeyAuth(UpstreamAuth):
    description = "api_key"

    def __init__(self, api_key: str) -> None:
        self._credential = UpstreamCredential("api_key", api_key.encode("latin-1"))

    def __repr__(self) -> str:
        return "ApiKeyAuth(<redacted>)"

    def credential_now(self) -> UpstreamCredential:
        return self._credential

    async def credential_wait(self) -> UpstreamCredential:
        return self._credential


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_on: float
    acquired_at: float

    def __repr__(self) -> str:
        return f"Token(<redacted>, expires_on={self.expires_on:.0f})"


class TokenAuth(UpstreamAuth):
    """Entra ID bearer tokens from an azure-identity asyncio credential, cached and refreshed.

    Each acquisition uses a credential object of its own (closed right after): azure-identity's
    internal cache would otherwise hand back the token being replaced, and a fresh object
    cannot be bound to a stale event loop.
    """

    def __init__(
        self,
        kind: str,
        factory: Callable[[], AsyncTokenCredential],
        scope: str,
        *,
        timeout: float = 30.0,
        backoff_max: float = BACKOFF_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.description = kind
        self._factory = factory
        self.scope = scope
        self.timeout = timeout
        self.backoff_max = backoff_max
        self._clock = clock
        self._token: Token | None = None
        self._header: UpstreamCredential | None = None
        self._current_rejected = False  # the upstream answered 401 to the token in use
        self._streak = 0  # tokens the upstream rejected in a row
        self._backoff: float | None = None  # the wait before the current rejected token's successor
        self._fresh_timer: asyncio.TimerHandle | None = None
        self._forget_timer: asyncio.TimerHandle | None = None
        self._inflight: asyncio.Task[Token] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._last_error: str | None = None
        self._state = "starting"

    def __repr__(self) -> str:
        return f"TokenAuth({self.description!r}, scope={self.scope!r})"

    # ---------------------------------------------------------------- hot path

    def credential_now(self) -> UpstreamCredential | None:
        header = self._header
        if header is not None and self._usable(self._token):
            if not self._current_rejected or not self.acquiring:
                return header  # a rejected token's successor is backed off: the upstream decides
            return None  # the successor of a rejected token is on its way: wait for it
        if self.acquiring:
            return None  # a token is on its way: wait for it
        if self._last_error is not None:
            self._set_state("unavailable", f"the token expired; {self._last_error}")
            raise self._unavailable()
        self._kick()
        return None

    async def credential_wait(self) -> UpstreamCredential:
        header = self.credential_now()
        if header is not None:
            return header
        assert self._inflight is not None
        with contextlib.suppress(Exception):
            await asyncio.shield(self._inflight)
        if self._header is not None and self._usable(self._token):
            return self._header  # possibly the rejected one, when no other could be had
        raise self._unavailable()

    def rejected(self, credential: UpstreamCredential) -> None:
        """One successor per rejected token: a 401 for a token already replaced, or already
        rejected, changes nothing. The first rejection in a streak fetches at once; later ones
        back off."""
        header = self._header
        if header is None or credential.value != header.value or self._current_rejected:
            return
        self._current_rejected = True
        self._streak += 1
        self._remember_streak()
        if self._streak == 1:
            self._set_state(
                "rejected", "the upstream answered 401 to the token; fetching a fresh one"
            )
            self._kick()
        else:
            self._refused(f"the upstream rejected {self._streak} tokens in a row")

    def ready(self) -> bool:
        return not self._current_rejected and self._usable(self._token)

    @property
    def acquiring(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Begin the first acquisition and the refresher; requests wait for the first token."""
        self._wake = asyncio.Event()
        self._kick()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def wait_ready(self) -> bool:
        """Wait for the acquisition in flight (if any); True when a valid token is at hand."""
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._inflight)
        return self.ready()

    async def close(self) -> None:
        for timer in (self._fresh_timer, self._forget_timer):
            if timer is not None:
                timer.cancel()
        tasks = [t for t in (self._refresher, self._inflight) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        # their own cancellation is the expected outcome; ours still propagates
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        token = self._token
        out: dict[str, Any] = {
            "type": self.description,
            "scope": self.scope,
            "state": self._state,
            "acquiring": self.acquiring,
        }
        if self._streak:
            out["rejections"] = self._streak
        if self._fresh_timer is not None and self._backoff is not None:
            out["backoff"] = self._backoff
        if token is not None:
            out["expires_on"] = token.expires_on
            out["expires_in"] = round(token.expires_on - self._clock())
            out["audience"] = token_audience(token.value)
        if self._last_error:
            out["error"] = self._last_error
        return out

    @property
    def token_expires_on(self) -> float | None:
        return self._token.expires_on if self._token else None

    # ---------------------------------------------------------------- acquisition

    def _usable(self, token: Token | None) -> bool:
        if token is None:
            return False
        margin = min(EXPIRY_MARGIN, (token.expires_on - token.acquired_at) / 10)
        return token.expires_on - self._clock() > margin

    def _kick(self) -> asyncio.Task[Token]:
        """Start an acquisition unless one is in flight: the single flight."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._acquire())
            self._inflight.add_done_callback(_consume)
        return self._inflight

    async def _acquire(self) -> Token:
        if self.metrics is not None:
            self.metrics.acquisitions.inc()
        try:
            async with asyncio.timeout(self.timeout):
                async with self._factory() as credential:
                    access = await credential.get_token(self.scope)
        except TimeoutError:
            self._failed(f"no answer from the token source within {self.timeout:g} s")
            raise
        except Exception as exc:
            self._failed(describe_credential_error(exc))
            raise
        token = Token(access.token, float(access.expires_on), self._clock())
        register_secret(token.value, transient=True)
        previous, was_rejected = self._token, self._current_rejected
        self._token = token
        self._header = UpstreamCredential("bearer", token.value.encode("latin-1"))
        self._last_error = None
        same = was_rejected and previous is not None and previous.value == token.value
        self._current_rejected = same
        valid = f"valid for {token.expires_on - self._clock():.0f} s"
        if same:
            self._streak += 1
            self._remember_streak()
            self._refused("the token source handed back the token the upstream rejected")
        elif self._state == "refused":
            logger.debug("fresh token acquired, %s, after %d rejected", valid, self._streak)
        else:
            self._set_state("ok", f"token acquired, {valid}")
        if self._wake is not None:
            self._wake.set()
        return token

    def _failed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.failures.inc()
        self._last_error = reason
        if self._usable(self._token):
            rejected = ", although the upstream rejected it," if self._current_rejected else ""
            self._set_state(
                "degraded",
                f"token refresh failed ({reason}); the current token is still valid "
                f"and{rejected} in use",
            )
        else:
            self._set_state("unavailable", f"no valid upstream token: {reason}")
        if self._wake is not None:
            self._wake.set()

    def _set_state(self, state: str, message: str) -> None:
        if state == self._state:
            return
        previous, self._state = self._state, state
        level = _STATE_LEVELS.get(state, logging.ERROR)
        logger.log(level, "upstream credential %s -> %s: %s", previous, state, message)

    # ---------------------------------------------------------------- rejections

    def _refused(self, reason: str) -> None:
        """The upstream keeps rejecting: fetch the next token after a back-off, not at once."""
        delay = rejection_backoff(self._streak, BACKOFF_FIRST, self.backoff_max)
        self._set_state(
            "refused",
            f"{reason}; check the identity's role on the resource and upstream_auth.scope. "
            f"Fresh tokens are tried with back-off up to {self.backoff_max:g} s; meanwhile "
            "requests carry the latest token and clients get the upstream's 401",
        )
        logger.debug("next fresh token in %.1f s (%d rejected in a row)", delay, self._streak)
        if self._fresh_timer is not None:
            self._fresh_timer.cancel()
        self._backoff = delay
        self._fresh_timer = asyncio.get_running_loop().call_later(delay, self._fresh_due)

    def _fresh_due(self) -> None:
        self._fresh_timer = None
        if self._current_rejected:
            self._kick()

    def _remember_streak(self) -> None:
        """(Re)arm the timer that forgets the streak once no 401 has come for a while."""
        if self._forget_timer is not None:
            self._forget_timer.cancel()
        after = FORGET_AFTER_CAPS * self.backoff_max
        self._forget_timer = asyncio.get_running_loop().call_later(after, self._forget, after)

    def _forget(self, after: float) -> None:
        self._forget_timer = None
        if self._current_rejected:
            self._remember_streak()  # no successor yet (source down): not over
            return
        self._streak = 0
        if self._state in ("rejected", "refused"):
            self._set_state("ok", f"no 401 for the current token in {after:g} s")

    def _unavailable(self) -> CredentialUnavailable:
        """The 503 for requests; clients are told not to retry when a person must act."""
        reason = self._last_error or ""
        return CredentialUnavailable(self._unavailable_message(), needs_person=needs_person(reason))

    def _unavailable_message(self) -> str:
        reason = self._last_error or "no token yet"
        return f"The proxy's upstream credential ({self.description}) is unavailable: {reason}."

    def _refresh_due_in(self) -> float:
        token = self._token
        assert token is not None
        lifetime = max(token.expires_on - token.acquired_at, 1.0)
        due = token.expires_on - min(REFRESH_BEFORE, lifetime / 2)
        return due - self._clock()

    async def _refresh_loop(self) -> None:
        """Keep a valid token at hand: refresh before expiry, back off while failing."""
        assert self._wake is not None
        backoff = BACKOFF_FIRST
        while True:
            inflight = self._inflight
            if inflight is not None and not inflight.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(inflight)
                continue
            if self._last_error is not None or self._token is None:
                delay = backoff
                backoff = min(backoff * 2, self.backoff_max)
            else:
                # never closer than MIN_INTERVAL, even for a token that came back nearly expired
                delay = max(self._refresh_due_in(), MIN_INTERVAL)
                backoff = BACKOFF_FIRST
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                    continue  # something changed (acquired, failed, suspect): recompute
            with contextlib.suppress(Exception):
                await asyncio.shield(self._kick())


_STATE_LEVELS = {
    "ok": logging.INFO,
    "degraded": logging.WARNING,
    "rejected": logging.WARNING,
    "refused": logging.ERROR,
}


def rejection_backoff(streak: int, first: float, cap: float) -> float:
    """The wait before fetching a token to follow the ``streak``-th rejected one in a row: none
    after the first (a 401 is usually a token revoked or expired early), then doubling."""
    if streak <= 1:
        return 0.0
    return min(first * 2.0 ** (streak - 2), cap)


def _consume(task: asyncio.Task[Token]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: the outcome is kept in TokenAuth's state


def token_audience(token: str) -> str | None:
    """The ``aud`` claim of a JWT, for display; None when the token is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        aud = json.loads(payload).get("aud")
    except (binascii.Error, ValueError, AttributeError):
        return None
    return str(aud) if aud is not None else None


def describe_credential_error(exc: BaseException) -> str:
    """A safe, short reason for an azure-identity failure: no secrets, no stack trace."""
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if "az login" in lowered:
        return "Azure CLI is not logged in: run 'az login'"
    if "azure cli not found" in lowered or "az: not found" in lowered:
        return "Azure CLI ('az') is not installed or not on PATH"
    name = type(exc).__name__
    first = text.split(" Content: ")[0].split(". ")[0][:200] if text else name
    return f"{name}: {first}"


# Failures that retrying cannot fix: a person must log in, install az, fix the tenant, the
# app registration, the secret or certificate, or grant a role. Matched against the reason
# describe_credential_error gives (Entra's AADSTS codes included).
_NEEDS_PERSON = (
    "az login",
    "not installed or not on path",
    "aadsts50020",  # user account from another tenant
    "aadsts50034",  # user account does not exist in that tenant
    "aadsts50076",  # MFA required
    "aadsts53003",  # blocked by conditional access
    "aadsts700016",  # application not found in the tenant
    "aadsts7000215",  # invalid client secret
    "aadsts7000222",  # client secret expired
    "aadsts700027",  # certificate assertion invalid
    "aadsts90002",  # tenant not found
    "aadsts900023",  # tenant id malformed
    "aadsts500011",  # resource (scope) not found in the tenant
    "aadsts65001",  # consent not granted
    "invalid_client",
    "unauthorized_client",
    "invalid_scope",
)


def needs_person(reason: str) -> bool:
    """Whether a credential failure needs a person rather than time."""
    lowered = reason.lower()
    return any(marker in lowered for marker in _NEEDS_PERSON)


def make_auth(config: UpstreamAuthConfig, **tuning: Any) -> UpstreamAuth:
    """The :class:`UpstreamAuth` for a config; credentials are only built inside the loop."""
    if config.type == "api_key":
        assert config.api_key is not None
        return ApiKeyAuth(config.api_key)
    factory = _factory(config)
    timeout = config.token_timeout
    if config.type == "azure_cli":
        # Let azure-identity's own process timeout fire first: it kills the hung az process,
        # which our cancellation would leave behind.
        timeout = cli_process_timeout(timeout) + 2.0
    return TokenAuth(config.type, factory, config.scope, timeout=timeout, **tuning)


def _factory(c: UpstreamAuthConfig) -> Callable[[], AsyncTokenCredential]:
    from azure.identity import aio

    # HTTP-based credentials fail fast (no azure-core retries): the refresher retries with
    # back-off itself, and a request waiting on a cold start should not wait through retries.
    http: dict[str, Any] = {"retry_total": 0}
    if c.authority_host:
        http["authority"] = c.authority_host
    kind = c.type

    def build() -> AsyncTokenCredential:
        if kind == "azure_ad":
            return aio.ClientSecretCredential(
                c.tenant_id or "", c.client_id or "", c.client_secret or "", **http
            )
        if kind == "azure_cli":
            return aio.AzureCliCredential(
                tenant_id=c.tenant_id or "", process_timeout=cli_process_timeout(c.token_timeout)
            )
        if kind == "azure_managed_identity":
            return aio.ManagedIdentityCredential(client_id=c.client_id, retry_total=0)
        if kind == "azure_workload_identity":
            kwargs: dict[str, Any] = dict(http)
            if c.tenant_id:
                kwargs["tenant_id"] = c.tenant_id
            if c.client_id:
                kwargs["client_id"] = c.client_id
            return aio.WorkloadIdentityCredential(**kwargs)
        if kind == "azure_certificate":
            password = c.certificate_password.encode() if c.certificate_password else None
            return aio.CertificateCredential(
                c.tenant_id or "", c.client_id or "", c.certificate_path, password=password, **http
            )
        if kind == "azure_default":
            if c.client_id:
                http["managed_identity_client_id"] = c.client_id
            return aio.DefaultAzureCredential(**http)
        raise ValueError(f"unknown upstream_auth.type {kind!r}")

    return build


def cli_process_timeout(token_timeout: float) -> int:
    """``az`` gets the whole timeout (whole seconds); azure-identity then kills it itself."""
    return max(1, int(token_timeout))
