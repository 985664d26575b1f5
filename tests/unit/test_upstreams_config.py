"""The config of several upstreams, routes and failover: each mistake names its dotted key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from claude_proxy.config import (
    Config,
    FailoverConfig,
    RouteConfig,
    UpstreamAuthConfig,
    UpstreamConfig,
    load_config,
    parse,
    walk_secrets,
)
from claude_proxy.errors import ConfigError

TOP_AUTH = {"type": "api_key", "api_key": "top-level-secret"}
OWN_AUTH = {"type": "api_key", "api_key": "own-secret"}


def upstream(name: str = "a", **more: Any) -> dict[str, Any]:
    return {"name": name, "url": f"https://{name}.services.ai.azure.com", **more}


def several(*upstreams: dict[str, Any], **more: Any) -> dict[str, Any]:
    """Raw [[upstreams]] as TOML gives them, with a top-level [upstream_auth] unless replaced."""
    raw: dict[str, Any] = {
        "upstream_auth": TOP_AUTH,
        "upstreams": list(upstreams or (upstream("a"), upstream("b"))),
    }
    raw.update(more)
    return {k: v for k, v in raw.items() if v is not None}


SINGLE = {"upstream_url": "https://one.services.ai.azure.com", "upstream_auth": TOP_AUTH}


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw)
    return str(info.value)


# ----------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        # one form or the other
        ({**SINGLE, "upstreams": [upstream("a")]}, "upstream_url"),
        ({"upstream_auth": TOP_AUTH}, "upstream_url"),
        ({"upstream_auth": TOP_AUTH, "upstreams": []}, "upstream_url"),
        ({"upstream_url": "https://one.example"}, "upstream_auth"),
        # names
        (several(upstream("a"), upstream("a")), "upstreams[1].name"),
        (several(upstream("a"), upstream("b"), upstream("b")), "upstreams[2].name"),
        (several({"name": "", "url": "https://x.example"}), "upstreams[0].name"),
        (several({"name": "has space", "url": "https://x.example"}), "upstreams[0].name"),
        (several({"name": "a/b", "url": "https://x.example"}), "upstreams[0].name"),
        (
            several(upstream("a"), {"name": "-dash", "url": "https://x.example"}),
            "upstreams[1].name",
        ),
        (several({"name": "é", "url": "https://x.example"}), "upstreams[0].name"),
        (several({"name": "a{b}", "url": "https://x.example"}), "upstreams[0].name"),
        (several({"url": "https://x.example"}), "upstreams[0].name"),
        (several({"name": 7, "url": "https://x.example"}), "upstreams[0].name"),
        # urls
        (several(upstream("a", url="ftp://a.example")), "upstreams[0].url"),
        (several(upstream("a"), upstream("b", url="https://")), "upstreams[1].url"),
        (several(upstream("a", url="a.example")), "upstreams[0].url"),
        (several(upstream("a", url="https://a.example/?api-version=1")), "upstreams[0].url"),
        (several(upstream("a", url="https://a.example/#frag")), "upstreams[0].url"),
        (several(upstream("a", url="https://a.example:99999")), "upstreams[0].url"),
        (several({"name": "a"}), "upstreams[0].url"),
        ({**SINGLE, "upstream_url": "ftp://one.example"}, "upstream_url"),
        # priority and weight
        (several(upstream("a", weight=0)), "upstreams[0].weight"),
        (several(upstream("a"), upstream("b", weight=-1)), "upstreams[1].weight"),
        (several(upstream("a", weight=1.5)), "upstreams[0].weight"),
        (several(upstream("a", priority="1")), "upstreams[0].priority"),
        (several(upstream("a", priority=True)), "upstreams[0].priority"),
        # auth
        (several(upstream("a"), upstream_auth=None), "upstreams[0].auth"),
        (
            several(upstream("a", auth=OWN_AUTH), upstream("b"), upstream_auth=None),
            "upstreams[1].auth",
        ),
        (several(upstream("a", auth={"type": "api_key"})), "upstreams[0].auth.api_key"),
        (
            several(upstream("a"), upstream("b", auth={"type": "api_key", "api_key": ""})),
            "upstreams[1].auth.api_key",
        ),
        (
            several(upstream("a", auth={"type": "azure_ad", "tenant_id": "t", "client_id": "c"})),
            "upstreams[0].auth.client_secret",
        ),
        (several(upstream("a", auth={"type": "magic"})), "upstreams[0].auth.type"),
        (several(upstream("a", auth={"api_key": "k"})), "upstreams[0].auth.type"),
        (
            several(upstream("a", auth={"type": "azure_cli", "token_timeout": 0})),
            "upstreams[0].auth.token_timeout",
        ),
        (several(upstream("a", auth="api_key")), "upstreams[0].auth"),
        (several(upstream("a"), upstream_auth={"type": "api_key"}), "upstream_auth.api_key"),
        # routes
        (
            several(routes=[{"models": ["claude-*"], "upstreams": ["nope"]}]),
            "routes[0].upstreams[0]",
        ),
        (
            several(
                routes=[
                    {"models": ["claude-*"], "upstreams": ["a"]},
                    {"models": ["gpt-*"], "upstreams": ["b", "A"]},
                ]
            ),
            "routes[1].upstreams[1]",
        ),
        (
            {**SINGLE, "routes": [{"models": ["claude-*"], "upstreams": ["default"]}]},
            "routes[0].upstreams[0]",
        ),
        (several(routes=[{"models": [], "upstreams": ["a"]}]), "routes[0].models"),
        (several(routes=[{"models": [""], "upstreams": ["a"]}]), "routes[0].models"),
        (several(routes=[{"models": ["gpt-*", "  "], "upstreams": ["a"]}]), "routes[0].models"),
        (several(routes=[{"upstreams": ["a"]}]), "routes[0].models"),
        (several(routes=[{"models": "claude-*", "upstreams": ["a"]}]), "routes[0].models"),
        (several(routes=[{"models": ["claude-*"], "upstreams": []}]), "routes[0].upstreams"),
        (several(routes=[{"models": ["claude-*"]}]), "routes[0].upstreams"),
        (
            several(routes=[{"models": ["claude-*"], "upstreams": ["a"], "weight": 2}]),
            "routes[0].weight",
        ),
        # failover
        (several(failover={"on_status": [200]}), "failover.on_status[0]"),
        (several(failover={"on_status": [429, 600]}), "failover.on_status[1]"),
        (several(failover={"on_status": [429, 503, 399]}), "failover.on_status[2]"),
        (several(failover={"on_status": ["429"]}), "failover.on_status[0]"),
        (several(failover={"on_status": 429}), "failover.on_status"),
        (several(failover={"max_attempts": 0}), "failover.max_attempts"),
        (several(failover={"max_attempts": -1}), "failover.max_attempts"),
        (several(failover={"replay_limit": -1}), "failover.replay_limit"),
        (several(failover={"cooldown": 0}), "failover.cooldown"),
        (several(failover={"cooldown": -5}), "failover.cooldown"),
        (several(failover={"cooldown": 301}), "failover.max_cooldown"),  # over the default 300
        (several(failover={"cooldown": 20, "max_cooldown": 10}), "failover.max_cooldown"),
        (several(failover={"circuit_failures": 0}), "failover.circuit_failures"),
        (several(failover={"max_attempts": "3"}), "failover.max_attempts"),
        (several(failover="on"), "failover"),
        # unknown keys
        (several(upstream("a", bogus=1)), "upstreams[0].bogus"),
        (several(upstream("a"), upstream("b", auth_type="api_key")), "upstreams[1].auth_type"),
        (several(upstream("a", auth={**OWN_AUTH, "apikey": "k"})), "upstreams[0].auth.apikey"),
        (several(failover={"bogus": 1}), "failover.bogus"),
        (several(failover={"retries": 3}), "failover.retries"),
        (several(upstreams="a"), "upstreams"),
    ],
)
def test_mistakes_name_their_key(raw: dict[str, Any], key: str) -> None:
    """An operator reads which line of the file to fix, in the dotted form of the key."""
    message = error_of(raw)
    assert message.startswith(f"{key}:"), message


def test_the_secret_of_a_bad_auth_is_not_shown() -> None:
    message = error_of(several(upstream("a", auth={"type": "magic", "api_key": "hush-hush"})))
    assert "hush-hush" not in message


def test_an_unknown_upstream_lists_the_known_ones() -> None:
    message = error_of(several(routes=[{"models": ["claude-*"], "upstreams": ["c"]}]))
    assert "'c'" in message
    assert "a, b" in message


# ----------------------------------------------------------------- what is accepted


def test_the_single_upstream_form_is_one_upstream_named_default() -> None:
    """The original's upstream_url keeps working: one target, named default, its auth resolved."""
    config = parse(SINGLE)
    auth = UpstreamAuthConfig(type="api_key", api_key="top-level-secret")
    assert config.upstreams == ()
    assert config.targets() == (
        UpstreamConfig("default", "https://one.services.ai.azure.com", auth=auth),
    )
    assert config.first_url == "https://one.services.ai.azure.com"


def test_each_upstream_gets_its_own_auth_or_the_top_level_one() -> None:
    config = parse(
        several(
            upstream("ptu", priority=1, weight=3, auth={"type": "azure_cli"}),
            upstream("paygo", priority=2),
            upstream("spare", auth=OWN_AUTH),
        )
    )
    top = UpstreamAuthConfig(type="api_key", api_key="top-level-secret")
    targets = config.targets()
    assert [t.name for t in targets] == ["ptu", "paygo", "spare"]
    assert targets[0].auth == UpstreamAuthConfig(type="azure_cli")
    assert targets[1].auth == top
    assert targets[2].auth == UpstreamAuthConfig(type="api_key", api_key="own-secret")
    assert [(t.priority, t.weight) for t in targets] == [(1, 3), (2, 1), (1, 1)]
    assert config.upstreams[1].auth is None, "the config itself keeps what the file said"
    assert config.first_url == "https://ptu.services.ai.azure.com"


def test_every_upstream_with_its_own_auth_needs_no_top_level_one() -> None:
    config = parse(
        several(
            upstream("a", auth=OWN_AUTH),
            upstream("b", auth={"type": "azure_managed_identity"}),
            upstream_auth=None,
        )
    )
    assert config.upstream_auth is None
    assert [t.auth.type for t in config.targets() if t.auth] == [
        "api_key",
        "azure_managed_identity",
    ]


@pytest.mark.parametrize(
    "name", ["a", "A", "0", "ptu-eastus2", "paygo_1", "gpt.4o", "Foundry-01.prod_x"]
)
def test_upstream_names_accepted(name: str) -> None:
    """Names go into logs and metric labels: letters, digits, '-', '_', '.'."""
    config = parse(several(upstream(name)))
    assert config.upstreams[0].name == name


@pytest.mark.parametrize(
    "url",
    [
        "https://a.services.ai.azure.com",
        "https://a.services.ai.azure.com/anthropic",
        "http://127.0.0.1:8081",
        "http://localhost:9000/prefix/",
    ],
)
def test_upstream_urls_accepted(url: str) -> None:
    assert parse(several(upstream("a", url=url))).upstreams[0].url == url


@pytest.mark.parametrize("priority", [-3, 0, 1, 100])
def test_any_integer_priority(priority: int) -> None:
    assert parse(several(upstream("a", priority=priority))).upstreams[0].priority == priority


def test_routes_are_kept_in_order_as_tuples() -> None:
    config = parse(
        several(
            routes=[
                {"models": ["claude-opus-*"], "upstreams": ["a"]},
                {"models": ["claude-*", "gpt-*"], "upstreams": ["b", "a"]},
            ]
        )
    )
    assert config.routes == (
        RouteConfig(("claude-opus-*",), ("a",)),
        RouteConfig(("claude-*", "gpt-*"), ("b", "a")),
    )


def test_failover_defaults() -> None:
    """Without [failover]: 429/503/529 move on, three tries, 16 MiB kept for a replay."""
    for config in (parse(SINGLE), parse(several())):
        assert config.failover == FailoverConfig()
        fo = config.failover
        assert fo.on_status == (429, 503, 529)
        assert fo.max_attempts == 3
        assert fo.replay_limit == 16 * 1024 * 1024
        assert fo.cooldown == 10.0
        assert fo.max_cooldown == 300.0
        assert fo.circuit_failures == 3
    assert Config().failover == FailoverConfig()


@pytest.mark.parametrize(
    ("failover", "expected"),
    [
        ({"on_status": [429, 500, 502]}, {"on_status": (429, 500, 502)}),
        ({"on_status": []}, {"on_status": ()}),
        ({"on_status": [400, 599]}, {"on_status": (400, 599)}),
        ({"max_attempts": 1}, {"max_attempts": 1}),
        ({"replay_limit": 0}, {"replay_limit": 0}),
        ({"cooldown": 1}, {"cooldown": 1.0}),  # a TOML integer for a float
        ({"cooldown": 300}, {"cooldown": 300.0}),
        ({"cooldown": 0.5, "max_cooldown": 0.5}, {"cooldown": 0.5, "max_cooldown": 0.5}),
        ({"circuit_failures": 1}, {"circuit_failures": 1}),
    ],
)
def test_failover_settings_accepted(failover: dict[str, Any], expected: dict[str, Any]) -> None:
    config = parse(several(failover=failover))
    assert config.failover == dataclasses.replace(FailoverConfig(), **expected)


# ----------------------------------------------------------------- a real file

FILE = """
port = 8080

[upstream_auth]
type = "azure_cli"

[[upstreams]]
name = "ptu"
url = "https://ptu.services.ai.azure.com"
priority = 1
weight = 3
[upstreams.auth]
type = "api_key"
api_key = "${PTU_KEY}"

[[upstreams]]
name = "paygo"
url = "https://paygo.services.ai.azure.com/anthropic"
priority = 2

[[routes]]
models = ["claude-opus-*"]
upstreams = ["ptu"]

[[routes]]
models = ["claude-*"]
upstreams = ["ptu", "paygo"]

[failover]
on_status = [429, 500, 503, 529]
max_attempts = 2
cooldown = 5
"""

SECRET = "ptu-s3cr3t-value-0123456789"


def test_load_a_file_with_upstreams_routes_and_failover(tmp_path: Path) -> None:
    """[upstreams.auth] belongs to the [[upstreams]] above it; ${VAR} fills its key."""
    path = tmp_path / "config.toml"
    path.write_text(FILE)
    loaded = load_config(str(path), env={"PTU_KEY": SECRET})
    config = loaded.config
    assert loaded.path == path
    ptu, paygo = config.targets()
    assert (ptu.name, ptu.priority, ptu.weight) == ("ptu", 1, 3)
    assert ptu.auth == UpstreamAuthConfig(type="api_key", api_key=SECRET)
    assert (paygo.name, paygo.priority, paygo.weight) == ("paygo", 2, 1)
    assert paygo.auth == UpstreamAuthConfig(type="azure_cli")
    assert config.upstreams[1].auth is None
    assert config.routes == (
        RouteConfig(("claude-opus-*",), ("ptu",)),
        RouteConfig(("claude-*",), ("ptu", "paygo")),
    )
    assert config.failover == FailoverConfig(
        on_status=(429, 500, 503, 529), max_attempts=2, cooldown=5.0
    )
    assert config.first_url == "https://ptu.services.ai.azure.com"


def test_an_upstream_secret_never_appears_in_repr(tmp_path: Path) -> None:
    """Logs and tracebacks print configs; the key is found only where redaction looks."""
    path = tmp_path / "config.toml"
    path.write_text(FILE)
    loaded = load_config(str(path), env={"PTU_KEY": SECRET})
    config = loaded.config
    assert SECRET not in repr(config)
    assert SECRET not in repr(loaded)
    assert SECRET not in repr(config.upstreams)
    assert SECRET not in repr(config.targets())
    assert SECRET in set(walk_secrets(config))


def test_an_unset_variable_in_an_upstream_names_its_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(FILE)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    message = str(info.value)
    assert message.startswith("upstreams[0].auth.api_key:"), message
    assert "PTU_KEY" in message


def test_a_file_with_a_mistake_names_its_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(FILE.replace('upstreams = ["ptu", "paygo"]', 'upstreams = ["ptu", "payg0"]'))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={"PTU_KEY": SECRET})
    assert str(info.value).startswith("routes[1].upstreams[1]:")


def test_a_route_naming_an_upstream_twice_is_refused() -> None:
    raw = several(routes=[{"models": ["claude-*"], "upstreams": ["a", "a"]}])
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.upstreams\[1\]: 'a' is named twice"):
        parse(raw)
