"""Logging: secrets redacted everywhere a record prints, the access line in both formats,
files rotated and reopened. Real loggers and handlers throughout."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from claude_proxy.logs import FORMAT, RedactSecrets, SecondCachingFormatter, register_secret

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
