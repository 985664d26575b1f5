"""Errors, and how a proxy-made error becomes a response the calling SDK can read.

The tree::

    ClaudeProxyError
    ├── ConfigError                 configuration cannot be used (exit code 2)
    └── ProxyError                  a request the proxy answers itself
        ├── BadRequest              400: malformed request, forward-proxy attempts
        ├── Unauthorized            401: missing or wrong client key
        ├── HeadersTooLarge         431 / 414: request head over the limits
        ├── UpstreamUnavailable     502: upstream refused, reset or spoke garbage
        ├── CredentialUnavailable   503: no valid upstream token can be had
        └── UpstreamTimeout         504: connect or idle timeout

Rendering is pure: :func:`render_error` returns the bytes of a whole response.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import ClassVar, Literal

Family = Literal["anthropic", "openai"]


class ClaudeProxyError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ClaudeProxyError):
    """The configuration cannot be used; the message names the key and the fix."""


class ProxyError(ClaudeProxyError):
    """A request the proxy answers itself, with ``status`` and an API error kind."""

    status: ClassVar[int] = 500
    anthropic_type: ClassVar[str] = "api_error"
    openai_type: ClassVar[str] = "api_error"
    openai_code: ClassVar[str | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ProxyError):
    status = 400
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    anthropic_type = "authentication_error"
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"


class HeadersTooLarge(ProxyError):
    status = 431
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"


class UriTooLong(HeadersTooLarge):
    status = 414


class UpstreamUnavailable(ProxyError):
    status = 502


class CredentialUnavailable(ProxyError):
    status = 503
    openai_code = "upstream_credential_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    openai_code = "upstream_timeout"


def error_body(error: ProxyError, family: Family) -> bytes:
    """The JSON body in the shape the Anthropic or OpenAI SDK shows to its user."""
    if family == "anthropic":
        doc: dict[str, object] = {
            "type": "error",
            "error": {"type": error.anthropic_type, "message": error.message},
        }
    else:
        doc = {
            "error": {
                "message": error.message,
                "type": error.openai_type,
                "param": None,
                "code": error.openai_code,
            }
        }
    return json.dumps(doc, separators=(",", ":")).encode()


def render_error(error: ProxyError, family: Family, *, close: bool) -> bytes:
    """A complete HTTP/1.1 response for ``error``; ``close`` adds ``connection: close``."""
    body = error_body(error, family)
    head = [
        b"HTTP/1.1 %d %s\r\n" % (error.status, HTTPStatus(error.status).phrase.encode()),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
    ]
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


def family_of(path: bytes, has_anthropic_version: bool) -> Family:
    """Which API a request speaks, to shape its errors: Anthropic routes or anything else."""
    if has_anthropic_version or b"anthropic" in path or b"/v1/messages" in path:
        return "anthropic"
    return "openai"
