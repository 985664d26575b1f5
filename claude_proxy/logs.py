"""Logging set-up: one function installs the handlers, stdlib rotation, secrets redacted.

Loggers are per module (``claude_proxy.relay`` and so on); per-request lines go to
``claude_proxy.access``. Every handler carries a filter that replaces any known secret (client
keys, upstream keys, tokens as they are acquired) with ``<redacted>``: a last line of defence,
since no code path logs one on purpose.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import sys
import time
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

# Longest first, so a secret that contains another is blanked whole. A tuple, replaced on each
# registration, so a record being redacted never sees the collection change under it.
_secrets: tuple[str, ...] = ()
_lasting: set[str] = set()
# Tokens register as they arrive, one an hour for months: only the latest few are kept, or each
# log line would be searched for every token ever issued.
TRANSIENT_KEPT = 4
_transient: collections.deque[str] = collections.deque(maxlen=TRANSIENT_KEPT)
_REDACTED = "<redacted>"
_plain = logging.Formatter()  # renders a traceback the way every formatter of ours would


def register_secret(value: str, *, transient: bool = False) -> None:
    """Make sure ``value`` never appears in a log line. ``transient``: a token, superseded by
    the next; only the latest :data:`TRANSIENT_KEPT` are kept."""
    global _secrets
    if len(value) < 4 or value in _lasting or value in _transient:
        return
    if transient:
        _transient.append(value)
    else:
        _lasting.add(value)
    _secrets = tuple(sorted({*_lasting, *_transient}, key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` with every known secret replaced by ``<redacted>``."""
    secrets = _secrets
    if secrets and any(secret in text for secret in secrets):
        for secret in secrets:
            text = text.replace(secret, _REDACTED)
    return text


class RedactSecrets(logging.Filter):
    """Blanks any known secret in what a record will print: the message with its arguments
    (formatted here, once; the formatter reuses it), the traceback and the stack.

    The traceback is rendered to ``exc_text`` here, redacted, and ``exc_info`` dropped, so no
    handler after this one can render the raw exception again; the standard formatter prints
    ``exc_text`` as it would have printed the traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad arguments: logging would report it; never raise to the caller
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _plain.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class DeferredFlush:
    """Mixin for stream handlers: info lines reach the stream's buffer at once and the file or
    pipe at most a second later (:func:`flush_handlers`, called by the server); warnings and
    errors are flushed at once. Saves a system call per access line."""

    def flush(self) -> None:
        pass  # StreamHandler.emit calls this after every record

    def flush_now(self) -> None:
        logging.StreamHandler.flush(self)  # type: ignore[arg-type]

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)  # type: ignore[misc]
        if record.levelno >= logging.WARNING:
            self.flush_now()

    def close(self) -> None:
        self.flush_now()
        super().close()  # type: ignore[misc]


class BufferedStreamHandler(DeferredFlush, logging.StreamHandler):  # type: ignore[type-arg]
    pass


class BufferedTimedRotatingFileHandler(DeferredFlush, logging.handlers.TimedRotatingFileHandler):
    pass


class BufferedFileHandler(DeferredFlush, logging.FileHandler):
    pass


class SecondCachingFormatter(logging.Formatter):
    """The standard format, with the date and time part formatted once per second."""

    _cached: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if self._cached[0] != second:
            self._cached = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        return f"{self._cached[1]},{int(record.msecs):03d}"


def flush_handlers() -> None:
    """Push buffered log lines out; the server calls this about once a second."""
    for handler in logging.getLogger("claude_proxy").handlers:
        if isinstance(handler, DeferredFlush):
            handler.flush_now()


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
        return BufferedFileHandler(filename, encoding="utf-8")
    when = "H" if config.rotation == "hourly" else "midnight"
    handler = BufferedTimedRotatingFileHandler(filename, when=when, encoding="utf-8")
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
    # The logging HOWTO's "Optimization" knobs: our format uses none of these, and with them
    # off a record costs about half as much (there is one per request).
    logging._srcfile = None  # no caller lookup per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for secret in secrets:
        register_secret(secret)
    level = logging.DEBUG if verbose else LEVELS[config.level]
    handler = file_handler(config) if config.log_path else BufferedStreamHandler(sys.stdout)
    handler.setFormatter(SecondCachingFormatter(FORMAT))
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
    """Change the level at run time (SIGHUP); the azure lines stay at warnings and up."""
    level = LEVELS[name]
    logging.getLogger("claude_proxy").setLevel(level)
    logging.getLogger("azure").setLevel(max(level, logging.WARNING))
