"""Errors by cause, and how a proxy-made error becomes a response the calling SDK acts on.

The tree (httpx style: a class per cause, each knowing its status, its metric kind and whether
retrying can help)::

    ClaudeProxyError
    ├── ConfigError                     configuration cannot be used (exit code 2)
    └── ProxyError                      a request the proxy answers itself
        ├── ClientError                 the request itself is at fault (never retried)
        │   ├── BadRequest              400  malformed request, forward-proxy attempts
        │   ├── Unauthorized            401  missing or wrong client key
        │   ├── Forbidden               403  a key or user not allowed this
        │   ├── ClientIdle              408  the client stopped sending its request
        │   ├── PayloadTooLarge         413  a body over what the proxy must hold
        │   └── HeadersTooLarge         431  request head over the limits
        │       └── UriTooLong          414
        ├── UpstreamError               the upstream could not be used (retry helps)
        │   ├── UpstreamConnectError    502  refused, unreachable, TLS failure
        │   ├── UpstreamClosed          502  closed before a response
        │   ├── UpstreamProtocolError   502  spoke something that is not HTTP/1.1
        │   ├── UpstreamConnectTimeout  504  no connection within connect_timeout
        │   └── UpstreamIdle            504  sent nothing for idle_timeout
        ├── UpstreamsResting            429  every upstream for it is cooling down (failover)
        ├── CredentialUnavailable       503  no valid upstream token (retry helps unless a
        │                                    person must act: az login, a role, a tenant)
        └── InternalError               500  a bug in the proxy; logged with its traceback

Every rendered error carries ``x-should-retry`` (which the Anthropic and OpenAI SDKs, and so
Claude Code and Codex, honour over their own rules) and, when retrying helps, ``retry-after``.
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
    """A request the proxy answers itself.

    ``status``: the HTTP status; ``kind``: the upstream-error metric label, or None when the
    upstream is not at fault; ``should_retry``: sent as ``x-should-retry``; ``retry_after``:
    seconds, sent as ``retry-after`` when retrying helps.
    """

    status: ClassVar[int] = 500
    kind: ClassVar[str | None] = None
    should_retry: bool = False
    retry_after: int | None = None
    anthropic_type: ClassVar[str] = "api_error"
    openai_type: ClassVar[str] = "api_error"
    openai_code: ClassVar[str | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientError(ProxyError):
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"


class BadRequest(ClientError):
    status = 400


class Unauthorized(ClientError):
    status = 401
    anthropic_type = "authentication_error"
    openai_code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    anthropic_type = "permission_error"
    openai_type = "permission_error"


class ClientIdle(ClientError):
    status = 408
    openai_code = "request_timeout"


class PayloadTooLarge(ClientError):
    status = 413


class HeadersTooLarge(ClientError):
    status = 431


class UriTooLong(HeadersTooLarge):
    status = 414


class UpstreamError(ProxyError):
    """The upstream could not be used; a retry may find it working."""

    status = 502
    kind = "closed"
    should_retry = True
    retry_after = 1


class UpstreamConnectError(UpstreamError):
    kind = "connect_refused"


class UpstreamClosed(UpstreamError):
    kind = "closed"


class UpstreamProtocolError(UpstreamError):
    kind = "malformed"


class UpstreamConnectTimeout(UpstreamError):
    status = 504
    kind = "connect_timeout"
    openai_code = "upstream_timeout"


class UpstreamIdle(UpstreamError):
    status = 504
    kind = "idle_timeout"
    openai_code = "upstream_timeout"


class UpstreamsResting(ProxyError):
    """Every upstream that could serve the request is cooling down after a 429 or 503, or
    has its circuit open: nothing was sent. ``retry_after``: when the first comes back."""

    status = 429
    kind = "resting"
    should_retry = True
    anthropic_type = "rate_limit_error"
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CredentialUnavailable(ProxyError):
    """No valid upstream token. ``needs_person``: retrying cannot fix it (run ``az login``,
    grant a role, fix the tenant), so clients are told not to retry."""

    status = 503
    kind = "credential"
    openai_code = "upstream_credential_unavailable"

    def __init__(self, message: str, *, needs_person: bool = False, retry_after: int = 5) -> None:
        super().__init__(message)
        self.should_retry = not needs_person
        self.retry_after = None if needs_person else retry_after


class InternalError(ProxyError):
    status = 500  # the proxy's own fault, not the upstream's: no upstream-error kind


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


def render_error(
    error: ProxyError,
    family: Family,
    *,
    close: bool,
    head_request: bool = False,
    keep_alive_10: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response for ``error``; ``close`` adds ``connection: close``,
    ``keep_alive_10`` adds ``connection: keep-alive`` (an HTTP/1.0 client assumes a close
    unless told otherwise, RFC 9112 §9.3).

    The answer to a HEAD request has the same head and no body (RFC 9110 §9.3.2): a body
    there would be read by the client as the start of the next response.
    """
    body = error_body(error, family)
    head = [
        b"HTTP/1.1 %d %s\r\n" % (error.status, HTTPStatus(error.status).phrase.encode()),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-should-retry: true\r\n" if error.should_retry else b"x-should-retry: false\r\n",
    ]
    if error.should_retry and error.retry_after is not None:
        head.append(b"retry-after: %d\r\n" % error.retry_after)
    if close:
        head.append(b"connection: close\r\n")
    elif keep_alive_10:
        head.append(b"connection: keep-alive\r\n")
    head.append(b"\r\n")
    if head_request:
        return b"".join(head)
    return b"".join(head) + body


def family_of(path: bytes, has_anthropic_version: bool) -> Family:
    """Which API a request speaks, to shape its errors: Anthropic routes or anything else."""
    if has_anthropic_version or b"anthropic" in path or b"/v1/messages" in path:
        return "anthropic"
    return "openai"
