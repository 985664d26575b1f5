"""Client JWTs from a local OIDC issuer: discovery and JWKS over HTTPS (trustme CA), keys made
with cryptography, tokens signed with PyJWT; the validator under test fetches with aiohttp."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from claude_proxy.client_auth import presented
from claude_proxy.config import ClientJwtConfig, Config, JwtPolicy, UpstreamAuthConfig
from claude_proxy.errors import Forbidden, Unauthorized
from claude_proxy.identity import (
    Authenticator,
    IssuerUnavailable,
    JwtValidator,
)

from ..conftest import SESSION_CA
from ..entra_fakes import server_ssl, start_app
from ..helpers import SECRETS

AUDIENCE = "api://claude-proxy"


class SigningKey:
    def __init__(self, kid: str, kind: str = "RSA") -> None:
        self.kid = kid
        if kind == "RSA":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg = "RS256"
            self.jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"
            self.jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk.update(kid=kid, use="sig")

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


class Issuer:
    """An Entra-like issuer: /<tenant>/v2.0/.well-known/openid-configuration and a JWKS."""

    def __init__(self) -> None:
        self.published = [SigningKey("key-1"), SigningKey("key-ec", "EC")]
        self.jwks_hits = 0
        self.discovery_hits = 0
        self.port = 0
        self.up = True

    def issuer(self, tenant: str = "tenant-1") -> str:
        return f"https://127.0.0.1:{self.port}/{tenant}/v2.0"

    async def discovery(self, request: web.Request) -> web.Response:
        self.discovery_hits += 1
        tenant = request.match_info["tenant"]
        return web.json_response(
            {
                "issuer": self.issuer(tenant),
                "jwks_uri": f"https://127.0.0.1:{self.port}/{tenant}/discovery/v2.0/keys",
            }
        )

    async def jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        if not self.up:
            return web.json_response({"error": "down"}, status=503)
        # an HMAC key in the set must never become a verification key
        keys = [k.jwk for k in self.published] + [{"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}]
        return web.json_response({"keys": keys})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self.jwks)
        return app

    def token(self, key: SigningKey | None = None, headers: Any = None, **claims: Any) -> str:
        key = key or self.published[0]
        now = int(time.time())
        body = {
            "iss": self.issuer(),
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "oid": "00000000-0000-0000-0000-00000000a11c",
            "preferred_username": "alice@contoso.example",
            "roles": ["claude-power-users"],
            "tid": "tenant-1",
        }
        body.update(claims)
        token = jwt.encode(
            {k: v for k, v in body.items() if v is not None},
            key.private,
            algorithm=key.alg,
            headers={"kid": key.kid, **(headers or {})},
        )
        SECRETS.add(token)  # the session's log scan fails the run if one is ever logged
        return token


class Mono:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    found = Issuer()
    runner, found.port = await start_app(found.app(), server_ssl(SESSION_CA))
    yield found
    await runner.cleanup()


POLICIES = (
    JwtPolicy(claim="roles", value="claude-power-users", name="power", requests_per_minute=60),
)


@pytest.fixture
async def validator(issuer: Issuer) -> AsyncIterator[tuple[JwtValidator, Mono]]:
    mono = Mono()
    config = ClientJwtConfig(issuer=issuer.issuer(), audience=AUDIENCE, policies=POLICIES)
    found = JwtValidator(config, monotonic=mono)
    yield found, mono
    await found.close()


Validator = tuple[JwtValidator, Mono]


async def test_a_valid_token_names_its_user_and_policy(
    issuer: Issuer, validator: Validator
) -> None:
    v, _ = validator
    token = issuer.token()
    assert v.validate_now(token) is None  # keys not at hand yet: the caller awaits
    who = await v.validate(token)
    assert (who.kind, who.id, who.name, who.label) == (
        "user",
        "00000000-0000-0000-0000-00000000a11c",
        "alice@contoso.example",
        "jwt:power",
    )
    assert v.validate_now(issuer.token(roles=["x"])) is not None  # now synchronous
    assert issuer.discovery_hits == 1 and issuer.jwks_hits == 1
    es = await v.validate(issuer.token(issuer.published[1]))
    assert es.id == who.id


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 3600}, "The token expired at"),
        ({"nbf": int(time.time()) + 3600}, "not valid before"),
        ({"aud": "api://someone-else"}, "audience 'api://someone-else'"),
        ({"iss": "https://elsewhere.example/tenant-1/v2.0"}, "was issued by"),
        ({"exp": None}, "no 'exp' claim"),
        ({"oid": None}, "no 'oid' claim"),
    ],
)
async def test_a_bad_token_says_what_is_wrong(
    issuer: Issuer, validator: Validator, claims: dict[str, Any], message: str
) -> None:
    v, _ = validator
    await v.refresh()
    with pytest.raises(Unauthorized, match=message):
        await v.validate(issuer.token(**claims))


async def test_small_clock_skew_is_allowed(issuer: Issuer, validator: Validator) -> None:
    v, _ = validator
    await v.refresh()
    now = int(time.time())
    assert await v.validate(issuer.token(exp=now - 20, nbf=now + 20))


async def test_a_token_for_another_tenant_is_refused(issuer: Issuer, validator: Validator) -> None:
    """Entra signs every tenant's tokens with the same keys: only iss tells them apart."""
    v, _ = validator
    await v.refresh()
    other = issuer.token(iss=issuer.issuer("tenant-2"), tid="tenant-2")
    with pytest.raises(Unauthorized, match=r"tenant-2.*another tenant"):
        await v.validate(other)


async def test_unknown_kid_then_rotation(issuer: Issuer, validator: Validator) -> None:
    v, mono = validator
    await v.validate(issuer.token())
    fetches = issuer.jwks_hits
    rotated = SigningKey("key-2")
    token = issuer.token(rotated)
    # not published yet: refetched once, then refused without another fetch for 30 s
    mono.now += 31
    with pytest.raises(Unauthorized, match="key 'key-2', which the issuer does not publish"):
        await v.validate(token)
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await v.validate(token)
    assert issuer.jwks_hits == fetches + 1
    issuer.published = [rotated]  # the issuer rotates
    mono.now += 29
    with pytest.raises(Unauthorized):
        v.validate_now(token)  # still within the cooldown
    mono.now += 1
    assert v.validate_now(token) is None
    assert (await v.validate(token)).id
    assert issuer.jwks_hits == fetches + 2
    with pytest.raises(Unauthorized, match="key 'key-1'"):
        v.validate_now(issuer.token(SigningKey("key-1")))  # withdrawn key, same kid


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _forge(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


async def test_alg_none_is_refused(issuer: Issuer, validator: Validator) -> None:
    v, _ = validator
    await v.refresh()
    claims = jwt.decode(issuer.token(), options={"verify_signature": False})
    token = _forge({"alg": "none", "kid": "key-1"}, claims, lambda _: b"")
    with pytest.raises(Unauthorized, match="algorithm 'none' is not accepted"):
        await v.validate(token)


async def test_hs256_signed_with_the_public_key_is_refused(
    issuer: Issuer, validator: Validator
) -> None:
    """The classic confusion: HMAC keyed with the RSA public key that anyone can fetch."""
    v, _ = validator
    await v.refresh()
    claims = jwt.decode(issuer.token(), options={"verify_signature": False})
    pem = issuer.published[0].public_pem()
    for kid in ("key-1", "hmac"):
        token = _forge(
            {"alg": "HS256", "kid": kid},
            claims,
            lambda data: hmac.new(pem, data, hashlib.sha256).digest(),
        )
        with pytest.raises(Unauthorized, match="algorithm 'HS256' is not accepted"):
            await v.validate(token)


async def test_an_algorithm_that_does_not_fit_the_key_is_refused(
    issuer: Issuer, validator: Validator
) -> None:
    v, _ = validator
    await v.refresh()
    ec_key = issuer.published[1]
    rsa_signed = issuer.token(issuer.published[0], headers={"kid": ec_key.kid})
    with pytest.raises(Unauthorized, match="does not fit the issuer's key 'key-ec'"):
        await v.validate(rsa_signed)
    forged = issuer.token(SigningKey("key-1"))  # right kid, another private key
    with pytest.raises(Unauthorized, match="signature does not verify"):
        await v.validate(forged)


async def test_no_keys_at_hand_is_503_not_401(issuer: Issuer, validator: Validator) -> None:
    v, mono = validator
    issuer.up = False
    with pytest.raises(IssuerUnavailable) as info:
        await v.validate(issuer.token())
    assert info.value.status == 503 and info.value.should_retry
    with pytest.raises(IssuerUnavailable):
        v.validate_now(issuer.token())  # within the cold retry pace: no fetch
    assert issuer.jwks_hits == 1
    issuer.up = True
    mono.now += 5
    assert await v.validate(issuer.token())


async def test_a_discovery_document_for_another_issuer_is_refused(issuer: Issuer) -> None:
    config = ClientJwtConfig(
        issuer=f"https://127.0.0.1:{issuer.port}/tenant-1/v2.0/", audience=AUDIENCE
    )
    wrong = ClientJwtConfig(issuer=issuer.issuer() + "x", audience=AUDIENCE)
    ok, bad = JwtValidator(config), JwtValidator(wrong)
    try:
        await ok.refresh()  # a trailing slash is the same issuer
        assert ok.jwks_uri is not None
        await bad.refresh()
        assert bad.jwks_uri is None and issuer.jwks_hits == 1
    finally:
        await ok.close()
        await bad.close()


async def test_authenticator_takes_tokens_in_either_header(issuer: Issuer) -> None:
    jwt_config = ClientJwtConfig(
        issuer=issuer.issuer(), audience=AUDIENCE, policies=POLICIES, require_policy=True
    )
    config = Config(
        upstream_url="http://127.0.0.1:9",
        upstream_auth=UpstreamAuthConfig(type="api_key", api_key="u"),
        client_jwt=jwt_config,
    )
    validator = JwtValidator(jwt_config)
    auth = Authenticator(config, validator)
    try:
        token = issuer.token().encode()
        bearer = presented([(b"authorization", b"Bearer " + token)])
        assert auth.identify_now(bearer) is None
        who = await auth.identify(bearer)
        assert who.rules is not None and who.rules.settings.requests_per_minute == 60
        assert auth.identify_now(presented([(b"x-api-key", token)])) == who
        with pytest.raises(Forbidden):
            auth.identify_now(presented([(b"x-api-key", issuer.token(roles=None).encode())]))
        with pytest.raises(Unauthorized, match="Invalid API key"):
            auth.identify_now(presented([(b"x-api-key", b"not-a-token")]))
    finally:
        await validator.close()


async def test_a_verified_token_is_remembered_until_its_key_is_withdrawn(
    issuer: Issuer, validator: Validator
) -> None:
    v, mono = validator
    token = issuer.token()
    who = await v.validate(token)
    assert v.validate_now(token) is who  # from the cache: no second signature check
    issuer.published = [SigningKey("key-2")]
    mono.now += 31
    await v.refresh()
    with pytest.raises(Unauthorized, match="key 'key-1', which the issuer does not publish"):
        v.validate_now(token)
