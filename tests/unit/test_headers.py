from __future__ import annotations

import pytest

from claude_proxy.headers import (
    UpstreamCredential,
    client_response_head,
    scan,
    upstream_request_head,
)

KEY = UpstreamCredential("api_key", b"UPKEY")
TOKEN = UpstreamCredential("bearer", b"TOKEN")


def head(
    headers: list[tuple[bytes, bytes]],
    credential: UpstreamCredential | None = None,
    *,
    chunked: bool = False,
    prefix: bytes = b"",
    target: bytes = b"/v1/x?a=%2F",
) -> bytes:
    return upstream_request_head(
        b"POST",
        target,
        headers,
        host=b"up.example",
        prefix=prefix,
        credential=credential,
        chunked=chunked,
    )


def lines(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\r\n\r\n")
    return raw[:-4].split(b"\r\n")


def test_request_line_keeps_raw_target_and_prefix() -> None:
    assert lines(head([], prefix=b"/base"))[0] == b"POST /base/v1/x?a=%2F HTTP/1.1"
    assert lines(head([], target=b"/a/../b//c%2e"))[0] == b"POST /a/../b//c%2e HTTP/1.1"


def test_order_case_and_values_are_kept() -> None:
    headers = [
        (b"Host", b"proxy:8080"),
        (b"anthropic-beta", b"a-1,b-2"),
        (b"X-Custom-Thing", b"  odd  value"),
        (b"anthropic-version", b"2023-06-01"),
        (b"accept-encoding", b"gzip, br, zstd"),
    ]
    assert lines(head(headers))[1:] == [
        b"Host: up.example",
        b"anthropic-beta: a-1,b-2",
        b"X-Custom-Thing:   odd  value",
        b"anthropic-version: 2023-06-01",
        b"accept-encoding: gzip, br, zstd",
    ]


def test_missing_host_is_added_first() -> None:
    assert lines(head([(b"a", b"1")]))[1:] == [b"Host: up.example", b"a: 1"]


@pytest.mark.parametrize(
    "name",
    [
        b"Connection",
        b"Keep-Alive",
        b"Proxy-Authorization",
        b"Proxy-Connection",
        b"TE",
        b"Trailer",
        b"Upgrade",
        b"Expect",
        b"Transfer-Encoding",
    ],
)
def test_hop_by_hop_headers_are_dropped(name: bytes) -> None:
    out = head([(b"host", b"h"), (name, b"v"), (b"keep", b"me")])
    assert lines(out)[1:] == [b"host: up.example", b"keep: me"]


def test_connection_listed_headers_are_dropped() -> None:
    headers = [(b"Connection", b"keep-alive, X-Hop"), (b"x-hop", b"1"), (b"x-stay", b"2")]
    assert lines(head(headers))[1:] == [b"Host: up.example", b"x-stay: 2"]
    assert scan(headers).connection == {b"keep-alive", b"x-hop"}


def test_chunked_framing_line_is_kept_when_rechunking() -> None:
    headers = [(b"Transfer-Encoding", b"chunked"), (b"a", b"1")]
    assert lines(head(headers, chunked=True))[1:] == [
        b"Host: up.example",
        b"Transfer-Encoding: chunked",
        b"a: 1",
    ]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ([(b"x-api-key", b"client")], [b"x-api-key: UPKEY"]),
        ([(b"API-Key", b"client")], [b"API-Key: UPKEY"]),
        ([(b"Authorization", b"Bearer client")], [b"Authorization: Bearer UPKEY"]),
        (
            [(b"x-api-key", b"client"), (b"authorization", b"Bearer client")],
            [b"x-api-key: UPKEY", b"authorization: Bearer UPKEY"],
        ),
    ],
)
def test_api_key_goes_in_the_headers_the_client_used(
    client: list[tuple[bytes, bytes]], expected: list[bytes]
) -> None:
    assert lines(head([(b"a", b"1"), *client, (b"z", b"2")], KEY))[1:] == [
        b"Host: up.example",
        b"a: 1",
        *expected,
        b"z: 2",
    ]


@pytest.mark.parametrize(
    "client",
    [
        [],
        [(b"x-api-key", b"client")],
        [(b"x-api-key", b"c"), (b"api-key", b"c"), (b"Authorization", b"Bearer c")],
    ],
)
def test_bearer_replaces_every_client_credential_once(client: list[tuple[bytes, bytes]]) -> None:
    out = lines(head([(b"a", b"1"), *client], TOKEN))
    creds = [line for line in out if b"Bearer" in line or b"api-key" in line.lower()]
    assert creds == [b"Authorization: Bearer TOKEN"]
    assert b"client" not in b"".join(out)


@pytest.mark.parametrize(
    ("default", "line"),
    [(b"Authorization", b"Authorization: Bearer UPKEY"), (b"x-api-key", b"x-api-key: UPKEY")],
)
def test_api_key_without_client_header_uses_default(default: bytes, line: bytes) -> None:
    out = upstream_request_head(
        b"GET",
        b"/",
        [(b"a", b"1")],
        host=b"h",
        prefix=b"",
        credential=KEY,
        chunked=False,
        default_header=default,
    )
    assert lines(out)[1:] == [b"Host: h", b"a: 1", line]


def test_passthrough_keeps_client_headers() -> None:
    headers = [(b"x-api-key", b"theirs"), (b"Authorization", b"Basic abc")]
    assert lines(head(headers, None))[1:] == [
        b"Host: up.example",
        b"x-api-key: theirs",
        b"Authorization: Basic abc",
    ]


def test_response_head() -> None:
    headers = [
        (b"Content-Type", b"text/event-stream"),
        (b"Connection", b"keep-alive, X-Up"),
        (b"x-up", b"drop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"request-id", b"req_1"),
        (b"Content-Encoding", b"gzip"),
    ]
    out = client_response_head(200, b"OK", headers, chunked=True, close=False)
    assert lines(out) == [
        b"HTTP/1.1 200 OK",
        b"Content-Type: text/event-stream",
        b"Transfer-Encoding: chunked",
        b"request-id: req_1",
        b"Content-Encoding: gzip",
    ]
    out = client_response_head(404, b"Nope", headers[:1], chunked=False, close=True)
    assert lines(out) == [
        b"HTTP/1.1 404 Nope",
        b"Content-Type: text/event-stream",
        b"connection: close",
    ]


@pytest.mark.parametrize(
    ("headers", "chunked", "length"),
    [
        ([(b"Transfer-Encoding", b"chunked")], True, None),
        ([(b"transfer-encoding", b"gzip, chunked")], True, None),
        ([(b"Content-Length", b"12")], False, 12),
        ([], False, None),
    ],
)
def test_framing(headers: list[tuple[bytes, bytes]], chunked: bool, length: int | None) -> None:
    found = scan(headers)
    assert found.chunked is chunked
    assert found.content_length == length


def test_credential_repr_hides_value() -> None:
    assert b"UPKEY".decode() not in repr(KEY)


# ----------------------------------------------------------------- property: any header set

import httptools  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_names = st.one_of(
    st.sampled_from(
        [
            "Host",
            "Connection",
            "connection",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Upgrade",
            "Proxy-Authorization",
            "Expect",
            "x-api-key",
            "API-KEY",
            "Authorization",
            "Transfer-Encoding",
            "X-Hop",
            "anthropic-beta",
        ]
    ),
    st.text(_TOKEN, min_size=1, max_size=12),
).map(str.encode)
_values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(
    str.encode
)


class _Collect:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_url(self, url: bytes) -> None:
        self.url += url


@given(
    headers=st.lists(st.tuples(_names, _values), max_size=15),
    credential=st.sampled_from([None, KEY, TOKEN]),
)
def test_rewritten_head_is_always_valid_and_clean(
    headers: list[tuple[bytes, bytes]], credential: UpstreamCredential | None
) -> None:
    out = upstream_request_head(
        b"POST",
        b"/x?y=1",
        headers,
        host=b"up.example",
        prefix=b"/p",
        credential=credential,
        chunked=False,
    )
    collect = _Collect()
    parser = httptools.HttpRequestParser(collect)
    parser.feed_data(out)  # parses: one well-formed head
    assert collect.url == b"/p/x?y=1"
    lnames = [n.lower() for n, _ in collect.headers]
    assert lnames.count(b"host") == 1 and (b"host", b"up.example") in [
        (n.lower(), v) for n, v in collect.headers
    ]
    hop = {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"expect",
        b"transfer-encoding",
    }
    assert not hop & set(lnames)
    listed = {
        t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")
    }
    assert not (listed - {b"host", b"authorization", b"x-api-key", b"api-key"}) & set(lnames)
    if credential is TOKEN:
        creds = [
            (n.lower(), v)
            for n, v in collect.headers
            if n.lower() in (b"authorization", b"x-api-key", b"api-key")
        ]
        assert creds == [(b"authorization", b"Bearer TOKEN")]
    if credential is KEY:
        for n, v in collect.headers:
            if n.lower() in (b"x-api-key", b"api-key"):
                assert v == b"UPKEY"
            if n.lower() == b"authorization":
                assert v == b"Bearer UPKEY"
    if credential is None:  # passthrough: the client's own credential headers, as they were
        assert [(n, v) for n, v in collect.headers if n.lower() in (b"x-api-key", b"api-key")] == [
            (n, v)
            for n, v in headers
            if n.lower() in (b"x-api-key", b"api-key") and n.lower() not in listed
        ]
