"""What a user of the whole proxy meets, end to end: every access-log outcome from real traffic,
a developer's Entra token accepted by the proxy itself, and SIGUSR1 reopening the log files."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from claude_proxy.config import ClientJwtConfig, JwtPolicy
from claude_proxy.record import ExchangeRecord

from ..conftest import SESSION_CA
from ..entra_fakes import server_ssl, start_app
from ..helpers import (
    CLIENT_KEY,
    RESET,
    LoopThread,
    ProxyHandle,
    RawUpstream,
    Recorded,
    exchange,
    ok_response,
    raw_connect,
    request_bytes,
    wait_until,
)
from .test_cli import READY, proc_factory, write_config  # noqa: F401 (a fixture)
from .test_client_jwt import AUDIENCE, Issuer

KEY = ("x-api-key", CLIENT_KEY)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def records(caplog: pytest.LogCaptureFixture, proxy: ProxyHandle) -> list[ExchangeRecord]:
    state = proxy.server.state
    assert state is not None
    proxy.lt.call(state.batch.run_deferred)  # access lines are written after the response
    return [
        r.exchange  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "claude_proxy.access" and hasattr(r, "exchange")
    ]


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        data = sock.recv(65536)
        assert data, got
        got += data
    return got


def test_every_outcome_is_logged_as_what_happened(
    make_upstream: Callable[..., RawUpstream],
    make_proxy: Callable[..., ProxyHandle],
    access_log: pytest.LogCaptureFixture,
) -> None:
    hold = threading.Event()

    def handler(rec: Recorded) -> list[object]:
        if rec.target == b"/cut":
            return [STREAM_HEAD, b"5\r\nfirst\r\n", RESET]
        if rec.target in (b"/stream", b"/drain"):
            return [STREAM_HEAD, b"5\r\nfirst\r\n", hold, b"0\r\n\r\n"]
        if rec.target == b"/silent":
            return [hold]
        return [ok_response(b"{}", [("Content-Type", "application/json")])]

    up = make_upstream(handler)
    proxy = make_proxy(up.url, idle_timeout=0.3)
    try:
        assert exchange(proxy.port, request_bytes("GET", "/ok", [KEY])).status == 200
        assert (
            exchange(proxy.port, request_bytes("GET", "/ok", [("x-api-key", "no")])).status == 401
        )
        assert exchange(proxy.port, request_bytes("GET", "/silent", [KEY])).status == 504
        with raw_connect(proxy.port) as sock:  # the upstream resets mid-stream
            sock.sendall(request_bytes("GET", "/cut", [KEY]))
            with pytest.raises((AssertionError, ConnectionResetError)):
                read_until(sock, b"0\r\n\r\n")
        sock = raw_connect(proxy.port)  # the client leaves mid-stream
        sock.sendall(request_bytes("GET", "/stream", [KEY]))
        read_until(sock, b"first")
        sock.close()
        wait_until(lambda: len(records(access_log, proxy)) == 5)
        draining = raw_connect(proxy.port)  # still streaming when the drain deadline passes
        draining.sendall(request_bytes("GET", "/drain", [KEY]))
        read_until(draining, b"first")
        assert not proxy.stop(0.2)
        draining.close()
    finally:
        hold.set()
    outcomes = {(r.path, r.outcome) for r in records(access_log, proxy)}
    assert outcomes == {
        ("/ok", "complete"),
        ("/ok", "rejected"),
        ("/silent", "idle_timeout"),
        ("/cut", "upstream_aborted"),
        ("/stream", "client_aborted"),
        ("/drain", "drain_cut"),
    }


# ------------------------------------------------------------ a developer's Entra token


@pytest.fixture
def issuer(lt: LoopThread) -> Iterator[Issuer]:
    found = Issuer()
    runner, found.port = lt.run(start_app(found.app(), server_ssl(SESSION_CA)))
    yield found
    lt.run(runner.cleanup())


def test_client_jwt_is_accepted_and_its_policy_applied(
    issuer: Issuer,
    upstream: RawUpstream,
    make_proxy: Callable[..., ProxyHandle],
    access_log: pytest.LogCaptureFixture,
) -> None:
    policy = JwtPolicy(
        claim="roles", value="claude-power-users", name="power", allowed_models=("claude-*",)
    )
    jwt_config = ClientJwtConfig(issuer=issuer.issuer(), audience=AUDIENCE, policies=(policy,))
    proxy = make_proxy(upstream.url, client_jwt=jwt_config)
    token = issuer.token()
    auth = [("Authorization", f"Bearer {token}")]
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1}).encode()
    resp = exchange(proxy.port, request_bytes("POST", "/anthropic/v1/messages", auth, body))
    assert resp.status == 200
    (rec,) = upstream.requests
    assert token.encode() not in b"".join(v for _, v in rec.headers)  # swapped, never forwarded
    denied = json.dumps({"model": "gpt-5", "max_tokens": 1}).encode()
    resp = exchange(proxy.port, request_bytes("POST", "/anthropic/v1/messages", auth, denied))
    assert resp.status == 403 and len(upstream.requests) == 1
    expired = issuer.token(exp=1)
    resp = exchange(
        proxy.port,
        request_bytes(
            "POST", "/anthropic/v1/messages", [("Authorization", f"Bearer {expired}")], body
        ),
    )
    assert resp.status == 401 and resp.header("x-should-retry") == b"false"
    logged = records(access_log, proxy)
    assert [r.client_key for r in logged[:2]] == ["jwt:power", "jwt:power"]
    assert logged[0].user == "alice@contoso.example"


# ------------------------------------------------------------ logrotate


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_sigusr1_reopens_the_log_files(
    tmp_path: Path,
    upstream: RawUpstream,
    proc_factory,  # noqa: F811 (the fixture, imported)
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    path = write_config(tmp_path, upstream.url, f'[logging]\nlevel = "info"\nlog_path = "{logs}"\n')
    proc = proc_factory(["-c", str(path)])
    port = int(proc.wait_line(READY).group(1))
    assert exchange(port, request_bytes("GET", "/before", [KEY])).status == 200
    (current,) = list(logs.glob("*.log"))
    wait_until(lambda: "/before" in current.read_text())
    rotated = current.with_name(current.name + ".1")
    current.rename(rotated)  # what logrotate does, before it signals
    os.kill(proc.p.pid, signal.SIGUSR1)
    wait_until(current.exists)  # reopened: a new file under the old name
    assert exchange(port, request_bytes("GET", "/after", [KEY])).status == 200
    wait_until(lambda: "/after" in current.read_text())
    assert "/after" not in rotated.read_text()
    assert proc.stop() == 0
