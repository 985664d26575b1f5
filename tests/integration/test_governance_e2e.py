"""Identities and limits on real requests through the proxy: nothing refused reaches the
upstream, refusals say when to come back, tokens from the upstream's usage count, and two
proxies sharing one redis-server share one window."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from claude_proxy.config import ClientKey

from ..helpers import (
    CLIENT_KEY,
    ProxyHandle,
    RawUpstream,
    Recorded,
    exchange,
    ok_response,
    raw_connect,
    request_bytes,
    secret,
)
from ..redis_server import RedisServer
from .test_cli import READY, proc_factory, write_config  # noqa: F401 (a fixture)

KEY = secret("governed-key-0123456789")
Make = Callable[..., ProxyHandle]


def key(**limits: object) -> tuple[ClientKey, ...]:
    return (ClientKey(name="team-a", key=KEY, **limits),)  # type: ignore[arg-type]


def messages(port: int, model: str | None = "claude-sonnet-4-5", key: str = KEY):
    doc = {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        doc = {"model": model, **doc}
    body = json.dumps(doc).encode()
    return exchange(
        port, request_bytes("POST", "/anthropic/v1/messages", [("x-api-key", key)], body)
    )


def usage_reply(tokens_in: int, tokens_out: int) -> bytes:
    body = json.dumps(
        {
            "type": "message",
            "model": "claude-sonnet-4-5",
            "content": [],
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }
    ).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
        + body
    )


@pytest.mark.parametrize(
    ("model", "status"),
    [
        ("claude-sonnet-4-5", 200),
        ("claude-opus-4-1", 403),
        (None, 403),  # a body without a readable model is not one of the allowed
    ],
)
def test_allowed_models_are_enforced_before_anything_goes_upstream(
    upstream: RawUpstream, make_proxy: Make, model: str | None, status: int
) -> None:
    proxy = make_proxy(upstream.url, client_api_keys=key(allowed_models=("claude-sonnet-*",)))
    resp = messages(proxy.port, model)
    assert resp.status == status
    if status == 403:
        assert resp.header("x-should-retry") == b"false"
        assert upstream.requests == []
    else:
        assert len(upstream.requests) == 1  # the body went whole and unchanged
        assert json.loads(upstream.requests[0].body)["model"] == model


def test_allowed_models_read_an_openai_body_sent_chunked(
    upstream: RawUpstream, make_proxy: Make
) -> None:
    proxy = make_proxy(upstream.url, client_api_keys=key(allowed_models=("gpt-5*",)))
    body = json.dumps({"messages": [], "model": "gpt-5-mini"}).encode()
    raw = request_bytes(
        "POST", "/openai/v1/chat/completions", [("api-key", KEY)], body, chunked=True
    )
    assert exchange(proxy.port, raw).status == 200
    assert upstream.requests[0].body == body


def test_requests_per_minute_refuses_with_retry_after(
    upstream: RawUpstream, make_proxy: Make
) -> None:
    proxy = make_proxy(upstream.url, client_api_keys=key(requests_per_minute=3))
    statuses = [messages(proxy.port).status for _ in range(3)]
    refused = messages(proxy.port)
    assert statuses == [200, 200, 200]
    assert refused.status == 429
    assert refused.header("x-should-retry") == b"true"
    assert 1 <= int(refused.header("retry-after") or b"0") <= 60
    assert len(upstream.requests) == 3


def test_token_budget_counts_the_upstreams_usage(
    make_upstream: Callable[..., RawUpstream], make_proxy: Make
) -> None:
    up = make_upstream(lambda r: [usage_reply(600, 500)])
    proxy = make_proxy(up.url, client_api_keys=key(tokens_per_minute=1000))
    assert messages(proxy.port).status == 200  # 1,100 tokens: over the budget now
    state = proxy.server.state
    assert state is not None
    proxy.lt.call(state.batch.run_deferred)  # usage is read after the response
    refused = messages(proxy.port)
    assert refused.status == 429
    assert b"tokens" in refused.body
    assert len(up.requests) == 1


def test_concurrency_limit_with_a_held_stream(
    make_upstream: Callable[..., RawUpstream], make_proxy: Make
) -> None:
    release = threading.Event()
    stream_head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )

    def handler(rec: Recorded) -> list[object]:
        if rec.target == b"/anthropic/v1/messages?stream":
            return [stream_head, b"5\r\nfirst\r\n", release, b"0\r\n\r\n"]
        return [ok_response()]

    up = make_upstream(handler)
    proxy = make_proxy(up.url, client_api_keys=key(max_concurrent=1))
    body = b'{"model": "m", "stream": true}'
    held = raw_connect(proxy.port)
    try:
        held.sendall(
            request_bytes("POST", "/anthropic/v1/messages?stream", [("x-api-key", KEY)], body)
        )
        got = b""
        while b"first" not in got:
            got += held.recv(65536)
        refused = messages(proxy.port)
        assert refused.status == 429 and refused.header("x-should-retry") == b"true"
        release.set()
        while not got.endswith(b"0\r\n\r\n"):
            data = held.recv(65536)
            assert data
            got += data
    finally:
        release.set()
        held.close()
    state = proxy.server.state
    assert state is not None
    proxy.lt.call(state.batch.run_deferred)  # the stream's permit is given back
    assert messages(proxy.port).status == 200


def test_expired_key_is_refused_as_401(upstream: RawUpstream, make_proxy: Make) -> None:
    import datetime

    past = datetime.date(2020, 1, 1)
    proxy = make_proxy(upstream.url, client_api_keys=key(expires=past))
    resp = messages(proxy.port)
    assert resp.status == 401 and resp.header("x-should-retry") == b"false"
    assert b"expired" in resp.body
    assert upstream.requests == []


def test_a_key_without_limits_is_not_governed(upstream: RawUpstream, make_proxy: Make) -> None:
    proxy = make_proxy(upstream.url)
    state = proxy.server.state
    assert state is not None and state.limiter is None
    for _ in range(5):
        assert messages(proxy.port, key=CLIENT_KEY).status == 200


# ------------------------------------------------------------ two proxies, one redis-server


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_two_proxy_processes_share_one_window_in_redis(
    tmp_path: Path,
    upstream: RawUpstream,
    proc_factory,  # noqa: F811 (the fixture, imported)
    redis: RedisServer,
) -> None:
    limit = 5
    ports = []
    for i in range(2):
        (tmp_path / f"p{i}").mkdir()
        path = write_config(
            tmp_path / f"p{i}",
            upstream.url,
            f'[limits]\nredis_url = "{redis.url}"\n'
            f'[[client_api_keys]]\nname = "team-a"\nkey = "{KEY}"\n'
            f"requests_per_minute = {limit}\n",
        )
        proc = proc_factory(["-c", str(path)])
        ports.append(int(proc.wait_line(READY).group(1)))
    statuses = [messages(ports[i % 2]).status for i in range(2 * limit)]
    assert statuses.count(200) == limit, statuses
    assert statuses.count(429) == limit
    assert len(upstream.requests) == limit
