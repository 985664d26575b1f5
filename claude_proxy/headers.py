"""Header rewriting on bytes, done once per request and once per response.

Pure functions: the request head sent upstream and the response head sent back to the client are
built here from the parsed headers, keeping names, values and order, and dropping only hop-by-hop
headers, the client's credentials (when replaced) and ``Host`` (replaced in place).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Headers = Sequence[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",  # end to end, but only meaningful while the body stays chunked: kept then
        b"transfer-encoding",
        b"upgrade",
    }
)
# Connection may name further hop-by-hop fields (RFC 9110 §7.6.1), but never the fields that
# frame or route the message: honouring ``Connection: content-length`` would forward a body
# without its length, which the next hop reads as a second request (request smuggling).
NEVER_HOP_BY_HOP = frozenset({b"content-length", b"transfer-encoding", b"host"})
# Kept, as the client or upstream sent them, exactly when the body is relayed chunked.
_CHUNKED_ONLY = frozenset({b"transfer-encoding", b"trailer"})
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"api-key"})
# The proxy answers ``Expect: 100-continue`` itself, once the client is authenticated.
_REQUEST_DROP = HOP_BY_HOP | {b"expect", b"host"}


@dataclass(frozen=True, slots=True)
class UpstreamCredential:
    """What goes upstream instead of the client's key.

    ``api_key``: the key replaces the client's key in each header the client used.
    ``bearer``: every client credential header goes, ``Authorization: Bearer <value>`` comes.
    """

    kind: Literal["api_key", "bearer"]
    value: bytes

    def __repr__(self) -> str:
        return f"UpstreamCredential(kind={self.kind!r}, value=<redacted>)"


@dataclass(slots=True)
class HeaderScan:
    """What one pass over a message's headers finds; every name is lower-cased once."""

    lnames: list[bytes]
    connection: frozenset[bytes]  # names listed in Connection: hop-by-hop for this message
    chunked: bool
    transfer_encoding: bool  # any Transfer-Encoding line at all
    content_length: int | None
    hosts: int  # how many Host lines
    expect: bytes | None
    anthropic_version: bool
    content_type: bytes
    content_encoding: bytes
    request_id: bytes | None = None  # apim-request-id, x-request-id or request-id (responses)
    user_agent: bytes | None = None
    traceparent: bytes | None = None


_SCANNED = frozenset(
    {
        b"connection",
        b"transfer-encoding",
        b"content-length",
        b"expect",
        b"anthropic-version",
        b"content-type",
        b"content-encoding",
        b"host",
        b"apim-request-id",
        b"x-request-id",
        b"request-id",
        b"user-agent",
        b"traceparent",
    }
)


def scan(headers: Headers) -> HeaderScan:
    lnames: list[bytes] = []
    connection: set[bytes] = set()
    found = HeaderScan(lnames, frozenset(), False, False, None, 0, None, False, b"", b"")
    for name, value in headers:
        lname = name.lower()
        lnames.append(lname)
        if lname not in _SCANNED:
            continue
        if lname == b"connection":
            connection.update(t.strip().lower() for t in value.split(b","))
        elif lname == b"transfer-encoding":
            found.transfer_encoding = True
            found.chunked = value.strip().lower().endswith(b"chunked")
        elif lname == b"content-length":
            found.content_length = int(value)
        elif lname == b"host":
            found.hosts += 1
        elif lname == b"expect":
            found.expect = value.strip().lower()
        elif lname == b"anthropic-version":
            found.anthropic_version = True
        elif lname == b"content-type":
            found.content_type = value.strip().lower()
        elif lname == b"content-encoding":
            found.content_encoding = value.strip().lower()
        elif lname == b"user-agent":
            found.user_agent = value
        elif lname == b"traceparent":
            found.traceparent = value.strip()
        elif found.request_id is None or lname == b"apim-request-id":
            found.request_id = value.strip()
    if connection:
        connection.discard(b"")
        found.connection = frozenset(connection - NEVER_HOP_BY_HOP)
    return found


def _credential_line(name: bytes, lname: bytes, cred: UpstreamCredential) -> bytes:
    if lname == b"authorization":
        return name + b": Bearer " + cred.value + b"\r\n"
    return name + b": " + cred.value + b"\r\n"


def upstream_request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    *,
    host: bytes,
    prefix: bytes,
    credential: UpstreamCredential | None,
    chunked: bool,
    default_header: bytes = b"Authorization",
    scanned: HeaderScan | None = None,
    traceparent: bytes | None = None,
) -> bytes:
    """The request head sent upstream.

    ``target`` is the client's raw origin-form target, appended to ``prefix`` untouched.
    ``credential`` None means passthrough: the client's own headers go as they are.
    An API key goes in the header(s) the client used, or in ``default_header`` when the client
    used none (no client keys configured).
    ``chunked`` keeps the client's ``Transfer-Encoding`` and ``Trailer`` lines: the body is
    re-chunked and its trailers follow it.
    ``scanned``: the headers' :func:`scan`, when the caller has it already.
    ``traceparent``: a W3C trace context to send instead of the client's (telemetry with
    ``propagate``): the first ``traceparent`` line's value is replaced in place, any further
    one dropped, and one is added when the client sent none.
    """
    scanned = scanned or scan(headers)
    drop = _REQUEST_DROP | scanned.connection if scanned.connection else _REQUEST_DROP
    trace_written = False
    lines = [method, b" ", prefix, target, b" HTTP/1.1\r\n"]
    host_written = False
    cred_written = credential is None
    for (name, value), lname in zip(headers, scanned.lnames, strict=True):
        if lname in drop:
            if lname == b"host" and not host_written:
                lines.append(name + b": " + host + b"\r\n")
                host_written = True
            elif chunked and lname in _CHUNKED_ONLY:
                lines.append(name + b": " + value + b"\r\n")
            continue
        if credential is not None and lname in CREDENTIAL_HEADERS:
            if credential.kind == "api_key":
                lines.append(_credential_line(name, lname, credential))
            elif not cred_written:
                lines.append(b"Authorization: Bearer " + credential.value + b"\r\n")
            cred_written = True
            continue
        if traceparent is not None and lname == b"traceparent":
            if not trace_written:  # the first one carries ours; any further one goes
                lines.append(name + b": " + traceparent + b"\r\n")
                trace_written = True
            continue
        lines.append(name + b": " + value + b"\r\n")
    if traceparent is not None and not trace_written:
        lines.append(b"traceparent: " + traceparent + b"\r\n")
    if not host_written:
        lines.insert(5, b"Host: " + host + b"\r\n")
    if not cred_written and credential is not None:
        name = default_header if credential.kind == "api_key" else b"Authorization"
        lines.append(_credential_line(name, name.lower(), credential))
    lines.append(b"\r\n")
    return b"".join(lines)


def client_response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    *,
    chunked: bool,
    close: bool,
    keep_alive_10: bool = False,
    scanned: HeaderScan | None = None,
) -> bytes:
    """The response head sent to the client: the upstream's, less hop-by-hop headers.

    ``chunked`` keeps the upstream's ``Transfer-Encoding`` and ``Trailer`` lines (the body is
    re-chunked, trailers relayed); ``close`` announces that the proxy closes the client
    connection after this response; ``keep_alive_10`` announces that it does not, to an
    HTTP/1.0 client, which would otherwise assume it does (RFC 9112 §9.3).
    """
    scanned = scanned or scan(headers)
    drop = HOP_BY_HOP | scanned.connection if scanned.connection else HOP_BY_HOP
    lines = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    for (name, value), lname in zip(headers, scanned.lnames, strict=True):
        if lname in drop:
            if chunked and lname in _CHUNKED_ONLY:
                lines.append(name + b": " + value + b"\r\n")
            continue
        lines.append(name + b": " + value + b"\r\n")
    if close:
        lines.append(b"connection: close\r\n")
    elif keep_alive_10:
        lines.append(b"connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def trailer_block(trailers: Headers) -> bytes:
    """The last chunk of a re-chunked body, with its trailer fields (RFC 9112 §7.1.2)."""
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(b"%b: %b\r\n" % pair for pair in trailers) + b"\r\n"


def interim_response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """A 1xx response (103 Early Hints and the like), relayed as it came."""
    return client_response_head(status, reason, headers, chunked=False, close=False)
