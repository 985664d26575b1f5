"""Client keys, SSE delivery one event at a time, access lines, and secrets kept out of logs."""

from __future__ import annotations

import logging
import threading

import pytest

from claude_proxy.config import ClientKey

from ..helpers import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    RawUpstream,
    Recorded,
    exchange,
    ok_response,
    raw_connect,
    request_bytes,
    secret,
    wait_until,
)


def call(port: int, headers: list[tuple[str, str]], target: str = "/anthropic/v1/messages"):
    return exchange(port, request_bytes("POST", target, [("Host", "p"), *headers], b"{}"))


# ----------------------------------------------------------------- keys


def test_passthrough_relays_untouched(upstream: RawUpstream, make_proxy) -> None:
    p = make_proxy(upstream.url)
    assert call(p.port, [("x-custom", "1")]).status == 200
    rec = upstream.requests[0]
    assert [n.lower() for n, _ in rec.headers] == [b"host", b"x-custom", b"content-length"]
    assert UPSTREAM_KEY.encode() not in upstream.raw


def test_passthrough_off_gives_401(upstream: RawUpstream, make_proxy) -> None:
    p = make_proxy(upstream.url, passthrough_unauthenticated=False)
    resp = call(p.port, [])
    assert resp.status == 401
    assert resp.json()["error"]["type"] == "authentication_error"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "header",
    [
        ("x-api-key", "wrong"),
        ("Authorization", "Bearer wrong"),
        ("api-key", "wrong"),
        ("Authorization", f"Basic {CLIENT_KEY}"),
        ("x-api-key", CLIENT_KEY[:-1]),
    ],
)
def test_wrong_key_never_reaches_upstream(
    upstream: RawUpstream, make_proxy, header: tuple[str, str]
) -> None:
    p = make_proxy(upstream.url)
    assert call(p.port, [header]).status == 401
    assert upstream.connections == 0 and upstream.raw == b""


def test_named_keys_and_access_log(upstream: RawUpstream, make_proxy, access_log) -> None:
    keys = (
        ClientKey("alice", secret("alice-secret-key")),
        ClientKey("ci-bot", secret("ci-secret-key")),
    )
    p = make_proxy(upstream.url, client_api_key=None, client_api_keys=keys)
    assert call(p.port, [("x-api-key", "alice-secret-key")]).status == 200
    assert (
        call(p.port, [("Authorization", "Bearer ci-secret-key")], "/openai/v1/x?k=v").status == 200
    )
    assert call(p.port, [("api-key", "nope")]).status == 401
    assert call(p.port, []).status == 200

    def access_lines() -> list[str]:
        return [r.getMessage() for r in access_log.records if r.name == "claude_proxy.access"]

    wait_until(lambda: len(access_lines()) == 4)  # lines are written just after the response
    lines = access_lines()
    assert ' alice "POST /anthropic/v1/messages" 200 ' in lines[0]
    assert ' ci-bot "POST /openai/v1/x" 200 ' in lines[1]  # no query string in logs
    assert ' rejected "POST /anthropic/v1/messages" 401 ' in lines[2]
    assert ' passthrough "POST /anthropic/v1/messages" 200 ' in lines[3]
    for line in lines:
        assert "in=2 out=" in line and "ttfb=" in line and "dur=" in line
    records = [r for r in access_log.records if r.name == "claude_proxy.access"]
    assert records[0].client_key == "alice"  # type: ignore[attr-defined]
    assert records[0].request_id != records[1].request_id  # type: ignore[attr-defined]


def test_no_keys_configured_attaches_upstream_key(upstream: RawUpstream, make_proxy) -> None:
    p = make_proxy(upstream.url, client_api_key=None)
    call(p.port, [])
    assert upstream.requests[0].header("x-api-key") == UPSTREAM_KEY.encode()


# ----------------------------------------------------------------- SSE


def test_sse_events_arrive_one_by_one(make_upstream, make_proxy) -> None:
    """Each event reaches the client while the upstream is still holding the next one back."""
    gates = [threading.Event() for _ in range(5)]

    def handler(rec: Recorded) -> list[object]:
        script: list[object] = [
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        ]
        for i, gate in enumerate(gates):
            event = b'event: delta\ndata: {"i": %d}\n\n' % i
            script += [gate, b"%x\r\n%b\r\n" % (len(event), event)]
        return [*script, b"0\r\n\r\n"]

    up = make_upstream(handler)
    p = make_proxy(up.url)
    with raw_connect(p.port) as sock:
        sock.sendall(request_bytes("POST", "/v1/messages", [("x-api-key", CLIENT_KEY)], b"{}"))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        for i, gate in enumerate(gates):
            assert b'"i": %d' % i not in received
            gate.set()
            while b'"i": %d}' % i not in received:
                chunk = sock.recv(4096)
                assert chunk, "connection closed early"
                received += chunk
            assert b'"i": %d' % (i + 1) not in received  # nothing ahead of its time
        while not received.endswith(b"0\r\n\r\n"):
            received += sock.recv(4096)


# ----------------------------------------------------------------- secrets


def test_no_secret_in_any_log_line(upstream: RawUpstream, make_proxy, access_log) -> None:
    logging.getLogger("claude_proxy").setLevel(logging.DEBUG)
    secret_named = secret("named-key-very-secret")
    p = make_proxy(
        upstream.url,
        client_api_keys=(ClientKey("n", secret_named),),
    )
    call(p.port, [("x-api-key", CLIENT_KEY)])
    call(p.port, [("Authorization", f"Bearer {secret_named}")])
    call(p.port, [("x-api-key", "wrong-" + CLIENT_KEY)])
    call(p.port, [("api-key", CLIENT_KEY)], "/x?api-key=" + CLIENT_KEY)
    exchange(p.port, b"GET http://x/?k=" + CLIENT_KEY.encode() + b" HTTP/1.1\r\n\r\n")
    up_closed = make_proxy("http://127.0.0.1:9", connect_timeout=0.5)
    call(up_closed.port, [("x-api-key", CLIENT_KEY)])
    wait_until(lambda: len(access_log.records) >= 6)
    text = (
        "\n".join(r.getMessage() + " " + str(r.__dict__) for r in access_log.records)
        + access_log.text
    )
    assert len(access_log.records) >= 6
    for value in (CLIENT_KEY, UPSTREAM_KEY, secret_named):
        assert value not in text


def test_upstream_401_passes_through(make_upstream, make_proxy) -> None:
    body = b'{"error":{"code":"401","message":"Access denied due to invalid subscription key"}}'
    up = make_upstream(
        lambda r: [
            b"HTTP/1.1 401 PermissionDenied\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        ]
    )
    p = make_proxy(up.url)
    resp = call(p.port, [("x-api-key", CLIENT_KEY)])
    assert (resp.status, resp.reason, resp.body) == (401, b"PermissionDenied", body)


def test_ok_response_helper_sanity() -> None:
    assert ok_response(b"x").endswith(b"\r\n\r\nx")
