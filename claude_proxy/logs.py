"""Logging set-up: one function installs the handlers, stdlib rotation, secrets redacted.

Loggers are per module (``claude_proxy.relay`` and so on); per-request lines go to
``claude_proxy.access`` through :func:`log_access`, as text or one JSON object per line, with the
rest or in a file of their own. Every handler carries a filter that replaces any known secret
(client keys, upstream keys, tokens as they are acquired) with ``<redacted>``: a last line of
defence, since no code path logs one on purpose. :func:`reopen_logs` reopens the files after
logrotate moved them (SIGUSR1).
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .config import LoggingConfig

if TYPE_CHECKING:
    from .record import ExchangeRecord

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
# What a rotated file's stamp looks like, for TimedRotatingFileHandler's backupCount clean-up;
# its own pattern for "H" expects "_" before the hour.
STAMP = {
    "daily": re.compile(r"^\d{4}-\d{2}-\d{2}(\.\w+)?$", re.ASCII),
    "hourly": re.compile(r"^\d{4}-\d{2}-\d{2}-\d{2}(\.\w+)?$", re.ASCII),
}
ACCESS = "claude_proxy.access"
access_logger = logging.getLogger(ACCESS)

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
    for secret in _secrets:  # longest first
        if secret in text:
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
    """Hourly rotation on the hour: the standard library rotates an hour after start-up (or the
    file's last write), at whatever minute that was; only daily rotation is aligned there."""

    def computeRollover(self, currentTime: int) -> int:
        if self.when == "H" and self.interval == 3600:
            return next_hour(currentTime, utc=self.utc)
        return int(super().computeRollover(currentTime))


def next_hour(when: float, *, utc: bool = False) -> int:
    """The start of the hour after ``when`` on the local (or UTC) clock, as a timestamp."""
    t = time.gmtime(when) if utc else time.localtime(when)
    return int(when) - (t.tm_min * 60 + t.tm_sec) + 3600


class BufferedFileHandler(DeferredFlush, logging.FileHandler):
    pass


class SecondCachingFormatter(logging.Formatter):
    """The standard format, with the date and time part formatted once per second. An access
    line in JSON is printed bare: the object is the whole line."""

    _cached: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        if record.__dict__.get("access_json"):
            return record.getMessage()
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if self._cached[0] != second:
            self._cached = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        return f"{self._cached[1]},{int(record.msecs):03d}"


# The handlers configure_logging installed: flushed about once a second, reopened on SIGUSR1.
_installed: list[logging.Handler] = []


def flush_handlers() -> None:
    """Push buffered log lines out; the server calls this about once a second."""
    for handler in _installed:
        if isinstance(handler, DeferredFlush):
            handler.flush_now()


def reopen_logs() -> None:
    """Reopen every log file by its name: after logrotate moved one away (SIGUSR1), the next
    line goes to a new file of that name. Lines buffered so far go to the old one."""
    failed: list[str] = []
    for handler in _installed:
        if not isinstance(handler, logging.FileHandler):
            continue
        handler.acquire()
        try:
            if handler.stream is not None:
                handler.flush()
                if isinstance(handler, DeferredFlush):
                    handler.flush_now()
                handler.stream.close()
                handler.stream = None
            try:
                handler.stream = handler._open()
            except OSError as exc:  # left closed: the next line tries again, and says why
                failed.append(f"{handler.baseFilename}: {exc.strerror}")
        finally:
            handler.release()
    for reason in failed:
        logging.getLogger(__name__).error("cannot reopen the log file %s", reason)


# ----------------------------------------------------------------- access lines

TEXT = (
    '%s %s "%s %s" %d in=%d out=%d ttfb=%.1fms dur=%.1fms%s'  # today's fields, in today's order
    " outcome=%s client=%s ua=%s upstream_id=%s%s"  # with [[upstreams]]: which, and attempts
)
_access_json = False
_encode = msgspec.json.Encoder().encode
_rfc3339: tuple[int, str] = (-1, "")


def log_access(rec: ExchangeRecord) -> None:
    """One access line for a finished exchange, as text or JSON (``[logging] access_format``).

    Called in deferred bookkeeping, after the response went out, only while the access log is
    on. The record rides along as ``exchange`` (with ``request_id``, ``client_key`` and
    ``status``) for filters and tests.
    """
    extra: dict[str, Any] = {
        "exchange": rec,
        "request_id": rec.request_id,
        "client_key": rec.client_key,
        "status": rec.status,
    }
    if _access_json:
        extra["access_json"] = True
        access_logger.info(access_json(rec), extra=extra)
        return
    tokens = ""
    if rec.input_tokens is not None or rec.output_tokens is not None:
        tokens = (
            f" model={rec.model or rec.request_model or '-'}"
            f" tokens_in={rec.input_tokens or 0} tokens_out={rec.output_tokens or 0}"
        )
    access_logger.info(
        TEXT,
        rec.request_id,
        rec.client_key,
        rec.method,
        rec.path,
        rec.status,
        rec.bytes_in,
        rec.bytes_out,
        rec.ttfb * 1000 if rec.ttfb is not None else -1.0,
        rec.duration * 1000,
        tokens,
        rec.outcome,
        rec.client_addr or "-",
        quoted(rec.user_agent),
        rec.upstream_request_id or "-",
        f" upstream={rec.upstream} attempts={rec.attempts}" if rec.upstream is not None else "",
        extra=extra,
    )


def quoted(text: str | None) -> str:
    """A value that may hold spaces or quotes, as one token of a text line: ``"..."`` or ``-``."""
    if text is None:
        return "-"
    if text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return _encode(text).decode()


def access_json(rec: ExchangeRecord) -> str:
    """The access line as one JSON object: the fields README's Logging section lists."""
    fields = {
        "time": rfc3339(rec.start_time),
        "request_id": rec.request_id,
        "client_key": rec.client_key,
        "client_addr": rec.client_addr or None,
        "method": rec.method,
        "path": rec.path,
        "status": rec.status or None,
        "outcome": rec.outcome,
        "bytes_in": rec.bytes_in,
        "bytes_out": rec.bytes_out,
        "ttfb_ms": round(rec.ttfb * 1000, 1) if rec.ttfb is not None else None,
        "duration_ms": round(rec.duration * 1000, 1),
        "model": rec.model or rec.request_model,
        "input_tokens": rec.input_tokens,
        "output_tokens": rec.output_tokens,
        "upstream_request_id": rec.upstream_request_id,
        "user_agent": rec.user_agent,
    }
    if rec.upstream is not None:  # with [[upstreams]]: which one answered, after how many
        fields["upstream"] = rec.upstream
        fields["attempts"] = rec.attempts
    return _encode(fields).decode()


def rfc3339(when: float) -> str:
    """``2026-11-30T06:10:02.114Z``: UTC, milliseconds; the seconds part is cached."""
    global _rfc3339
    second = int(when)
    if _rfc3339[0] != second:
        _rfc3339 = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_rfc3339[1]}.{int((when - second) * 1000):03d}Z"


def rotated_name(default_name: str) -> str:
    """``dir/prefix.log.2026-11-30`` (stdlib's name) becomes ``dir/prefix.2026-11-30.log``."""
    path = Path(default_name)
    stem, _, stamp = path.name.rpartition(".log.")
    if not stem:
        return default_name
    return str(path.with_name(f"{stem}.{stamp}.log"))


def file_handler(config: LoggingConfig, *, access: bool = False) -> logging.Handler:
    """A handler writing ``<log_path>/<log_prefix>.log`` (``access``:
    ``<access_log_path>/<log_prefix>-access.log``), rotated hourly or daily, ``backup_count``
    rotated files kept (0: all)."""
    where = config.access_log_path if access else config.log_path
    assert where is not None
    directory = Path(where)
    directory.mkdir(parents=True, exist_ok=True)
    filename = directory / f"{config.log_prefix}{'-access' if access else ''}.log"
    if config.rotation == "never":
        return BufferedFileHandler(filename, encoding="utf-8")
    when = "H" if config.rotation == "hourly" else "midnight"
    handler = BufferedTimedRotatingFileHandler(
        filename, when=when, backupCount=config.backup_count, encoding="utf-8"
    )
    handler.suffix = SUFFIX[config.rotation]
    handler.extMatch = STAMP[config.rotation]
    handler.namer = rotated_name
    return handler


def _install(logger: logging.Logger, handler: logging.Handler | None) -> None:
    for old in list(logger.handlers):
        logger.removeHandler(old)
        if old in _installed:
            _installed.remove(old)
            old.close()
    if handler is not None:
        logger.addHandler(handler)
        if handler not in _installed:
            _installed.append(handler)


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
    global _access_json
    level = logging.DEBUG if verbose else LEVELS[config.level]
    handler = file_handler(config) if config.log_path else BufferedStreamHandler(sys.stdout)
    _dress(handler)
    root = logging.getLogger("claude_proxy")
    _install(root, handler)
    root.setLevel(level)
    root.propagate = False
    access = logging.getLogger(ACCESS)
    access.disabled = not config.access_log
    _access_json = config.access_format == "json"
    own = file_handler(config, access=True) if config.access_log_path else None
    _install(access, own and _dress(own))
    access.propagate = own is None  # else with the rest, through the handler above
    # azure-identity's own lines go through the same (redacting) handler, warnings and up.
    azure = logging.getLogger("azure")
    _install(azure, handler)
    azure.setLevel(max(level, logging.WARNING))
    azure.propagate = False


def _dress(handler: logging.Handler) -> logging.Handler:
    handler.setFormatter(SecondCachingFormatter(FORMAT))
    handler.addFilter(RedactSecrets())
    return handler


def set_level(name: str) -> None:
    """Change the level at run time (SIGHUP); the azure lines stay at warnings and up."""
    level = LEVELS[name]
    logging.getLogger("claude_proxy").setLevel(level)
    logging.getLogger("azure").setLevel(max(level, logging.WARNING))
