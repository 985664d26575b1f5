"""Logging: secrets redacted everywhere a record prints, the access line in both formats,
files rotated and reopened. Real loggers and handlers throughout."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from claude_proxy import logs
from claude_proxy.config import LoggingConfig
from claude_proxy.logs import (
    ACCESS,
    FORMAT,
    RedactSecrets,
    SecondCachingFormatter,
    configure_logging,
    file_handler,
    flush_handlers,
    log_access,
    next_hour,
    register_secret,
    reopen_logs,
)
from claude_proxy.record import ExchangeRecord

from ..records import exchange_record

# Never logged under claude_proxy, so the session's leak scan does not see these on purpose.
SECRET = "sk-redaction-test-0123456789abcdef"
CAUSE = "cause-secret-fedcba9876543210"
register_secret(SECRET)
register_secret(CAUSE)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger with one handler as configure_logging builds it, writing to a string."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(SecondCachingFormatter(FORMAT))
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("test.logs.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, out
    logger.removeHandler(handler)
    handler.close()


def fail_with_secret() -> None:
    try:
        raise KeyError("cause-secret-fedcba9876543210")  # the literal shows in the traceback
    except KeyError as exc:
        raise RuntimeError(f"upstream said: bad key {SECRET}") from exc


def test_traceback_with_a_secret_is_redacted(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    try:
        fail_with_secret()
    except RuntimeError:
        logger.exception("request failed for %s", SECRET)
    text = out.getvalue()
    assert "Traceback (most recent call last)" in text  # the traceback is still there...
    assert "The above exception was the direct cause" in text
    assert "RuntimeError: upstream said: bad key <redacted>" in text
    assert "KeyError: '<redacted>'" in text
    assert "request failed for <redacted>" in text
    assert SECRET not in text and CAUSE not in text  # ...without the secrets


def test_stack_info_is_redacted(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    logger.warning("where", stack_info=True)  # cause-secret-fedcba9876543210 on this line
    text = out.getvalue()
    assert "Stack (most recent call last)" in text
    assert "<redacted> on this line" in text and CAUSE not in text


def test_args_are_redacted(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    logger.info("key=%s other=%r", SECRET, {"token": CAUSE})
    assert out.getvalue().rstrip().endswith("key=<redacted> other={'token': '<redacted>'}")


def test_traceback_already_rendered_by_an_earlier_handler_is_redacted(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    record = logger.makeRecord(logger.name, logging.ERROR, "f", 1, "failed", (), None)
    record.exc_text = f"Traceback (most recent call last):\nValueError: {SECRET}"
    logger.handle(record)
    assert "ValueError: <redacted>" in out.getvalue() and SECRET not in out.getvalue()


def test_no_handler_after_redaction_can_render_the_raw_exception(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, _ = captured
    seen: list[logging.LogRecord] = []

    class Later(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    later = Later()
    logger.addHandler(later)
    try:
        fail_with_secret()
    except RuntimeError:
        logger.exception("failed")
    finally:
        logger.removeHandler(later)
    (record,) = seen
    assert record.exc_info is None
    assert record.exc_text is not None and SECRET not in logging.Formatter().format(record)


def test_bad_arguments_do_not_raise_into_the_caller(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    logger.info("two %s %s", SECRET)  # one argument short
    assert "<redacted>" in out.getvalue() and SECRET not in out.getvalue()


def test_only_the_latest_tokens_are_searched() -> None:
    from claude_proxy import logs

    for n in range(logs.TRANSIENT_KEPT + 3):
        register_secret(f"token-number-{n:04d}", transient=True)
    kept = [s for s in logs._secrets if s.startswith("token-number-")]
    assert sorted(kept) == [f"token-number-{n:04d}" for n in range(3, logs.TRANSIENT_KEPT + 3)]
    assert SECRET in logs._secrets  # configured secrets stay


# ----------------------------------------------------------------- access lines

JSON_FIELDS = [
    "time",
    "request_id",
    "client_key",
    "client_addr",
    "method",
    "path",
    "status",
    "outcome",
    "bytes_in",
    "bytes_out",
    "ttfb_ms",
    "duration_ms",
    "model",
    "input_tokens",
    "output_tokens",
    "upstream_request_id",
    "user_agent",
]
STARTED = 1_796_018_402.114  # 2026-11-30T06:00:02.114Z


def full_record(**changes: Any) -> ExchangeRecord:
    rec = ExchangeRecord(
        request_id="3f9a1c-2a",
        start_time=STARTED,
        client_key="alice",
        client_addr="127.0.0.1:50514",
        method="POST",
        path="/anthropic/v1/messages",
        api="anthropic",
        status=200,
        outcome="complete",
        origin="upstream",
        bytes_in=104233,
        bytes_out=8812,
        ttfb=0.4123,
        duration=9.311,
        request_model="claude-sonnet-4-5",
        model="claude-sonnet-4-5-20250929",
        input_tokens=31877,
        output_tokens=402,
        upstream_request_id="apim-7d1c",
        user_agent="claude-cli/2.0.14 (external, cli)",
    )
    return dataclasses.replace(rec, **changes)


def bare_record() -> ExchangeRecord:
    """A request the proxy answered itself, before anything was known about it."""
    return exchange_record(
        request_id="3f9a1c-2b",
        start_time=STARTED,
        client_key="rejected",
        client_addr="",
        method="GET",
        path="/x",
        status=0,
        outcome="rejected",
        origin="proxy",
        duration=0.0004,
    )


@pytest.fixture
def configured(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``configure_logging`` for real, into ``tmp_path``; the loggers are put back afterwards."""
    names = ("claude_proxy", ACCESS, "azure")
    saved = {
        n: (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
        for n, lg in ((n, logging.getLogger(n)) for n in names)
    }

    def configure(**settings: Any) -> Path:
        configure_logging(LoggingConfig(log_path=str(tmp_path), **settings))
        return tmp_path

    yield configure
    for handler in list(logs._installed):
        handler.close()
    logs._installed.clear()
    logs._access_json = False
    for name, (handlers, level, propagate, disabled) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled


def lines(path: Path) -> list[str]:
    flush_handlers()
    return path.read_text().splitlines() if path.exists() else []


def test_access_json_has_exactly_the_fields_with_their_types(
    configured: Callable[..., Path],
) -> None:
    where = configured(access_format="json")
    log_access(full_record())
    log_access(bare_record())
    logging.getLogger("claude_proxy.server").info("not an access line")
    first, second, other = lines(where / "claude-proxy.log")
    full, bare = json.loads(first), json.loads(second)
    assert list(full) == JSON_FIELDS and list(bare) == JSON_FIELDS
    assert full == {
        "time": "2026-11-30T06:00:02.114Z",
        "request_id": "3f9a1c-2a",
        "client_key": "alice",
        "client_addr": "127.0.0.1:50514",
        "method": "POST",
        "path": "/anthropic/v1/messages",
        "status": 200,
        "outcome": "complete",
        "bytes_in": 104233,
        "bytes_out": 8812,
        "ttfb_ms": 412.3,
        "duration_ms": 9311.0,
        "model": "claude-sonnet-4-5-20250929",
        "input_tokens": 31877,
        "output_tokens": 402,
        "upstream_request_id": "apim-7d1c",
        "user_agent": "claude-cli/2.0.14 (external, cli)",
    }
    unknown = ["client_addr", "status", "ttfb_ms", "model", "input_tokens", "output_tokens"]
    assert {k for k, v in bare.items() if v is None} == {
        *unknown,
        "upstream_request_id",
        "user_agent",
    }
    assert bare["duration_ms"] == 0.4 and bare["outcome"] == "rejected"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", bare["time"])
    assert first.startswith("{") and first.endswith("}")  # the bare object is the whole line
    assert other.endswith(" INFO claude_proxy.server: not an access line")


def test_json_model_falls_back_to_the_request_model(configured: Callable[..., Path]) -> None:
    where = configured(access_format="json")
    log_access(full_record(model=None, outcome="client_aborted", input_tokens=None))
    (line,) = lines(where / "claude-proxy.log")
    assert json.loads(line)["model"] == "claude-sonnet-4-5"


def test_access_text_line(configured: Callable[..., Path]) -> None:
    where = configured()
    log_access(full_record())
    log_access(bare_record())
    log_access(full_record(user_agent='odd "agent"\\x', upstream_request_id=None))
    full, bare, odd = lines(where / "claude-proxy.log")
    assert full.endswith(
        ' INFO claude_proxy.access: 3f9a1c-2a alice "POST /anthropic/v1/messages" 200'
        " in=104233 out=8812 ttfb=412.3ms dur=9311.0ms"
        " model=claude-sonnet-4-5-20250929 tokens_in=31877 tokens_out=402"
        ' outcome=complete client=127.0.0.1:50514 ua="claude-cli/2.0.14 (external, cli)"'
        " upstream_id=apim-7d1c"
    ), full
    assert bare.endswith(
        ' 3f9a1c-2b rejected "GET /x" 0 in=0 out=0 ttfb=-1.0ms dur=0.4ms'
        " outcome=rejected client=- ua=- upstream_id=-"
    ), bare
    assert odd.endswith(' ua="odd \\"agent\\"\\\\x" upstream_id=-'), odd


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_exchange_rides_on_the_record(configured: Callable[..., Path]) -> None:
    configured(access_format="json")
    keep = Keep()
    logging.getLogger(ACCESS).addHandler(keep)
    rec = full_record()
    log_access(rec)
    logging.getLogger(ACCESS).removeHandler(keep)
    (record,) = keep.records
    assert record.exchange is rec  # type: ignore[attr-defined]
    assert record.client_key == "alice" and record.request_id == "3f9a1c-2a"  # type: ignore[attr-defined]


def test_access_log_in_its_own_file(configured: Callable[..., Path], tmp_path: Path) -> None:
    access_dir = tmp_path / "access"
    where = configured(access_log_path=str(access_dir), access_format="json")
    log_access(full_record())
    logging.getLogger("claude_proxy.server").warning("the rest")
    (line,) = lines(access_dir / "claude-proxy-access.log")
    assert json.loads(line)["request_id"] == "3f9a1c-2a"
    (rest,) = lines(where / "claude-proxy.log")
    assert rest.endswith("WARNING claude_proxy.server: the rest")


def test_secret_in_an_access_line_is_redacted(configured: Callable[..., Path]) -> None:
    where = configured(access_format="json")
    log_access(full_record(user_agent=f"agent {SECRET}"))
    (line,) = lines(where / "claude-proxy.log")
    assert json.loads(line)["user_agent"] == "agent <redacted>"


def test_access_log_off(configured: Callable[..., Path]) -> None:
    where = configured(access_log=False)
    log_access(full_record())
    assert lines(where / "claude-proxy.log") == []


# ----------------------------------------------------------------- files


def test_hourly_rotation_keeps_backup_count_files(configured: Callable[..., Path]) -> None:
    where = configured(rotation="hourly", backup_count=2)
    handler = logs._installed[0]
    assert isinstance(handler, logs.BufferedTimedRotatingFileHandler)
    hour = next_hour(time.time()) - 10 * 3600
    log = logging.getLogger("claude_proxy.server")
    for n in range(5):
        handler.rolloverAt = hour + n * 3600  # that hour's end has passed: the next line rotates
        log.warning("line %d", n)
    rotated = sorted(p.name for p in where.iterdir() if p.name != "claude-proxy.log")
    expected = [
        "claude-proxy." + time.strftime("%Y-%m-%d-%H", time.localtime(hour + k * 3600)) + ".log"
        for k in (2, 3)
    ]
    assert rotated == expected
    assert [line.split()[-1] for line in lines(where / rotated[-1])] == ["3"]
    assert [line.split()[-1] for line in lines(where / "claude-proxy.log")] == ["4"]


@pytest.mark.parametrize("backups", [0, 3])
def test_daily_rotation_count(configured: Callable[..., Path], backups: int) -> None:
    where = configured(rotation="daily", backup_count=backups)
    handler = logs._installed[0]
    assert isinstance(handler, logs.BufferedTimedRotatingFileHandler)
    start = time.time() - 20 * 86400
    for n in range(6):
        handler.rolloverAt = int(start + n * 86400)
        logging.getLogger("claude_proxy.server").warning("line %d", n)
    rotated = [p for p in where.iterdir() if p.name != "claude-proxy.log"]
    assert len(rotated) == (backups or 6)  # the first rotation moves the empty file


def test_hourly_rotation_is_on_the_hour(tmp_path: Path) -> None:
    path = tmp_path / "claude-proxy.log"
    path.write_text("old\n")
    written = time.time() - 1000  # the file was last written 16 min 40 s ago
    os.utime(path, (written, written))
    handler = file_handler(LoggingConfig(log_path=str(tmp_path), rotation="hourly"))
    try:
        assert isinstance(handler, logs.BufferedTimedRotatingFileHandler)
        at = time.localtime(handler.rolloverAt)
        assert (at.tm_min, at.tm_sec) == (0, 0)
        assert 0 < handler.rolloverAt - int(written) <= 3600
    finally:
        handler.close()


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (0, 3600),
        (3599.9, 3600),
        (3600, 7200),
        (1_796_018_402.114, 1_796_022_000),  # 06:00:02 -> 07:00:00
    ],
)
def test_next_hour_utc(when: float, expected: int) -> None:
    assert next_hour(when, utc=True) == expected


def test_reopen_after_the_file_was_moved_away(configured: Callable[..., Path]) -> None:
    where = configured(access_log_path=None, rotation="never")
    log = logging.getLogger("claude_proxy.server")
    log.warning("before")
    (where / "claude-proxy.log").rename(where / "claude-proxy.log.1")  # as logrotate does
    log.warning("still into the moved file")
    reopen_logs()
    log.warning("after")
    assert [line.split(": ")[-1] for line in lines(where / "claude-proxy.log")] == ["after"]
    moved = [line.split(": ")[-1] for line in lines(where / "claude-proxy.log.1")]
    assert moved == ["before", "still into the moved file"]


def test_reopen_reaches_the_access_file_too(
    configured: Callable[..., Path], tmp_path: Path
) -> None:
    configured(access_log_path=str(tmp_path / "a"), rotation="daily")
    log_access(full_record())
    flush_handlers()
    (tmp_path / "a" / "claude-proxy-access.log").rename(tmp_path / "a" / "moved.log")
    reopen_logs()
    log_access(bare_record())
    (line,) = lines(tmp_path / "a" / "claude-proxy-access.log")
    assert " 3f9a1c-2b rejected " in line
