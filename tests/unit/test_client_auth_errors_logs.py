from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from claude_proxy.client_auth import OPEN, KeyRing, authenticate, presented
from claude_proxy.config import ClientKey, LoggingConfig
from claude_proxy.errors import (
    BadRequest,
    CredentialUnavailable,
    Unauthorized,
    UpstreamClosed,
    UpstreamIdle,
    error_body,
    family_of,
    render_error,
)
from claude_proxy.logs import RedactSecrets, file_handler, register_secret, rotated_name

RING = KeyRing([ClientKey("alice", "key-a"), ClientKey("bob", "key-b")])


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-api-key", b"key-a")], "alice"),
        ([(b"X-Api-Key", b"key-b")], "bob"),
        ([(b"api-key", b"key-b")], "bob"),
        ([(b"Authorization", b"Bearer key-a")], "alice"),
        ([(b"authorization", b"bearer  key-a ")], "alice"),
        ([(b"x-api-key", b"wrong"), (b"authorization", b"Bearer key-b")], "bob"),
        ([(b"content-type", b"x")], None),  # no key at all: passthrough
        ([], None),
    ],
)
def test_authenticate_accepts(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert authenticate(presented(headers), RING, passthrough=True) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-api-key", b"key-")],
        [(b"x-api-key", b"key-aa")],
        [(b"x-api-key", b"")],
        [(b"Authorization", b"Basic a2V5LWE=")],
        [(b"Authorization", b"Bearer")],
        [(b"api-key", b"KEY-A")],
    ],
)
def test_authenticate_rejects(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Unauthorized):
        authenticate(presented(headers), RING, passthrough=True)


def test_passthrough_off_rejects_keyless() -> None:
    with pytest.raises(Unauthorized, match="No API key"):
        authenticate(presented([]), RING, passthrough=False)


def test_no_keys_configured_is_open() -> None:
    assert authenticate(presented([(b"x-api-key", b"anything")]), KeyRing([]), True) == OPEN


def test_keyring_holds_no_plain_keys() -> None:
    assert "key-a" not in repr(RING)
    assert "alice" in repr(RING)


# ----------------------------------------------------------------- error shapes


@pytest.mark.parametrize(
    ("error", "status", "atype"),
    [
        (BadRequest("m"), 400, "invalid_request_error"),
        (Unauthorized("m"), 401, "authentication_error"),
        (UpstreamClosed("m"), 502, "api_error"),
        (CredentialUnavailable("m"), 503, "api_error"),
        (UpstreamIdle("m"), 504, "api_error"),
    ],
)
def test_error_shapes(error: Unauthorized, status: int, atype: str) -> None:
    anthropic = json.loads(error_body(error, "anthropic"))
    assert anthropic == {"type": "error", "error": {"type": atype, "message": "m"}}
    openai = json.loads(error_body(error, "openai"))
    assert set(openai["error"]) == {"message", "type", "param", "code"}
    assert openai["error"]["message"] == "m"
    raw = render_error(error, "openai", close=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"content-length: %d" % len(body) in head
    assert b"connection: close" in head


@pytest.mark.parametrize(
    ("path", "version", "family"),
    [
        (b"/anthropic/v1/messages", False, "anthropic"),
        (b"/v1/messages/count_tokens", False, "anthropic"),
        (b"/openai/v1/chat/completions", False, "openai"),
        (b"/v1/responses", False, "openai"),
        (b"/whatever", True, "anthropic"),
    ],
)
def test_family(path: bytes, version: bool, family: str) -> None:
    assert family_of(path, version) == family


# ----------------------------------------------------------------- logging


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/l/claude-proxy.log.2026-11-30", "/l/claude-proxy.2026-11-30.log"),
        ("/l/claude-proxy.log.2026-11-30-13", "/l/claude-proxy.2026-11-30-13.log"),
        ("/l/other", "/l/other"),
    ],
)
def test_rotated_name(given: str, expected: str) -> None:
    assert rotated_name(given) == expected


@pytest.mark.parametrize(
    ("rotation", "pattern"),
    [("daily", r"p\.\d{4}-\d\d-\d\d\.log"), ("hourly", r"p\.\d{4}-\d\d-\d\d-\d\d\.log")],
)
def test_rotation_writes_dated_files(tmp_path: Path, rotation: str, pattern: str) -> None:
    import re

    handler = file_handler(
        LoggingConfig(log_path=str(tmp_path), rotation=rotation, log_prefix="p")  # type: ignore[arg-type]
    )
    logger = logging.getLogger("test.rotation." + rotation)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before")
        handler.doRollover()  # type: ignore[attr-defined]
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "p.log" in names
    rotated = [n for n in names if n != "p.log"]
    assert len(rotated) == 1 and re.fullmatch(pattern, rotated[0]), names
    assert "before" in (tmp_path / rotated[0]).read_text()
    assert "after" in (tmp_path / "p.log").read_text()


def test_redaction_filter() -> None:
    register_secret("sekret-value-123")
    record = logging.LogRecord("x", logging.INFO, "f", 1, "got %s", ("sekret-value-123",), None)
    RedactSecrets().filter(record)
    assert record.getMessage() == "got <redacted>"
