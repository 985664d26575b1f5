"""Errors clients act on correctly: every proxy-made answer says whether to retry.

The Anthropic and OpenAI SDKs (and so Claude Code and Codex) honour ``x-should-retry`` over
their own rules; without it, a wrong key costs Claude Code 11 requests over three minutes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import anthropic
import openai
import pytest

from claude_proxy.errors import (
    BadRequest,
    ClientIdle,
    CredentialUnavailable,
    HeadersTooLarge,
    InternalError,
    ProxyError,
    Unauthorized,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamIdle,
    UpstreamProtocolError,
    render_error,
)

from ..helpers import (
    CLIENT_KEY,
    CLOSE,
    ProxyHandle,
    RawUpstream,
    exchange,
    ok_response,
    raw_connect,
    read_response,
    request_bytes,
)

KEY = ("x-api-key", CLIENT_KEY)


@pytest.mark.parametrize(
    ("error", "retry", "after"),
    [
        (BadRequest("m"), b"false", None),
        (Unauthorized("m"), b"false", None),
        (ClientIdle("m"), b"false", None),
        (HeadersTooLarge("m"), b"false", None),
        (UpstreamConnectError("m"), b"true", b"1"),
        (UpstreamConnectTimeout("m"), b"true", b"1"),
        (UpstreamClosed("m"), b"true", b"1"),
        (UpstreamProtocolError("m"), b"true", b"1"),
        (UpstreamIdle("m"), b"true", b"1"),
        (CredentialUnavailable("m"), b"true", b"5"),
        (CredentialUnavailable("m", needs_person=True), b"false", None),
        (InternalError("m"), b"false", None),
    ],
)
def test_every_error_says_whether_to_retry(
    error: ProxyError, retry: bytes, after: bytes | None
) -> None:
    head = render_error(error, "anthropic", close=False).split(b"\r\n\r\n")[0].split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in head[1:])
    assert fields[b"x-should-retry"] == retry
    assert fields.get(b"retry-after") == after


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("case", "status", "retry"),
    [
        ("wrong-key", 401, b"false"),
        ("bad-request", 400, b"false"),
        ("refused", 502, b"true"),
        ("closed", 502, b"true"),
        ("garbage", 502, b"true"),
        ("silent", 504, b"true"),
        ("head-too-large", 431, b"false"),
    ],
)
def test_proxy_made_answers_carry_x_should_retry(
    make_upstream: Callable[..., RawUpstream],
    make_proxy: Callable[..., ProxyHandle],
    case: str,
    status: int,
    retry: bytes,
) -> None:
    never = threading.Event()
    scripts: dict[str, list[object]] = {
        "closed": [CLOSE],
        "garbage": [b"NOT HTTP\r\n\r\n"],
        "silent": [never],
    }
    up = make_upstream(lambda r: scripts.get(case, [ok_response()]))
    url = f"http://127.0.0.1:{refused_port()}" if case == "refused" else up.url
    proxy = make_proxy(url, idle_timeout=0.3)
    headers = [("x-api-key", "wrong")] if case == "wrong-key" else [KEY]
    if case == "head-too-large":
        headers.append(("x-pad", "p" * 70000))
    target = "http://elsewhere/x" if case == "bad-request" else "/anthropic/v1/messages"
    try:
        with raw_connect(proxy.port) as sock:
            sock.sendall(request_bytes("POST", target, headers, b"{}"))
            resp = read_response(sock)
    finally:
        never.set()
    assert resp.status == status
    assert resp.header("x-should-retry") == retry
    if retry == b"true":
        assert resp.header("retry-after") is not None


def test_relayed_upstream_errors_are_untouched(
    make_upstream: Callable[..., RawUpstream], make_proxy: Callable[..., ProxyHandle]
) -> None:
    answer = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\nContent-Length: 2\r\n\r\n{}"
    up = make_upstream(lambda r: [answer])
    proxy = make_proxy(up.url)
    resp = exchange(proxy.port, request_bytes("POST", "/anthropic/v1/messages", [KEY], b"{}"))
    assert resp.status == 429
    assert resp.header("x-should-retry") is None and resp.header("retry-after") == b"7"


def requests_seen(caplog: pytest.LogCaptureFixture) -> int:
    """Requests the proxy finished, from its access log (the SDKs' own transport varies)."""
    return sum(1 for r in caplog.records if r.name == "claude_proxy.access")


def wait_seen(caplog: pytest.LogCaptureFixture, proxy: ProxyHandle) -> int:
    state = proxy.server.state
    assert state is not None
    proxy.lt.call(state.batch.run_deferred)  # access lines are written after the response
    return requests_seen(caplog)


def test_anthropic_sdk_gives_up_after_one_request_on_a_wrong_key(
    upstream: RawUpstream, proxy: ProxyHandle, access_log: pytest.LogCaptureFixture
) -> None:
    # default retries: 2
    with (
        anthropic.Anthropic(base_url=proxy.url, api_key="wrong-key") as client,
        pytest.raises(anthropic.AuthenticationError),
    ):
        client.messages.create(
            model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
        )
    assert wait_seen(access_log, proxy) == 1
    assert upstream.requests == []


def test_openai_sdk_gives_up_after_one_request_on_a_wrong_key(
    upstream: RawUpstream, proxy: ProxyHandle, access_log: pytest.LogCaptureFixture
) -> None:
    with (
        openai.OpenAI(base_url=proxy.url + "/openai/v1", api_key="wrong-key") as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert wait_seen(access_log, proxy) == 1


def test_anthropic_sdk_retries_what_passes(
    make_proxy: Callable[..., ProxyHandle], access_log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(f"http://127.0.0.1:{refused_port()}")
    with (
        anthropic.Anthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=1) as client,
        pytest.raises(anthropic.APIStatusError) as caught,
    ):
        client.messages.create(
            model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 502
    assert wait_seen(access_log, proxy) == 2  # told it may retry, it did (after retry-after)
