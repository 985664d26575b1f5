from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import pytest

from claude_proxy.config import (
    CONFIG_FILE_ENV,
    ClientKey,
    discover,
    env_overrides,
    expand,
    load_config,
    walk_secrets,
)
from claude_proxy.errors import ConfigError

# A copy of the original program's README: its config files must keep working unchanged.
SEED_README = Path(__file__).parents[1] / "data" / "seed-README.md"

BASIC = """
bind_address = "0.0.0.0"
port = 8080
upstream_url = "https://api.anthropic.com"
client_api_key = "your-client-api-key"

[upstream_auth]
type = "api_key"
api_key = "your-upstream-api-key"
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME and working directory, so discovery sees only what a test writes."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    monkeypatch.chdir(work)
    for name in list(os.environ):
        if name.startswith("CLAUDE_PROXY"):
            monkeypatch.delenv(name)
    return home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(text: str, tmp_path: Path, env: dict[str, str] | None = None, **overrides: Any) -> Any:
    path = write(tmp_path / "c.toml", text)
    return load_config(str(path), overrides, env or {}).config


# ----------------------------------------------------------------- the seed's files, unchanged


def seed_snippets() -> list[str]:
    """Every TOML block in the original README that is a whole config or an auth table."""
    text = SEED_README.read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```toml\n")[1:]]
    return blocks


def test_every_seed_snippet_loads(tmp_path: Path) -> None:
    env = {
        "DOWNSTREAM_API_KEY": "d",
        "UPSTREAM_API_KEY": "u",
        "AZURE_TENANT_ID": "t",
        "AZURE_CLIENT_ID": "c",
        "AZURE_CLIENT_SECRET": "s",
    }
    loaded = 0
    for block in seed_snippets():
        if "[upstream_auth]" in block and "upstream_url" not in block:
            block = 'upstream_url = "https://x.services.ai.azure.com"\n' + block
        if "upstream_url" not in block:
            block = BASIC + block if "[logging]" in block else block
        if "upstream_url" not in block:
            continue  # codex's own config.toml, not ours
        if "client_api_key" in block and "[upstream_auth]" not in block:
            block = block + '\nupstream_url = "https://a"\n[upstream_auth]\ntype = "azure_cli"\n'
        load(block, tmp_path, env)
        loaded += 1
    assert loaded >= 5


def test_basic_config_values(tmp_path: Path) -> None:
    config = load(BASIC, tmp_path)
    assert config.bind_address == "0.0.0.0"
    assert config.port == 8080
    assert config.upstream_auth.type == "api_key"
    assert config.client_keys() == (ClientKey("default", "your-client-api-key"),)


def test_defaults(tmp_path: Path) -> None:
    config = load('upstream_url = "https://h"\n[upstream_auth]\ntype = "azure_cli"\n', tmp_path)
    assert (config.bind_address, config.port) == ("127.0.0.1", 8080)
    assert config.connect_timeout == 10.0
    assert config.idle_timeout == 600.0
    assert config.upstream_auth.scope == "https://ai.azure.com/.default"
    assert config.passthrough_unauthenticated is True
    assert config.logging.rotation == "daily"


# ----------------------------------------------------------------- discovery


def test_discovery_order(home: Path) -> None:
    env: dict[str, str] = {}
    assert discover(None, env)[0] is None
    user_dot = write(home / ".claude-proxy.toml", BASIC)
    assert discover(None, env)[0] == user_dot
    xdg = write(home / ".config" / "claude-proxy" / "config.toml", BASIC)
    assert discover(None, env)[0] == xdg
    local = write(Path("config.toml"), BASIC)
    assert discover(None, env)[0] == local
    named = write(home / "named.toml", BASIC)
    assert discover(None, {CONFIG_FILE_ENV: str(named)})[0] == named
    flag = write(home / "flag.toml", BASIC)
    assert discover(str(flag), {CONFIG_FILE_ENV: str(named)})[0] == flag


@pytest.mark.parametrize("how", ["flag", "env"])
def test_named_missing_file_is_an_error(home: Path, how: str) -> None:
    write(Path("config.toml"), BASIC)  # must not be used instead
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        if how == "flag":
            discover("nope.toml", {})
        else:
            discover(None, {CONFIG_FILE_ENV: "nope.toml"})


def test_no_file_and_no_settings_lists_places_searched(home: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {})
    message = str(info.value)
    assert "config.toml" in message
    assert ".claude-proxy.toml" in message
    assert CONFIG_FILE_ENV in message


def test_no_file_cli_alone_suffices(home: Path) -> None:
    loaded = load_config(
        None,
        {
            "upstream_url": "https://h",
            "upstream_auth.type": "api_key",
            "upstream_auth.api_key": "k",
        },
        {},
    )
    assert loaded.path is None
    assert loaded.config.upstream_auth.api_key == "k"


def test_no_file_environment_alone_suffices(home: Path) -> None:
    env = {
        "CLAUDE_PROXY__UPSTREAM_URL": "https://h",
        "CLAUDE_PROXY__UPSTREAM_AUTH__TYPE": "azure_cli",
        "CLAUDE_PROXY__PORT": "9999",
    }
    config = load_config(None, {}, env).config
    assert config.port == 9999
    assert config.upstream_auth.type == "azure_cli"


# ----------------------------------------------------------------- ${VAR} expansion


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A}", "alpha"),
        ("$A", "alpha"),
        ("x-${A}-y", "x-alpha-y"),
        ("$A$B", "alphabeta"),
        ("$$", "$"),
        ("$${A}", "${A}"),
        ("cost: $$5", "cost: $5"),
        ("no vars", "no vars"),
        ("trailing $", "trailing $"),
        ("$1", "$1"),
        ("${EMPTY}", ""),
    ],
)
def test_expand(text: str, expected: str) -> None:
    assert expand(text, {"A": "alpha", "B": "beta", "EMPTY": ""}, "k") == expected


@pytest.mark.parametrize("text", ["${MISSING}", "$MISSING", "pre-${MISSING}"])
def test_unset_variable_names_variable_and_key(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        expand(text, {}, "upstream_auth.api_key")
    assert "MISSING" in str(info.value)
    assert "upstream_auth.api_key" in str(info.value)


def test_expansion_in_file_names_dotted_key(tmp_path: Path) -> None:
    text = BASIC.replace('"your-upstream-api-key"', '"${UPSTREAM_API_KEY}"')
    with pytest.raises(ConfigError, match=r"upstream_auth\.api_key: .*UPSTREAM_API_KEY"):
        load(text, tmp_path, {})
    assert load(text, tmp_path, {"UPSTREAM_API_KEY": "u1"}).upstream_auth.api_key == "u1"


def test_expansion_inside_arrays_of_tables(tmp_path: Path) -> None:
    text = BASIC + '\nclient_api_keys = [{ name = "ci", key = "${CI_KEY}" }]\n'
    text = text.replace("[upstream_auth]", "") + ""
    text = (
        'upstream_url = "https://h"\n'
        'client_api_keys = [{ name = "ci", key = "${CI_KEY}" }]\n'
        '[upstream_auth]\ntype = "azure_cli"\n'
    )
    with pytest.raises(ConfigError, match=r"client_api_keys\[0\]\.key"):
        load(text, tmp_path, {})
    assert load(text, tmp_path, {"CI_KEY": "k"}).client_api_keys == (ClientKey("ci", "k"),)


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("prot = 1", "prot: unknown key"),
        ("port = 'x'", "port: expected int; got 'x'"),
        ("port = true", "port: expected an integer"),
        ("port = 70000", "port: expected 0..65535"),
        ("[admin]\nport = -1", r"admin\.port: expected 0\.\.65535"),
        ("[tls]\nhttps_port = 70000", r"tls\.https_port: expected 0\.\.65535"),
        ("idle_timeout = 0", "idle_timeout: must be greater than 0"),
        ("passthrough_unauthenticated = 'yes'", "passthrough_unauthenticated: expected bool"),
        ("upstream_url = 'ftp://x'", r"upstream_url: expected http\(s\)"),
        ("upstream_url = 'https://x/?q=1'", "upstream_url: must not carry a query"),
        ("bind_address = 'example.com'", "bind_address: expected an IP address"),
        ("client_api_key = ''", "client_api_key: empty"),
        ("workers = 0", "workers: must be at least 1"),
        ("[logging]\nlevel = 'loud'", "logging.level: expected one of trace, debug"),
        ("[logging]\nrotaton = 'daily'", "logging.rotaton: unknown key"),
        ("client_api_keys = [{ name = 'a' }]", r"client_api_keys\[0\]\.key: required"),
        (
            "client_api_keys = [{ name = 'a', key = 'k1' }, { name = 'a', key = 'k2' }]",
            r"client_api_keys\[1\]\.name: duplicate",
        ),
        (
            "client_api_keys = [{ name = 'a', key = 'k' }, { name = 'b', key = 'k' }]",
            "same key appears twice",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, snippet: str, message: str) -> None:
    base = 'upstream_url = "https://h"\n'
    auth = '[upstream_auth]\ntype = "azure_cli"\n'
    text = (
        base + auth + snippet
        if snippet.startswith("[")
        else snippet + "\n" + (base if "upstream_url" not in snippet else "") + auth
    )
    with pytest.raises(ConfigError, match=message):
        load(text, tmp_path)


def test_auth_type_error_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load('upstream_url = "https://h"\n[upstream_auth]\ntype = "azure-ad"\n', tmp_path)
    assert str(info.value).startswith("upstream_auth.type: expected one of api_key, azure_ad, ")
    assert "got 'azure-ad'" in str(info.value)


@pytest.mark.parametrize(
    ("auth", "missing"),
    [
        ('type = "api_key"', "upstream_auth.api_key"),
        ('type = "azure_ad"\ntenant_id = "t"\nclient_id = "c"', "upstream_auth.client_secret"),
        ('type = "azure_certificate"\ntenant_id = "t"', "upstream_auth.client_id"),
    ],
)
def test_auth_type_requirements(tmp_path: Path, auth: str, missing: str) -> None:
    with pytest.raises(ConfigError, match=missing):
        load(f'upstream_url = "https://h"\n[upstream_auth]\n{auth}\n', tmp_path)


def test_secret_value_not_echoed_in_type_error(tmp_path: Path) -> None:
    text = 'upstream_url = "https://h"\n[upstream_auth]\ntype = "api_key"\napi_key = 12345\n'
    with pytest.raises(ConfigError) as info:
        load(text, tmp_path)
    assert "12345" not in str(info.value)


def test_secrets_not_in_repr(tmp_path: Path) -> None:
    text = BASIC + '\nclient_api_keys = [{ name = "ci", key = "named-secret" }]\n'
    text = text.replace("[upstream_auth]", "[upstream_auth]", 1)
    text = (
        'upstream_url = "https://h"\nclient_api_key = "single-secret"\n'
        'client_api_keys = [{ name = "ci", key = "named-secret" }]\n'
        '[upstream_auth]\ntype = "azure_ad"\ntenant_id = "t"\nclient_id = "c"\n'
        'client_secret = "entra-secret"\n'
    )
    config = load(text, tmp_path)
    shown = repr(config)
    for secret in ("single-secret", "named-secret", "entra-secret"):
        assert secret not in shown
    assert set(walk_secrets(config)) == {"single-secret", "named-secret", "entra-secret"}


# ----------------------------------------------------------------- layering


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    text = BASIC.replace("port = 8080", "port = 1000")
    assert load(text, tmp_path).port == 1000
    env = {"CLAUDE_PROXY__PORT": "2000"}
    assert load(text, tmp_path, env).port == 2000
    assert load(text, tmp_path, env, port=3000).port == 3000
    # None means "flag not given": the lower layers stay
    assert load(text, tmp_path, env, port=None).port == 2000


def test_env_nested_keys_and_types(tmp_path: Path) -> None:
    env = {
        "CLAUDE_PROXY__UPSTREAM_AUTH__API_KEY": "from-env",
        "CLAUDE_PROXY__LOGGING__LEVEL": "debug",
        "CLAUDE_PROXY__PASSTHROUGH_UNAUTHENTICATED": "false",
        "CLAUDE_PROXY__IDLE_TIMEOUT": "12.5",
        "CLAUDE_PROXY__CLIENT_API_KEYS": '[{ name = "a", key = "ka" }]',
    }
    config = load(BASIC, tmp_path, env)
    assert config.upstream_auth.api_key == "from-env"
    assert config.logging.level == "debug"
    assert config.passthrough_unauthenticated is False
    assert config.idle_timeout == 12.5
    assert config.client_api_keys == (ClientKey("a", "ka"),)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CLAUDE_PROXY__PROT", "1", "CLAUDE_PROXY__PROT: no setting 'prot'"),
        ("CLAUDE_PROXY__PORT", "eighty", "CLAUDE_PROXY__PORT: expected a number"),
        ("CLAUDE_PROXY__PASSTHROUGH_UNAUTHENTICATED", "maybe", "expected true or false"),
        ("CLAUDE_PROXY__LOGGING", "x", "no setting 'logging'"),
    ],
)
def test_env_errors(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        env_overrides({name: value})


def test_env_values_are_not_expanded(tmp_path: Path) -> None:
    config = load(BASIC, tmp_path, {"CLAUDE_PROXY__UPSTREAM_AUTH__API_KEY": "a$b${C}"})
    assert config.upstream_auth.api_key == "a$b${C}"


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load("port = = 1", tmp_path)


def test_example_config_documents_every_key() -> None:
    example = (Path(__file__).parents[2] / "config.example.toml").read_text()
    from claude_proxy.config import Config, JwtPolicy, _hints, _strip_optional

    def keys(cls: Any, prefix: str) -> list[str]:
        out = []
        for name, tp in _hints(cls).items():
            inner = _strip_optional(tp)
            if dataclasses.is_dataclass(inner):  # a table: its keys
                out += keys(inner, name + ".")
            elif name == "policies":
                out += keys(JwtPolicy, "client_jwt.policies.")
            elif name in ("upstreams", "routes"):  # arrays of tables
                assert f"[[{name}]]" in example, f"[[{name}]] not documented"
                out += keys(typing.get_args(inner)[0], name + ".")
            else:
                out.append(prefix + name)
        return out

    for dotted in keys(Config, ""):
        leaf = dotted.rsplit(".", 1)[-1]
        assert f"{leaf} =" in example or f"{leaf}=" in example, f"{dotted} not documented"
