"""The [logging] table's access-log keys: parsed, typed, and wrong values named."""

from __future__ import annotations

from typing import Any

import pytest

from claude_proxy.config import LoggingConfig, env_overrides, parse
from claude_proxy.errors import ConfigError

BASE: dict[str, Any] = {
    "upstream_url": "https://x.services.ai.azure.com",
    "upstream_auth": {"type": "azure_cli"},
}


def with_logging(**table: Any) -> dict[str, Any]:
    return {**BASE, "logging": table}


def test_defaults_keep_todays_behaviour() -> None:
    logging = parse(BASE).logging
    assert logging == LoggingConfig()
    assert (logging.access_format, logging.access_log_path, logging.backup_count) == (
        "text",
        None,
        0,
    )


def test_access_keys_parse() -> None:
    logging = parse(
        with_logging(access_format="json", access_log_path="/var/log/cp", backup_count=48)
    ).logging
    assert (logging.access_format, logging.access_log_path, logging.backup_count) == (
        "json",
        "/var/log/cp",
        48,
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"access_format": "JSON"}, "logging.access_format: expected one of text, json; got 'J"),
        ({"access_format": 1}, "logging.access_format: expected one of text, json; got int"),
        ({"backup_count": -1}, "logging.backup_count: expected 0 (keep every file) or more"),
        ({"backup_count": "7"}, "logging.backup_count: expected int; got '7'"),
        ({"backup_count": True}, "logging.backup_count: expected an integer; got bool"),
        ({"access_log_path": 3}, "logging.access_log_path: expected str; got int"),
        ({"access_logs": True}, "logging.access_logs: unknown key; expected one of access_format"),
    ],
)
def test_bad_values_name_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(with_logging(**table))
    assert str(caught.value).startswith(message), caught.value


def test_environment_sets_them() -> None:
    env = {
        "CLAUDE_PROXY__LOGGING__ACCESS_FORMAT": "json",
        "CLAUDE_PROXY__LOGGING__BACKUP_COUNT": "24",
        "CLAUDE_PROXY__LOGGING__ACCESS_LOG_PATH": "/logs",
    }
    assert env_overrides(env) == {
        "logging": {"access_format": "json", "backup_count": 24, "access_log_path": "/logs"}
    }
