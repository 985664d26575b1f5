"""Logging set-up: one function installs the handlers, stdlib rotation, secrets redacted.

Loggers are per module (``claude_proxy.relay`` and so on); per-request lines go to
``claude_proxy.access``. Every handler carries a filter that replaces any known secret (client
keys, upstream keys, tokens as they are acquired) with ``<redacted>``: a last line of defence,
since no code path logs one on purpose.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Iterable
from pathlib import Path

from .config import LoggingConfig

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SUFFIX = {"daily": "%Y-%m-%d", "hourly": "%Y-%m-%d-%H"}

_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Make sure ``value`` never appears in a log line (tokens register as they arrive)."""
    if len(value) >= 4:
        _secrets.add(value)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        message = record.getMessage()
        if any(secret in message for secret in _secrets):
            for secret in _secrets:
                message = message.replace(secret, "<redacted>")
            record.msg, record.args = message, None
        return True


def rotated_name(default_name: str) -> str:
    """``dir/prefix.log.2026-11-30`` (stdlib's name) becomes ``dir/prefix.2026-11-30.log``."""
    path = Path(default_name)
    stem, _, stamp = path.name.rpartition(".log.")
    if not stem:
        return default_name
    return str(path.with_name(f"{stem}.{stamp}.log"))


def file_handler(config: LoggingConfig) -> logging.Handler:
    """A handler writing ``<log_path>/<log_prefix>.log``, rotated hourly or daily."""
    assert config.log_path is not None
    directory = Path(config.log_path)
    directory.mkdir(parents=True, exist_ok=True)
    filename = directory / f"{config.log_prefix}.log"
    if config.rotation == "never":
        return logging.FileHandler(filename, encoding="utf-8")
    when = "H" if config.rotation == "hourly" else "midnight"
    handler = logging.handlers.TimedRotatingFileHandler(filename, when=when, encoding="utf-8")
    handler.suffix = SUFFIX[config.rotation]
    handler.namer = rotated_name
    return handler


def configure_logging(
    config: LoggingConfig,
    *,
    verbose: bool = False,
    secrets: Iterable[str] = (),
) -> None:
    """Install the handlers on the ``claude_proxy`` logger tree; call once per process."""
    for secret in secrets:
        register_secret(secret)
    level = logging.DEBUG if verbose else LEVELS[config.level]
    handler = file_handler(config) if config.log_path else logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger("claude_proxy")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    access = logging.getLogger("claude_proxy.access")
    access.disabled = not config.access_log
    # azure-identity's own lines go through the same (redacting) handler, warnings and up.
    azure = logging.getLogger("azure")
    for old in list(azure.handlers):
        azure.removeHandler(old)
    azure.addHandler(handler)
    azure.setLevel(max(level, logging.WARNING))
    azure.propagate = False


def set_level(name: str) -> None:
    logging.getLogger("claude_proxy").setLevel(LEVELS[name])
