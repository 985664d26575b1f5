"""client_api_keys_file, literal secrets in a file, and the example config as copied."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from claude_proxy.config import ClientKey, literal_secrets, load_config, parse_keys_file
from claude_proxy.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config.example.toml"


def test_keys_file_takes_digests_and_limits_as_inline_keys_do() -> None:
    digest = "ab" * 32
    text = f'[[client_api_keys]]\nname = "a"\nkey_sha256 = "{digest}"\nrequests_per_minute = 5\n'
    (ck,) = parse_keys_file(text, "f")
    assert (ck.key, ck.key_sha256, ck.requests_per_minute) == (None, digest, 5)
    with pytest.raises(ConfigError, match=r"client_api_keys\[0\]: give key or key_sha256"):
        parse_keys_file(text.replace("requests", 'key = "k"\nrequests'), "f")


def test_keys_file_entries() -> None:
    entry = '[[client_api_keys]]\nname = "{}"\nkey = "{}"\n'
    text = entry.format("a", "k-a") + entry.format("b", "$k")
    # values are literal: a Secret holds the keys themselves
    assert parse_keys_file(text, "f") == (ClientKey("a", "k-a"), ClientKey("b", "$k"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"no \[\[client_api_keys\]\] entries"),
        ("client_api_keys = []", r"no \[\[client_api_keys\]\] entries"),
        ("[[client_api_keys]]\nname = 'a'\nkey = ''", r"client_api_keys\[0\]\.key: empty"),
        ("[[client_api_keys]]\nname = 'a'", r"client_api_keys\[0\]\.key: required"),
        ("[[client_api_keys]]\nname = 'a'\nkey = 'k'\nkee = 'x'", "kee: unknown key"),
        ("[[client_api_keys]]\nname = 1\nkey = 'k'", r"\.name: expected str"),
        ("[[client_api_keys]]\nname = 'a'\nkey = 5", r"\.key: expected str; got a value"),
        ("keys = 1", "unknown key 'keys'"),
        ("[[client_api_keys]\n", "not valid TOML"),
    ],
)
def test_keys_file_errors_name_the_file_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_keys_file(text, "/run/keys.toml")
    assert str(info.value).startswith("client_api_keys_file (/run/keys.toml): ")


def write(tmp_path: Path, config: str, keys: str | None) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'upstream_url = "http://127.0.0.1:1"\nclient_api_keys_file = "{tmp_path / "keys.toml"}"\n'
        f'{config}\n[upstream_auth]\ntype = "azure_cli"\n'
    )
    if keys is not None:
        (tmp_path / "keys.toml").write_text(keys)
    return path


def test_keys_file_merges_with_inline_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'client_api_key = "k0"\nclient_api_keys = [{name = "a", key = "k1"}]',
        '[[client_api_keys]]\nname = "b"\nkey = "k2"\n',
    )
    config = load_config(str(path), env={}).config
    assert [(k.name, k.key) for k in config.client_keys()] == [
        ("default", "k0"),
        ("a", "k1"),
        ("b", "k2"),
    ]
    assert "k2" not in repr(config)


@pytest.mark.parametrize(
    ("inline", "keys", "message"),
    [
        (
            'client_api_keys = [{name = "a", key = "k1"}]',
            "name = 'a'\nkey = 'k2'",
            "duplicate name",
        ),
        ('client_api_key = "k0"', "name = 'default'\nkey = 'k2'", "duplicate name 'default'"),
        ('client_api_keys = [{name = "a", key = "k1"}]', "name = 'b'\nkey = 'k1'", "twice"),
    ],
)
def test_keys_file_clashes_are_errors(tmp_path: Path, inline: str, keys: str, message: str) -> None:
    path = write(tmp_path, inline, "[[client_api_keys]]\n" + keys)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), env={})


def test_missing_keys_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"client_api_keys_file: cannot read .*keys\.toml"):
        load_config(str(write(tmp_path, "", None)), env={})


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ('client_api_key = "${KEY}"', []),
        ('client_api_key = "$KEY"', []),
        ('client_api_key = "sk-123"', ["client_api_key"]),
        ('client_api_key = "sk-${KEY}"', ["client_api_key"]),
        ('client_api_key = "$$KEY"', ["client_api_key"]),  # $$ is a literal '$'
        (
            'client_api_keys = [{name = "a", key = "${A}"}, {name = "b", key = "lit"}]',
            ["client_api_keys[1].key"],
        ),
        ('[upstream_auth]\ntype = "api_key"\napi_key = "${K}"', []),
        (
            '[upstream_auth]\ntype = "azure_ad"\nclient_secret = "s3cret"\nclient_id = "id"',
            ["upstream_auth.client_secret"],
        ),
        ('[upstream_auth]\ncertificate_password = "pw"', ["upstream_auth.certificate_password"]),
        ('upstream_url = "https://literal"\n[tls]\nkey_path = "/k"', []),  # not secrets
    ],
)
def test_literal_secrets(text: str, found: list[str]) -> None:
    assert literal_secrets(tomllib.loads(text)) == found


def test_example_config_loads_with_an_empty_environment() -> None:
    loaded = load_config(str(EXAMPLE), env={})
    config = loaded.config
    assert config.upstream_auth.type == "azure_cli"
    assert config.logging.log_path is None  # stdout: no /var/log for a non-root user
    assert config.client_keys() == () and config.bind_address == "127.0.0.1"
    assert literal_secrets(tomllib.loads(EXAMPLE.read_text())) == []


def test_example_config_leaves_one_auth_type_active() -> None:
    active = [line for line in EXAMPLE.read_text().splitlines() if line.startswith("type = ")]
    assert active == ['type = "azure_cli"']
