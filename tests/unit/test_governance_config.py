"""Hashed keys, policies by claim, and the config of identities and limits; all without I/O."""

from __future__ import annotations

import datetime
import hashlib
import io
from pathlib import Path
from typing import Any

import pytest

from claude_proxy.cli import hash_key_command
from claude_proxy.client_auth import KeyRing, hash_key, presented
from claude_proxy.config import ClientJwtConfig, ClientKey, Config, JwtPolicy, load_config
from claude_proxy.errors import ConfigError, Forbidden, Unauthorized
from claude_proxy.identity import (
    Authenticator,
    claim_matches,
    looks_like_jwt,
    match_policy,
    user_identity,
)

BASIC = 'upstream_url = "https://x.services.ai.azure.com"\nupstream_auth = { type = "azure_cli" }\n'
DIGEST = hashlib.sha256(b"team-a-secret").hexdigest()


def load(text: str, tmp_path: Path) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(BASIC + text)
    return load_config(str(path), env={}).config


def test_hash_key_command_prints_the_digest_of_the_line_on_stdin() -> None:
    out = io.StringIO()
    assert hash_key_command(io.StringIO("team-a-secret\n"), out) == 0
    assert out.getvalue() == DIGEST + "\n"
    assert hash_key("team-a-secret") == DIGEST
    assert hash_key_command(io.StringIO(""), io.StringIO()) == 2


def test_a_hashed_key_matches_the_key_and_holds_no_secret(tmp_path: Path) -> None:
    config = load(
        f'[[client_api_keys]]\nname = "team-a"\nkey_sha256 = "{DIGEST.upper()}"\n'
        '[[client_api_keys]]\nname = "plain"\nkey = "plain-secret"\n',
        tmp_path,
    )
    ring = KeyRing(config.client_keys())
    assert ring.match(b"team-a-secret") == "team-a"
    assert ring.match(b"plain-secret") == "plain"
    assert ring.match(DIGEST.encode()) is None  # the digest itself is not a key
    assert "team-a-secret" not in repr(config)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[[client_api_keys]]\nname = "a"\n', r"client_api_keys\[0\]\.key: required; or key_sha"),
        (
            '[[client_api_keys]]\nname = "a"\nkey = "k"\nkey_sha256 = "' + DIGEST + '"\n',
            r"client_api_keys\[0\]: give key or key_sha256, not both",
        ),
        (
            '[[client_api_keys]]\nname = "a"\nkey_sha256 = "abc"\n',
            r"client_api_keys\[0\]\.key_sha256: expected 64 hex digits",
        ),
        (
            f'[[client_api_keys]]\nname = "a"\nkey_sha256 = "{DIGEST}"\n'
            '[[client_api_keys]]\nname = "b"\nkey = "team-a-secret"\n',
            "the same key appears twice",
        ),
        (
            '[[client_api_keys]]\nname = "a"\nkey = "k"\nrequests_per_minute = 0\n',
            r"client_api_keys\[0\]\.requests_per_minute: must be at least 1",
        ),
        (
            '[[client_api_keys]]\nname = "a"\nkey = "k"\nexpires = "2027-06-30"\n',
            r"client_api_keys\[0\]\.expires: expected a TOML date",
        ),
        (
            '[[client_api_keys]]\nname = "a"\nkey = "k"\nexpires = 2027-06-30T10:00:00\n',
            r"client_api_keys\[0\]\.expires: expected a TOML date",
        ),
        (
            '[[client_api_keys]]\nname = "a"\nkey = "k"\nrpm = 5\n',
            r"client_api_keys\[0\]\.rpm: unknown key",
        ),
        (
            '[client_jwt]\nissuer = "http://login.example/t/v2.0"\naudience = "api://p"\n',
            r"client_jwt\.issuer: expected an https:// URL",
        ),
        ('[client_jwt]\nissuer = "https://login.example/t/v2.0"\n', "client_jwt.audience: requ"),
        (
            '[client_jwt]\nissuer = "https://i.example"\naudience = "a"\n'
            '[[client_jwt.policies]]\nclaim = "roles"\nvalue = "x"\nmax_tokens = 1\n',
            r"client_jwt\.policies\[0\]\.max_tokens: unknown key",
        ),
        (
            '[client_jwt]\nissuer = "https://i.example"\naudience = "a"\n'
            '[[client_jwt.policies]]\nclaim = "roles"\nvalue = "x"\n'
            '[[client_jwt.policies]]\nclaim = "roles"\nvalue = "x"\n',
            r"client_jwt\.policies\[1\]\.name: duplicate policy name 'roles=x'",
        ),
        ('[limits]\non_redis_error = "block"\n', "limits.on_redis_error: expected one of allow"),
        ('[limits]\nredis_url = "http://r:6379"\n', "limits.redis_url: expected redis://"),
        ("[limits]\nredis_timeout = 0\n", "limits.redis_timeout: expected more than 0"),
    ],
)
def test_bad_governance_config_names_the_key(text: str, error: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=error):
        load(text, tmp_path)


def test_counted_limits_with_several_workers_need_redis(tmp_path: Path) -> None:
    key = '[[client_api_keys]]\nname = "team-a"\nkey = "k"\ntokens_per_day = 5\n'
    with pytest.raises(ConfigError, match=r"limits\.redis_url: required with workers = 4") as e:
        load("workers = 4\n" + key, tmp_path)
    assert "client_api_keys[0] (team-a)" in str(e.value) and "4 times the limit" in str(e.value)
    load("workers = 4\n" + key + '[limits]\nredis_url = "redis://127.0.0.1:6379/0"\n', tmp_path)
    # models and expiry need no counts: several workers without Redis are fine
    load(
        'workers = 4\n[[client_api_keys]]\nname = "a"\nkey = "k"\nallowed_models = ["c*"]\n',
        tmp_path,
    )


def test_the_issue_example_loads(tmp_path: Path) -> None:
    config = load(
        f"""
[[client_api_keys]]
name = "team-a"
key_sha256 = "{DIGEST}"
requests_per_minute = 120
tokens_per_minute = 400000
tokens_per_day = 20000000
max_concurrent = 20
allowed_models = ["claude-sonnet-*", "gpt-5*"]
expires = 2027-06-30

[client_jwt]
issuer = "https://login.microsoftonline.com/tid/v2.0"
audience = "api://claude-proxy"

[[client_jwt.policies]]
claim = "roles"
value = "claude-power-users"
requests_per_minute = 60
tokens_per_day = 5000000
allowed_models = ["claude-*"]

[limits]
redis_url = "redis://:pw@127.0.0.1:6379/0"
""",
        tmp_path,
    )
    key = config.client_api_keys[0]
    assert key.expires == datetime.date(2027, 6, 30) and key.max_concurrent == 20
    assert config.client_jwt is not None and config.client_jwt.identity_claim == "oid"
    assert config.client_jwt.policies[0].label == "roles=claude-power-users"
    assert "pw" not in repr(config.limits)


@pytest.mark.parametrize(
    ("value", "wanted", "matches"),
    [
        (["a", "claude-power-users"], "claude-power-users", True),
        (["a"], "claude-power-users", False),
        ("claude-power-users", "claude-power-users", True),
        ("claude-power-users-2", "claude-power-users", False),
        (None, "x", False),
        (7, "7", False),
        ({"x": 1}, "x", False),
    ],
)
def test_claim_matches(value: Any, wanted: str, matches: bool) -> None:
    assert claim_matches(value, wanted) is matches


POLICIES = (
    JwtPolicy(claim="roles", value="power", name="power", requests_per_minute=60),
    JwtPolicy(claim="groups", value="g-1", tokens_per_day=10),
    JwtPolicy(claim="tid", value="t-1"),
)


@pytest.mark.parametrize(
    ("claims", "label"),
    [
        ({"roles": ["power"], "groups": ["g-1"]}, "power"),  # first match wins
        ({"groups": ["g-1", "g-2"]}, "groups=g-1"),
        ({"tid": "t-1"}, "tid=t-1"),
        ({"roles": "other"}, None),
        ({}, None),
    ],
)
def test_match_policy_first_match_wins(claims: dict[str, Any], label: str | None) -> None:
    policy = match_policy(claims, POLICIES)
    assert (policy.label if policy else None) == label


JWT = ClientJwtConfig(issuer="https://i.example/t", audience="api://p", policies=POLICIES)


def test_user_identity_counts_by_identity_claim_and_shows_the_name() -> None:
    who = user_identity({"oid": "o-1", "preferred_username": "al@x", "roles": ["power"]}, JWT)
    assert (who.kind, who.id, who.label, who.name) == ("user", "o-1", "jwt:power", "al@x")
    assert who.rules is not None and who.rules.settings.requests_per_minute == 60
    nobody = user_identity({"oid": "o-2"}, JWT)
    assert nobody.label == "jwt" and nobody.rules is None and nobody.name == "o-2"
    with pytest.raises(Unauthorized, match="no 'oid' claim"):
        user_identity({"sub": "s"}, JWT)


def test_require_policy_refuses_a_user_no_policy_admits() -> None:
    strict = ClientJwtConfig(issuer=JWT.issuer, audience=JWT.audience, require_policy=True)
    with pytest.raises(Forbidden) as info:
        user_identity({"oid": "o-1"}, strict)
    assert info.value.status == 403 and not info.value.should_retry


@pytest.mark.parametrize(
    ("token", "shaped"),
    [
        (b"eyJhbGciOiJSUzI1NiJ9.eyJhIjoxfQ.c2ln", True),
        (b"eyJhbGciOiJub25lIn0.eyJhIjoxfQ.", True),  # unsigned: shaped, refused later
        (b"sk-proxy-key-0123456789", False),
        (b"a.b.c", False),
        (b"eyJ.eyJ.c2ln.more", False),
    ],
)
def test_looks_like_jwt(token: bytes, shaped: bool) -> None:
    assert looks_like_jwt(token) is shaped


def test_authenticator_keys_before_tokens() -> None:
    config = Config(
        upstream_url="http://127.0.0.1:9",
        upstream_auth=_auth(),
        client_api_keys=(ClientKey(name="team-a", key_sha256=DIGEST, requests_per_minute=5),),
    )
    auth = Authenticator(config)
    who = auth.identify_now(presented([(b"x-api-key", b"team-a-secret")]))
    assert who is not None and who.label == "team-a" and who.rules is not None
    assert auth.identify_now(presented([])) is not None
    assert auth.identify_now(presented([])).passthrough  # type: ignore[union-attr]
    with pytest.raises(Unauthorized, match="Invalid API key"):
        auth.identify_now(presented([(b"authorization", b"Bearer eyJhbGciOiJub25lIn0.e30.")]))


def _auth() -> Any:
    from claude_proxy.config import UpstreamAuthConfig

    return UpstreamAuthConfig(type="api_key", api_key="u")


def test_main_runs_hash_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from claude_proxy.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("team-a-secret\r\n"))
    assert main(["hash-key"]) == 0
    assert capsys.readouterr().out == DIGEST + "\n"
