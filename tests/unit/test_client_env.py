"""Client settings rendering and settings.json merging (pure)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import tomllib

import pytest

from claude_proxy import client_env
from claude_proxy.client_env import base_url, is_foundry, merge_settings, render
from claude_proxy.config import Config, TlsConfig, UpstreamAuthConfig

AUTH = UpstreamAuthConfig(type="azure_cli")
FOUNDRY = "https://res.services.ai.azure.com"


def config(upstream: str = FOUNDRY, **changes: object) -> Config:
    return dataclasses.replace(Config(upstream_url=upstream, upstream_auth=AUTH), **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "foundry"),
    [
        ("https://res.services.ai.azure.com", True),
        ("https://res.openai.azure.com/", True),
        ("https://RES.cognitiveservices.azure.com", True),
        ("https://res.services.ai.azure.com/anthropic", False),  # the prefix chose a vendor
        ("https://api.anthropic.com", False),
        ("https://evil-services.ai.azure.com.example.org", False),
        ("http://127.0.0.1:9000", False),
    ],
)
def test_is_foundry(url: str, foundry: bool) -> None:
    assert is_foundry(url) is foundry


@pytest.mark.parametrize(
    ("changes", "override", "expected"),
    [
        ({}, None, "http://127.0.0.1:8080"),
        ({"bind_address": "0.0.0.0", "port": 9000}, None, "http://127.0.0.1:9000"),
        ({"bind_address": "::"}, None, "http://localhost:8080"),
        ({"bind_address": "::1"}, None, "http://[::1]:8080"),
        ({"bind_address": "10.1.2.3"}, None, "http://10.1.2.3:8080"),
        (
            {"tls": TlsConfig(mode="manual", cert_path="c", key_path="k", https_port=8443)},
            None,
            "https://127.0.0.1:8443",
        ),
        ({}, "https://llm.example.com/", "https://llm.example.com"),
        ({"port": 0}, "http://lb:80", "http://lb:80"),
    ],
)
def test_base_url(changes: dict[str, object], override: str | None, expected: str) -> None:
    assert base_url(config(**changes), override) == expected


def test_base_url_port_zero_needs_url() -> None:
    with pytest.raises(ValueError, match="--url"):
        base_url(config(port=0))


@pytest.mark.parametrize(
    ("upstream", "anthropic", "openai"),
    [
        (FOUNDRY, "http://p:1/anthropic", "http://p:1/openai/v1"),
        ("https://api.anthropic.com", "http://p:1", "http://p:1/v1"),
    ],
)
@pytest.mark.parametrize("key", [client_env.PLACEHOLDER, "sk-proxy-123"])
def test_every_target_parses_and_points_at_the_proxy(
    upstream: str, anthropic: str, openai: str, key: str
) -> None:
    cfg = config(upstream)
    base = "http://p:1"
    env = json.loads(render("claude-code", cfg, base, key))["env"]
    assert env == {"ANTHROPIC_BASE_URL": anthropic, "ANTHROPIC_AUTH_TOKEN": key}

    env = json.loads(render("claude-code-foundry", cfg, base, key))["env"]
    assert env == {
        "CLAUDE_CODE_USE_FOUNDRY": "1",
        "ANTHROPIC_FOUNDRY_BASE_URL": anthropic,
        "ANTHROPIC_FOUNDRY_API_KEY": key,
    }

    codex = tomllib.loads(render("codex", cfg, base, key))
    provider = codex["model_providers"][codex["model_provider"]]
    assert provider["base_url"] == openai
    assert provider["wire_api"] == "responses"
    assert provider["experimental_bearer_token"] == key

    exports = {}
    for line in render("shell", cfg, base, key).splitlines():
        word, assignment = shlex.split(line)
        assert word == "export"
        name, _, value = assignment.partition("=")
        exports[name] = value
    assert exports == {
        "ANTHROPIC_BASE_URL": anthropic,
        "ANTHROPIC_API_KEY": key,
        "OPENAI_BASE_URL": openai,
        "OPENAI_API_KEY": key,
    }


def test_shell_quotes_a_hostile_key() -> None:
    text = render("shell", config(), "http://p:1", "a'b; rm -rf ~")
    assert shlex.split(text.splitlines()[1]) == ["export", "ANTHROPIC_API_KEY=a'b; rm -rf ~"]


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, {"env": {"A": "1"}}),
        ("", {"env": {"A": "1"}}),
        (
            '{"model": "opus", "env": {"KEEP": "x", "A": "old", "DROP": "1"}, "hooks": {}}',
            {"model": "opus", "env": {"KEEP": "x", "A": "1"}, "hooks": {}},
        ),
        ('{"permissions": {"allow": []}}', {"permissions": {"allow": []}, "env": {"A": "1"}}),
    ],
)
def test_merge_settings_keeps_other_keys(existing: str | None, expected: object) -> None:
    text, removed = merge_settings(existing, {"A": "1"}, remove=("DROP",))
    assert json.loads(text) == expected
    assert removed == (["DROP"] if existing and "DROP" in existing else [])


@pytest.mark.parametrize(
    "existing", ["{not json", "[]", '"text"', '{"env": ["A"]}', '{"env": "A=1"}']
)
def test_merge_settings_refuses_what_it_cannot_read(existing: str) -> None:
    with pytest.raises(client_env.SettingsError, match="fix or move it first"):
        merge_settings(existing, {"A": "1"})
