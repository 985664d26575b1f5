"""Generated cases: what the upstream receives equals what the client sent, byte for byte
(bar hop-by-hop headers, Host and the credential), and the same on the way back."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    RawUpstream,
    raw_connect,
    read_response,
)

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
RESERVED = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-authorization",
    "proxy-connection",
    "proxy-authenticate",
    "authorization",
    "x-api-key",
    "api-key",
}

names = st.text(TOKEN_CHARS, min_size=1, max_size=30).filter(lambda n: n.lower() not in RESERVED)
# Field values: visible ASCII and obs-text, inner spaces and tabs, no leading/trailing white space.
value_chars = st.sampled_from([chr(c) for c in range(0x21, 0x7F)] + [" ", "\t", "\x80", "\xff"])
values = st.text(value_chars, max_size=60).map(lambda v: v.strip(" \t"))
header_lists = st.lists(st.tuples(names, values), max_size=12)
path_chars = st.sampled_from([*list("abcXYZ019-._~!$&'()*+,;=:@/%"), "%2F", "%2e", "..", "//"])
targets = st.tuples(
    st.lists(path_chars, max_size=20).map("".join),
    st.one_of(st.none(), st.text(st.sampled_from(list("abc=&%20?/+;:@,$!*'()")), max_size=30)),
).map(lambda t: "/" + t[0] + ("" if t[1] is None else "?" + t[1]))
bodies = st.one_of(
    st.binary(max_size=2000),
    st.integers(0, 300_000).map(lambda n: bytes(i % 251 for i in range(n))),
)
credential_headers = st.sampled_from(
    [("x-api-key", CLIENT_KEY), ("api-key", CLIENT_KEY), ("Authorization", f"Bearer {CLIENT_KEY}")]
)


def encode_body(body: bytes, chunked: bool, sizes: list[int]) -> bytes:
    if not chunked:
        return body
    out, i, k = [], 0, 0
    while i < len(body):
        part = body[i : i + sizes[k % len(sizes)]]
        out.append(b"%x\r\n%b\r\n" % (len(part), part))
        n = len(part)
        i, k = i + n, k + 1
    return b"".join(out) + b"0\r\n\r\n"


class Scenario:
    def __init__(self) -> None:
        self.response = b""


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["POST", "PUT", "PATCH", "DELETE", "GET"]),
    target=targets,
    headers=header_lists,
    cred=credential_headers,
    cred_at=st.integers(0, 12),
    body=bodies,
    chunked=st.booleans(),
    sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=4),
)
def test_request_reaches_upstream_byte_exact(
    upstream: RawUpstream,
    make_proxy: Any,
    method: str,
    target: str,
    headers: list,
    cred: tuple[str, str],
    cred_at: int,
    body: bytes,
    chunked: bool,
    sizes: list[int],
) -> None:
    proxy = getattr(upstream, "_proxy", None) or make_proxy(upstream.url + "/pre")
    upstream._proxy = proxy  # type: ignore[attr-defined]
    upstream.reset()
    hs = [("Host", "client.example"), *headers]
    hs.insert(min(cred_at, len(hs)), cred)
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body)))
    head = f"{method} {target} HTTP/1.1\r\n".encode()
    head += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in [*hs, framing]) + b"\r\n"
    with raw_connect(proxy.port) as sock:
        sock.sendall(head + encode_body(body, chunked, sizes))
        resp = read_response(sock)
    assert resp.status == 200
    (rec,) = upstream.requests
    assert rec.method == method.encode()
    assert rec.target == b"/pre" + target.encode()
    assert rec.body == body
    cred_value = UPSTREAM_KEY if cred[0] != "Authorization" else f"Bearer {UPSTREAM_KEY}"
    expected = [
        ("Host", f"127.0.0.1:{upstream.port}")
        if (k, v) == ("Host", "client.example")
        else (k, cred_value)
        if (k, v) == cred
        else (k, v)
        for k, v in hs
    ]
    expected.append(framing)
    assert rec.headers == [(k.encode("latin-1"), v.encode("latin-1")) for k, v in expected]


codings = st.sampled_from(["identity", "gzip", "deflate", "br"])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    status=st.sampled_from([200, 201, 400, 404, 429, 500, 529]),
    reason=st.text(st.sampled_from(list("abcXYZ -_")), max_size=20).map(str.strip),
    headers=header_lists,
    body=bodies,
    coding=codings,
    chunked=st.booleans(),
    sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=4),
)
def test_response_reaches_client_byte_exact(
    make_upstream: Any,
    make_proxy: Any,
    status: int,
    reason: str,
    headers: list,
    body: bytes,
    coding: str,
    chunked: bool,
    sizes: list[int],
) -> None:
    scenario = TEST_STATE.setdefault("scenario", Scenario())
    if "proxy" not in TEST_STATE or TEST_STATE["owner"] is not make_proxy:
        up = make_upstream(lambda rec: [scenario.response])
        TEST_STATE.update(proxy=make_proxy(up.url), owner=make_proxy)
    proxy = TEST_STATE["proxy"]
    if coding == "gzip":
        body = gzip.compress(body)
    elif coding == "deflate":
        body = zlib.compress(body)
    hs = list(headers)
    if coding != "identity":
        hs.append(("Content-Encoding", coding))
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body)))
    hs.append(framing)
    head = f"HTTP/1.1 {status} {reason}\r\n".encode()
    head += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in hs) + b"\r\n"
    scenario.response = head + encode_body(body, chunked, sizes)
    with raw_connect(proxy.port) as sock:
        sock.sendall(
            b"POST /x HTTP/1.1\r\nHost: h\r\nx-api-key: "
            + CLIENT_KEY.encode()
            + b"\r\nContent-Length: 0\r\n\r\n"
        )
        resp = read_response(sock)
    assert resp.complete
    assert (resp.status, resp.reason) == (status, reason.encode())
    assert resp.body == body
    assert resp.headers == [(k.encode("latin-1"), v.encode("latin-1")) for k, v in hs]


TEST_STATE: dict[str, Any] = {}
