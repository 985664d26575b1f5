"""Who a request is: a configured key, an Entra ID (OIDC) user with a bearer token, or nobody.

JWTs are validated here, locally, with PyJWT: the signature against the issuer's JWKS, ``iss``,
``aud``, ``exp`` and ``nbf`` (with a small leeway), and an algorithm that must fit the key
(RSA or EC; ``none`` and HMAC are refused before PyJWT sees the token). The JWKS is fetched
with aiohttp, never on the request path when it is at hand: :meth:`Authenticator.identify_now`
answers synchronously, or returns None when the signing key must be fetched first (cold start,
an unknown ``kid`` at most every 30 s, or a set older than an hour); then the caller awaits
:meth:`Authenticator.identify`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiohttp
import jwt

from .client_auth import OPEN, PASSTHROUGH, KeyRing, Presented
from .config import ClientJwtConfig, Config, JwtPolicy
from .errors import Forbidden, ProxyError, Unauthorized
from .limits import Clock, Rules

logger = logging.getLogger(__name__)

REFRESH_COOLDOWN: Final = 30.0  # an unknown kid refetches the JWKS at most this often
COLD_RETRY: Final = 5.0  # with no keys at all, a failed fetch is retried after this
LIFESPAN: Final = 3600.0  # a key set older than this is refetched (a key withdrawn goes)
MAX_VERIFIED: Final = 10000  # verified tokens remembered (by digest) until they expire
MAX_DOCUMENT: Final = 1 << 20  # discovery and JWKS documents larger than this are refused
ASYMMETRIC: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
_JWT_SHAPE = re.compile(rb"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")


class IssuerUnavailable(ProxyError):
    """503: the issuer's signing keys cannot be fetched, so no token can be checked."""

    status = 503
    openai_code = "issuer_unavailable"
    should_retry = True
    retry_after = int(COLD_RETRY)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent a request.

    ``id``: what limits and /usage count by (a key's name, a user's ``identity_claim``);
    ``label``: bounded, for metrics and ``ExchangeRecord.client_key`` (a key's name, or
    ``jwt:<policy>``); ``name``: for the access log (a user's ``name_claim``).
    """

    kind: Literal["key", "user", "open", "passthrough"]
    id: str
    label: str
    name: str | None = None
    rules: Rules | None = None

    @property
    def passthrough(self) -> bool:
        """Relayed untouched, without the upstream credential."""
        return self.kind == "passthrough"

    @property
    def limit_kind(self) -> Literal["key", "user"]:
        return "user" if self.kind == "user" else "key"


OPEN_IDENTITY: Final = Identity("open", OPEN, OPEN)
PASSTHROUGH_IDENTITY: Final = Identity("passthrough", PASSTHROUGH, PASSTHROUGH)


# --------------------------------------------------------------------------- pure parts


def looks_like_jwt(token: bytes) -> bool:
    """A compact JWS (three base64url parts, a JSON header); static keys never look like one."""
    return _JWT_SHAPE.match(token) is not None


def claim_matches(value: object, wanted: str) -> bool:
    """A list claim matches when it contains ``wanted``; a string when it equals it."""
    if isinstance(value, list):
        return wanted in value
    return isinstance(value, str) and value == wanted


def match_policy(claims: Mapping[str, Any], policies: Sequence[JwtPolicy]) -> JwtPolicy | None:
    """The first policy whose claim matches, or None."""
    for policy in policies:
        if claim_matches(claims.get(policy.claim), policy.value):
            return policy
    return None


def user_identity(claims: Mapping[str, Any], config: ClientJwtConfig) -> Identity:
    """The identity of a verified token's claims, with the policy that applies."""
    subject = claims.get(config.identity_claim)
    if not isinstance(subject, str) or not subject:
        raise Unauthorized(
            f"The token has no {config.identity_claim!r} claim, which this proxy counts users "
            f"by (client_jwt.identity_claim)."
        )
    name = claims.get(config.name_claim)
    policy = match_policy(claims, config.policies)
    if policy is None and config.require_policy:
        raise Forbidden(
            "You are signed in, but no policy of this proxy admits you; ask its operator to "
            "add you to a group or role it knows."
        )
    return Identity(
        "user",
        subject,
        f"jwt:{policy.label}" if policy else "jwt",
        name if isinstance(name, str) else subject,
        Rules.of_policy(policy) if policy else None,
    )


def _when(at: object) -> str:
    if not isinstance(at, int | float):
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def explain(exc: jwt.PyJWTError, token: str, config: ClientJwtConfig) -> Unauthorized:
    """A message that says what is wrong with a token (its claims are read unverified, only
    to say so; the token itself never goes into a message)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = {}
    if isinstance(exc, jwt.ExpiredSignatureError):
        return Unauthorized(f"The token expired at {_when(claims.get('exp'))}; get a new one.")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return Unauthorized(f"The token is not valid before {_when(claims.get('nbf'))}.")
    if isinstance(exc, jwt.InvalidAudienceError):
        return Unauthorized(
            f"The token is for audience {claims.get('aud')!r}; this proxy accepts "
            f"{config.audience!r} (ask for a token with --resource {config.audience})."
        )
    if isinstance(exc, jwt.InvalidIssuerError):
        return Unauthorized(
            f"The token was issued by {claims.get('iss')!r}, not {config.issuer!r} "
            f"(another tenant?)."
        )
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return Unauthorized(f"The token has no {exc.claim!r} claim.")
    if isinstance(exc, jwt.InvalidSignatureError):
        return Unauthorized("The token's signature does not verify against the issuer's keys.")
    return Unauthorized(f"The token cannot be used: {exc}.")


# --------------------------------------------------------------------------- JWKS and tokens


class JwtValidator:
    """Validates bearer tokens from one issuer; caches its JWKS, fetched with aiohttp."""

    def __init__(
        self,
        config: ClientJwtConfig,
        *,
        monotonic: Clock = time.monotonic,
    ) -> None:
        """``monotonic`` paces fetches (injectable for tests); ``exp`` and ``nbf`` are checked
        by PyJWT against the wall clock."""
        self.config = config
        self.monotonic = monotonic
        self.jwks_uri = config.jwks_uri
        self.fetches = 0  # JWKS fetches made (successful or not), for tests and metrics
        self._keys: dict[str, jwt.PyJWK] = {}
        # sha256(token) -> (identity, exp): a signature is checked once per token, not per
        # request (an RS256 check costs about 150 us; Claude Code sends one token for an hour)
        self._verified: dict[bytes, tuple[Identity, float]] = {}
        self._loaded_at = -math.inf  # last successful fetch
        self._tried_at = -math.inf  # last attempt
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    def _may_fetch(self) -> bool:
        wait = REFRESH_COOLDOWN if self._keys else COLD_RETRY
        return self.monotonic() - self._tried_at >= wait

    def _stale(self) -> bool:
        return self.monotonic() - self._loaded_at > LIFESPAN and self._may_fetch()

    def validate_now(self, token: str) -> Identity | None:
        """The token's identity, or None when the signing key must be fetched first.

        Raises :class:`Unauthorized` saying what is wrong (or :class:`Forbidden`).
        """
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._verified.get(digest)
        if hit is not None:
            if time.time() < hit[1] + self.config.leeway:
                return hit[0]
            del self._verified[digest]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("The bearer token is not a well-formed JWT.") from None
        alg = header.get("alg")
        if alg not in ASYMMETRIC:
            raise Unauthorized(
                f"Token algorithm {alg!r} is not accepted; the issuer's tokens are signed "
                f"with RS256 or ES256."
            )
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None or self._stale():
            if self._may_fetch() or self._lock.locked():
                return None  # a fetch may (or is about to) bring it: the caller awaits
            if key is None:
                if not self._keys:
                    raise IssuerUnavailable(
                        "The proxy cannot fetch its token issuer's signing keys yet."
                    )
                raise Unauthorized(
                    f"The token is signed with key {kid!r}, which the issuer does not publish."
                )
        identity, exp = self._decode(token, key, alg)
        if len(self._verified) >= MAX_VERIFIED:
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = (identity, exp)
        return identity

    async def validate(self, token: str) -> Identity:
        """:meth:`validate_now`, fetching the issuer's keys first when it must."""
        found = self.validate_now(token)
        if found is not None:
            return found
        await self.refresh()
        found = self.validate_now(token)
        if found is None:  # only when a refresh left nothing and it may be tried again
            raise IssuerUnavailable("The proxy cannot fetch its token issuer's signing keys.")
        return found

    def _decode(self, token: str, key: jwt.PyJWK, alg: str) -> tuple[Identity, float]:
        if key.algorithm_name not in ASYMMETRIC or alg != key.algorithm_name:
            raise Unauthorized(
                f"Token algorithm {alg!r} does not fit the issuer's key {key.key_id!r} "
                f"({key.algorithm_name})."
            )
        config = self.config
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise explain(exc, token, config) from None
        return user_identity(claims, config), float(claims["exp"])

    async def refresh(self) -> None:
        """Fetch the JWKS (discovering its URI first if not configured); one fetch at a time,
        and not again within the cooldown. A failure keeps the keys at hand and is logged."""
        async with self._lock:
            if not self._may_fetch():
                return
            self._tried_at = self.monotonic()
            self.fetches += 1
            try:
                async with asyncio.timeout(self.config.fetch_timeout):
                    keys = await self._fetch_keys()
            except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
                logger.warning(
                    "client_jwt: cannot fetch the signing keys of %s: %s",
                    self.config.issuer,
                    _describe(exc),
                )
                return
            added = sorted(set(keys) - set(self._keys))
            if set(keys) != set(self._keys):
                self._verified.clear()  # a withdrawn key's tokens are checked again
            self._keys = keys
            self._loaded_at = self.monotonic()
            logger.info("client_jwt: %d signing key(s) at hand, new: %s", len(keys), added)

    async def _fetch_keys(self) -> dict[str, jwt.PyJWK]:
        if self.jwks_uri is None:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = await self._get_json(url)
            issuer, jwks_uri = doc.get("issuer"), doc.get("jwks_uri")
            if not isinstance(issuer, str) or issuer.rstrip("/") != self.config.issuer.rstrip("/"):
                raise ValueError(f"the discovery document names issuer {issuer!r}")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
                raise ValueError(f"the discovery document has no https jwks_uri ({jwks_uri!r})")
            self.jwks_uri = jwks_uri
        keyset = jwt.PyJWKSet.from_dict(await self._get_json(self.jwks_uri))
        return {
            k.key_id: k
            for k in keyset.keys
            if k.key_id and k.public_key_use in ("sig", None) and k.algorithm_name in ASYMMETRIC
        }

    async def _get_json(self, url: str) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"GET {url} answered {response.status}")
            body = await response.content.read(MAX_DOCUMENT + 1)
            if len(body) > MAX_DOCUMENT:
                raise ValueError(f"GET {url}: document larger than {MAX_DOCUMENT} bytes")
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError(f"GET {url}: not a JSON object")
        return doc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------- keys and tokens


class Authenticator:
    """Static keys (plain or hashed) and, with ``[client_jwt]``, bearer tokens: one answer."""

    def __init__(self, config: Config, validator: JwtValidator | None = None) -> None:
        keys = config.client_keys()
        self.ring = KeyRing(keys)
        self.rules = {k.name: Rules.of_key(k) for k in keys}
        # one Identity per key, made once: the request path only looks it up
        self._keys = {
            k.name: Identity("key", k.name, k.name, k.name, self.rules[k.name]) for k in keys
        }
        self.passthrough = config.passthrough_unauthenticated
        self.validator = validator

    def identify_now(self, creds: Presented) -> Identity | None:
        """The request's identity, or None when a token's signing key must be fetched: then
        await :meth:`identify`. Raises :class:`Unauthorized` or :class:`Forbidden`.

        No keys and no JWT issuer configured: everyone is ``open``. Nothing presented:
        passthrough, unless turned off. A presented key that matches: that key. Else a
        JWT-shaped bearer token is validated; anything else is refused.
        """
        if not self.ring and self.validator is None:
            return OPEN_IDENTITY
        if not creds.headers:
            if self.passthrough:
                return PASSTHROUGH_IDENTITY
            raise Unauthorized(
                "No API key presented. Send your proxy key or token in x-api-key or Authorization."
            )
        for key in creds.keys:
            name = self.ring.match(key)
            if name is not None:
                return self._keys[name]
        token = self._token(creds)
        if token is None:
            raise Unauthorized("Invalid API key for this proxy.")
        assert self.validator is not None
        return self.validator.validate_now(token)

    async def identify(self, creds: Presented) -> Identity:
        found = self.identify_now(creds)
        if found is not None:
            return found
        token = self._token(creds)
        assert token is not None and self.validator is not None
        return await self.validator.validate(token)

    def _token(self, creds: Presented) -> str | None:
        if self.validator is None:
            return None
        for key in creds.keys:
            if looks_like_jwt(key):
                return key.decode("ascii")
        return None
