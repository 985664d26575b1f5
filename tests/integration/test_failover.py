"""Several upstreams behind one endpoint (issue 12): failover before the client has seen a byte,
cooldowns from retry hints, circuits on connect failures, weights, routes by model.

Every upstream is a raw loopback server that sends exactly the bytes a test chooses; the
proxy is the real one. Nothing here sleeps to wait for a state: cooldowns are long (30 s) so
that a test only ever observes "inside the window", and timeouts that must fire are short.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest

from claude_proxy.config import (
    Config,
    FailoverConfig,
    RouteConfig,
    UpstreamAuthConfig,
    UpstreamConfig,
)
from claude_proxy.mock import MockFoundry, start_mock
from claude_proxy.record import ExchangeRecord

from ..helpers import (
    CLIENT_KEY,
    CLOSE,
    SECRETS,
    UPSTREAM_KEY,
    LoopThread,
    ProxyHandle,
    RawUpstream,
    Recorded,
    exchange,
    make_config,
    ok_response,
    raw_connect,
    read_response,
    read_responses,
    request_bytes,
    start_proxy,
    wait_until,
)
from ..records import exchange_record

KEY = ("x-api-key", CLIENT_KEY)
MESSAGES = "/anthropic/v1/messages"
OTHER_KEY = "other-upstream-key-0123456789abcdef"
SECRETS.add(OTHER_KEY)


def refusal(status: int, *headers: tuple[str, str], body: bytes | None = None) -> bytes:
    """An upstream's refusal, in Foundry's shape unless ``body`` says otherwise."""
    if body is None:
        body = b'{"error":{"code":"%d","message":"refused by this deployment"}}' % status
    reason = {429: b"Too Many Requests", 503: b"Service Unavailable", 500: b"Internal"}
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason.get(status, b"Refused"))]
    lines += [f"{k}: {v}\r\n".encode() for k, v in headers]
    lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
    return b"".join(lines) + body


def answers(*script: Any) -> Callable[[Recorded], list[Any]]:
    return lambda request: list(script)


def answered_by(name: str) -> Callable[[Recorded], list[Any]]:
    return answers(ok_response(b'{"from":"%s"}' % name.encode()))


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def multi_config(
    upstreams: list[tuple[str, str] | tuple[str, str, int] | tuple[str, str, int, int]],
    *,
    routes: tuple[RouteConfig, ...] = (),
    failover: FailoverConfig | None = None,
    **changes: Any,
) -> Config:
    """[[upstreams]] from (name, url[, priority[, weight]]); the top-level auth for all."""
    ups = []
    for entry in upstreams:
        name, url, *rest = entry
        priority = rest[0] if rest else 1
        weight = rest[1] if len(rest) > 1 else 1
        ups.append(UpstreamConfig(name, url, priority=priority, weight=weight))
    base = make_config("http://127.0.0.1:1", **changes)
    return dataclasses.replace(
        base,
        upstream_url=None,
        upstreams=tuple(ups),
        routes=routes,
        failover=failover or FailoverConfig(),
    )


@pytest.fixture
def make(lt: LoopThread) -> Iterator[Callable[..., RawUpstream]]:
    made: list[RawUpstream] = []

    def make(handler: Callable[[Recorded], Any], **kw: Any) -> RawUpstream:
        up = RawUpstream(handler, **kw)
        lt.run(up.start())
        made.append(up)
        return up

    yield make
    for up in made:
        lt.run(up.stop())


@pytest.fixture
def proxies(lt: LoopThread) -> Iterator[Callable[[Config], ProxyHandle]]:
    started: list[ProxyHandle] = []

    def start(config: Config) -> ProxyHandle:
        handle = start_proxy(lt, config)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop(2.0)


def post(port: int, body: bytes = b'{"model":"m","max_tokens":1}', **kw: Any) -> Any:
    return exchange(
        port, request_bytes("POST", MESSAGES, [KEY, ("content-type", "application/json")], body)
    )


def access_records(caplog: pytest.LogCaptureFixture) -> list[ExchangeRecord]:
    return [
        r.exchange  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "claude_proxy.access" and hasattr(r, "exchange")
    ]


def metric(proxy: ProxyHandle, name: str, **labels: str) -> float:
    from prometheus_client import generate_latest

    assert proxy.server.metrics is not None
    proxy.server.state.batch.run_deferred()  # type: ignore[union-attr]
    proxy.server.metrics.fold()
    text = generate_latest(proxy.server.metrics.registry).decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = line[len(name) + 1 : line.index("}")]
            if ",".join(sorted(got.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {name}{{{want}}} in /metrics")


# ================================================================ moving on


@pytest.mark.parametrize(
    "hint",
    [("retry-after", "30"), ("retry-after-ms", "30000"), ("x-ms-retry-after-ms", "30000")],
    ids=["retry-after", "retry-after-ms", "x-ms-retry-after-ms"],
)
def test_a_429_moves_on_and_rests_the_upstream_for_its_hint(
    make: Callable[..., RawUpstream],
    proxies: Callable[[Config], ProxyHandle],
    hint: tuple[str, str],
) -> None:
    east = make(answers(refusal(429, hint)))
    west = make(answered_by("west"))
    proxy = proxies(multi_config([("east", east.url, 1), ("west", west.url, 2)]))
    for _ in range(5):
        resp = post(proxy.port)
        assert resp.status == 200 and resp.json() == {"from": "west"}
    # one request saw the 429 and its hint; the next four went straight to west
    assert len(east.requests) == 1
    assert len(west.requests) == 5
    assert all(r.body == b'{"model":"m","max_tokens":1}' for r in west.requests)


def test_a_503_moves_on_and_a_500_does_not_by_default(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    busy = make(answers(refusal(503)))
    broken = make(answers(refusal(500)))
    fine = make(answered_by("fine"))
    proxy = proxies(multi_config([("busy", busy.url, 1), ("fine", fine.url, 2)]))
    assert post(proxy.port).json() == {"from": "fine"}
    proxy2 = proxies(multi_config([("broken", broken.url, 1), ("fine", fine.url, 2)]))
    resp = post(proxy2.port)
    assert resp.status == 500  # a 500 may mean the model ran: relayed, not retried
    assert b"refused by this deployment" in resp.body
    assert len(fine.requests) == 1


def test_a_team_may_add_500_to_on_status(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    broken = make(answers(refusal(500)))
    fine = make(answered_by("fine"))
    failover = FailoverConfig(on_status=(429, 500, 503, 529))
    proxy = proxies(multi_config([("a", broken.url, 1), ("b", fine.url, 2)], failover=failover))
    assert post(proxy.port).json() == {"from": "fine"}
    assert len(broken.requests) == 1


def test_connect_refused_moves_on(
    make: Callable[..., RawUpstream],
    proxies: Callable[[Config], ProxyHandle],
    access_log: pytest.LogCaptureFixture,
) -> None:
    fine = make(answered_by("fine"))
    dead = f"http://127.0.0.1:{closed_port()}"
    proxy = proxies(multi_config([("dead", dead, 1), ("fine", fine.url, 2)], admin=_admin_port0()))
    assert post(proxy.port).json() == {"from": "fine"}
    wait_until(lambda: bool(access_records(access_log)))  # written after the response went
    rec = access_records(access_log)[-1]
    assert (rec.upstream, rec.attempts, rec.status) == ("fine", 2, 200)
    assert (
        metric(
            proxy,
            "claude_proxy_failovers_total",
            **{"from": "dead", "to": "fine", "reason": "connect_refused"},
        )
        == 1
    )
    line = [r.getMessage() for r in access_log.records if r.name == "claude_proxy.access"][-1]
    assert line.endswith("upstream=fine attempts=2")


def test_consecutive_connect_failures_open_the_circuit(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    fine = make(answered_by("fine"))
    port = closed_port()
    failover = FailoverConfig(circuit_failures=2, cooldown=30)
    proxy = proxies(
        multi_config(
            [("dead", f"http://127.0.0.1:{port}", 1), ("fine", fine.url, 2)],
            failover=failover,
        )
    )
    for _ in range(4):
        assert post(proxy.port).json() == {"from": "fine"}
    state = proxy.server.state
    assert state is not None
    dead = state.targets[0]
    # two refused connects opened the circuit; the other two requests never tried it
    assert dead.pool.connects == 2
    assert dead.health.standing.value == "open"


def test_a_hang_before_headers_is_a_504_unless_504_is_in_on_status(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    held = threading.Event()
    hangs = make(answers(held))  # accepts the request, never answers until released
    fine = make(answered_by("fine"))
    try:
        plain = proxies(
            multi_config([("hangs", hangs.url, 1), ("fine", fine.url, 2)], idle_timeout=0.3)
        )
        resp = post(plain.port)
        assert resp.status == 504 and resp.header("x-should-retry") == b"true"
        assert len(fine.requests) == 0  # the model may be running: not sent twice
        opted = proxies(
            multi_config(
                [("hangs", hangs.url, 1), ("fine", fine.url, 2)],
                idle_timeout=0.3,
                failover=FailoverConfig(on_status=(429, 503, 504, 529)),
            )
        )
        assert post(opted.port).json() == {"from": "fine"}
    finally:
        held.set()


def test_a_response_that_started_is_never_retried(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    cut = make(answers(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", CLOSE))
    fine = make(answered_by("fine"))
    proxy = proxies(multi_config([("cut", cut.url, 1), ("fine", fine.url, 2)]))
    with raw_connect(proxy.port) as sock:
        sock.sendall(request_bytes("POST", MESSAGES, [KEY], b'{"model":"m"}'))
        resp = read_response(sock)
        assert resp.status == 200 and not resp.complete and resp.body == b"partial"
        assert len(fine.requests) == 0


def test_a_stream_cut_mid_way_is_not_failed_over(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    event = b"event: message_start\ndata: {}\n\n"
    cut = make(answers(head, b"%x\r\n%s\r\n" % (len(event), event), CLOSE))
    fine = make(answered_by("fine"))
    proxy = proxies(multi_config([("cut", cut.url, 1), ("fine", fine.url, 2)]))
    with raw_connect(proxy.port) as sock:
        sock.sendall(request_bytes("POST", MESSAGES, [KEY], b'{"model":"m","stream":true}'))
        resp = read_response(sock)
        assert resp.status == 200 and not resp.complete and resp.body == event
        assert len(fine.requests) == 0


# ================================================================ when every one refuses


def test_the_last_refusal_is_relayed_byte_for_byte(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    first = make(answers(refusal(429, ("retry-after", "30"), ("x-ms-region", "East US"))))
    last_bytes = refusal(
        529,
        ("retry-after", "7"),
        ("apim-request-id", "abc-123"),
        ("x-ms-region", "West US"),
        body=b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
    )
    last = make(answers(last_bytes))
    proxy = proxies(multi_config([("first", first.url, 1), ("last", last.url, 2)]))
    with raw_connect(proxy.port) as sock:
        sock.sendall(request_bytes("POST", MESSAGES, [KEY], b'{"model":"m"}'))
        sock.settimeout(5)
        got = b""
        while not got.endswith(b'Overloaded"}}'):
            data = sock.recv(65536)
            assert data, got
            got += data
        # the upstream's own status line and fields, in its own order
        head, _, body = got.partition(b"\r\n\r\n")
        upstream_head, _, upstream_body = last_bytes.partition(b"\r\n\r\n")
        assert body == upstream_body
        assert head == upstream_head  # nothing added, removed or reordered
        assert len(first.requests) == len(last.requests) == 1


def test_a_refusal_kept_is_relayed_when_the_next_upstream_cannot_be_reached(
    make: Callable[..., RawUpstream],
    proxies: Callable[[Config], ProxyHandle],
    access_log: pytest.LogCaptureFixture,
) -> None:
    busy = make(answers(refusal(429, ("retry-after", "30"))))
    dead = f"http://127.0.0.1:{closed_port()}"
    proxy = proxies(multi_config([("busy", busy.url, 1), ("dead", dead, 2)]))
    resp = post(proxy.port)
    assert resp.status == 429 and b"refused by this deployment" in resp.body
    assert resp.header("retry-after") == b"30"
    wait_until(lambda: bool(access_records(access_log)))
    rec = access_records(access_log)[-1]
    assert (rec.upstream, rec.attempts, rec.origin) == ("busy", 2, "upstream")  # who answered


def test_every_upstream_resting_before_any_was_tried_is_a_429_naming_the_soonest(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    a = make(answers(refusal(429, ("retry-after", "30"))))
    b = make(answers(refusal(429, ("retry-after", "45"))))
    proxy = proxies(multi_config([("a", a.url, 1), ("b", b.url, 2)], admin=_admin_port0()))
    first = post(proxy.port)
    assert first.status == 429 and b"refused by this deployment" in first.body  # b's, relayed
    resp = post(proxy.port)
    assert resp.status == 429
    assert resp.header("x-should-retry") == b"true"
    assert resp.header("retry-after") in (b"30", b"29")  # a is back first
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert len(a.requests) == len(b.requests) == 1  # nothing sent while both rest
    ready, why = proxy.server.readiness()
    assert not ready and "cooling" in why
    assert metric(proxy, "claude_proxy_upstream_state", upstream="a", state="cooling") == 1
    assert metric(proxy, "claude_proxy_upstream_state", upstream="b", state="ready") == 0


def test_max_attempts_bounds_the_upstreams_tried(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    ups = [make(answers(refusal(503, ("retry-after", "30")))) for _ in range(4)]
    config = multi_config(
        [(f"u{i}", u.url, i + 1) for i, u in enumerate(ups)],
        failover=FailoverConfig(max_attempts=2),
    )
    proxy = proxies(config)
    assert post(proxy.port).status == 503
    assert [len(u.requests) for u in ups] == [1, 1, 0, 0]


# ================================================================ the request, again


def test_the_body_goes_again_unchanged_with_the_next_upstreams_host_and_key(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    first = make(answers(refusal(429, ("retry-after", "30"))))
    second = make(answered_by("second"))
    config = multi_config([("first", first.url, 1), ("second", second.url, 2)])
    own = UpstreamAuthConfig(type="api_key", api_key=OTHER_KEY)
    config = dataclasses.replace(
        config, upstreams=(config.upstreams[0], dataclasses.replace(config.upstreams[1], auth=own))
    )
    proxy = proxies(config)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "é" * 5000}]})
    chunks = [body.encode()[:7000], body.encode()[7000:]]
    raw = (
        b"POST "
        + MESSAGES.encode()
        + b" HTTP/1.1\r\nHost: proxy\r\nx-api-key: "
        + CLIENT_KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\nx-trace: 1\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        + b"0\r\n\r\n"
    )
    resp = exchange(proxy.port, raw)
    assert resp.json() == {"from": "second"}
    (a,), (b,) = first.requests, second.requests
    assert a.body == b.body == body.encode()
    assert a.header("x-api-key") == UPSTREAM_KEY.encode()
    assert b.header("x-api-key") == OTHER_KEY.encode()
    assert a.header("host") == f"127.0.0.1:{first.port}".encode()
    assert b.header("host") == f"127.0.0.1:{second.port}".encode()
    assert b.header("x-trace") == b"1"


def test_an_early_refusal_before_the_body_is_sent_replays_all_of_it(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    early = make(answers(refusal(429, ("retry-after", "30"))), respond_after_body=False)
    second = make(answered_by("second"))
    proxy = proxies(multi_config([("early", early.url, 1), ("second", second.url, 2)]))
    body = b'{"model":"m","pad":"' + b"x" * 3_000_000 + b'"}'
    with raw_connect(proxy.port) as sock:
        sock.sendall(
            request_bytes("POST", MESSAGES, [KEY], body)[: -len(body)]
        )  # the head alone: the early answer comes before any body
        early.wait_for(lambda: len(early.requests) == 1)
        sock.sendall(body)
        resp = read_response(sock, timeout=10)
        assert resp.json() == {"from": "second"}
        assert second.requests[0].body == body


def test_no_replay_beyond_replay_limit(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    busy = make(answers(refusal(429, ("retry-after", "30"))))
    spare = make(answered_by("spare"))
    proxy = proxies(
        multi_config(
            [("busy", busy.url, 1), ("spare", spare.url, 2)],
            failover=FailoverConfig(replay_limit=1000),
        )
    )
    big = b'{"model":"m","pad":"' + b"y" * 5000 + b'"}'
    resp = post(proxy.port, big)
    assert resp.status == 429  # relayed: the body was not kept, so it goes nowhere else
    assert len(busy.requests) == 1 and busy.requests[0].body == big
    assert len(spare.requests) == 0
    assert post(proxy.port, b'{"model":"m"}').json() == {"from": "spare"}  # busy rests


# ================================================================ spreading and routing


def test_weights_share_first_attempts_among_equal_priorities(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    heavy = make(answered_by("heavy"))
    light = make(answered_by("light"))
    backup = make(answered_by("backup"))
    proxy = proxies(
        multi_config([("heavy", heavy.url, 1, 3), ("light", light.url, 1, 1), ("b", backup.url, 2)])
    )
    with raw_connect(proxy.port) as sock:
        n = 400
        for _ in range(n):
            sock.sendall(request_bytes("POST", MESSAGES, [KEY], b'{"model":"m"}'))
            assert read_response(sock).status == 200
        share = len(heavy.requests) / n
        # 3:1 is 75%; 400 draws put 99.99% of outcomes within ±9 points
        assert 0.66 < share < 0.84, share
        assert len(heavy.requests) + len(light.requests) == n
        assert len(backup.requests) == 0


def test_routes_send_a_model_only_to_its_upstreams(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    opus = make(answered_by("opus"))
    sonnet = make(answered_by("sonnet"))
    routes = (
        RouteConfig(models=("claude-opus-*",), upstreams=("opus",)),
        RouteConfig(models=("claude-sonnet-*", "claude-haiku-*"), upstreams=("sonnet",)),
    )
    proxy = proxies(multi_config([("opus", opus.url), ("sonnet", sonnet.url)], routes=routes))
    # Claude Code's shape (model first) and the SDKs' (model after a large messages array)
    cc = json.dumps({"model": "claude-opus-4-8", "messages": [{"content": "x" * 50_000}]})
    sdk = json.dumps(
        {
            "max_tokens": 5,
            "messages": [{"content": "x" * 50_000}],
            "model": "claude-haiku-4-5",
            "stream": False,
        }
    )
    for _ in range(10):
        assert post(proxy.port, cc.encode()).json() == {"from": "opus"}
        assert post(proxy.port, sdk.encode()).json() == {"from": "sonnet"}
    assert all(r.body == cc.encode() for r in opus.requests)
    assert all(r.body == sdk.encode() for r in sonnet.requests)
    # a model no route names, and no model at all: any upstream
    for body in (b'{"model":"gpt-5"}', b"[]"):
        assert post(proxy.port, body).status == 200


def test_a_legacy_openai_path_routes_by_its_deployment(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    four = make(answered_by("four"))
    five = make(answered_by("five"))
    routes = (RouteConfig(models=("gpt-4*",), upstreams=("four",)),)
    proxy = proxies(multi_config([("four", four.url, 2), ("five", five.url, 1)], routes=routes))
    path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    for _ in range(5):
        resp = exchange(
            proxy.port,
            request_bytes("POST", path, [("api-key", CLIENT_KEY)], b'{"messages":[]}'),
        )
        assert resp.json() == {"from": "four"}


def test_a_route_whose_upstreams_refuse_does_not_spill_to_others(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    opus = make(answers(refusal(429, ("retry-after", "30"))))
    other = make(answered_by("other"))
    routes = (RouteConfig(models=("claude-opus-*",), upstreams=("opus",)),)
    proxy = proxies(multi_config([("opus", opus.url), ("other", other.url)], routes=routes))
    resp = post(proxy.port, b'{"model":"claude-opus-4-8"}')
    assert resp.status == 429
    assert len(other.requests) == 0


# ================================================================ the official SDKs


@pytest.fixture
def mock_url(lt: LoopThread) -> Iterator[str]:
    foundry = MockFoundry(api_key=UPSTREAM_KEY, delay=0.0)
    runner, port = lt.run(start_mock(foundry))
    yield f"http://127.0.0.1:{port}"
    lt.run(runner.cleanup())


def test_the_sdks_and_a_streamed_message_through_a_failover(
    make: Callable[..., RawUpstream],
    proxies: Callable[[Config], ProxyHandle],
    mock_url: str,
) -> None:
    count = {"n": 0}

    def busy_every_time(request: Recorded) -> list[Any]:
        count["n"] += 1
        return [refusal(429, ("retry-after-ms", "0"))]  # refuses, never rests

    busy = make(busy_every_time)
    proxy = proxies(multi_config([("busy", busy.url, 1), ("mock", mock_url, 2)]))
    claude = anthropic.Anthropic(
        base_url=proxy.url + "/anthropic", api_key=CLIENT_KEY, max_retries=0
    )
    msg = claude.messages.create(
        model="claude-opus-4-8", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.content[0].type == "text"
    with claude.messages.stream(
        model="claude-opus-4-8", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens > 0
    gpt = openai.OpenAI(base_url=proxy.url + "/openai/v1", api_key=CLIENT_KEY, max_retries=0)
    chat = gpt.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content
    assert count["n"] == 3  # each request met the refusal first


# ================================================================ the old form, untouched


def test_a_single_upstream_url_never_cools_down(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    busy = make(answers(refusal(429, ("retry-after", "30"))))
    proxy = proxies(make_config(busy.url))
    for _ in range(3):
        assert post(proxy.port).status == 429
    assert len(busy.requests) == 3  # every request reaches it, as before
    assert proxy.server.readiness() == (True, "ok")


def _admin_port0() -> Any:
    from claude_proxy.config import AdminConfig

    return AdminConfig(port=0)


def test_the_json_access_line_names_the_upstream_and_attempts() -> None:
    from claude_proxy.logs import access_json

    rec = exchange_record(upstream="fine", attempts=2)
    doc = json.loads(access_json(rec))
    assert doc["upstream"] == "fine" and doc["attempts"] == 2
    assert "upstream" not in json.loads(access_json(dataclasses.replace(rec, upstream=None)))


# ================================================================ edges of the new states


def test_a_head_request_refused_moves_on(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    busy = make(
        answers(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 30\r\nContent-Length: 9\r\n\r\n")
    )
    fine = make(answers(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"))
    proxy = proxies(multi_config([("busy", busy.url, 1), ("fine", fine.url, 2)]))
    resp = exchange(proxy.port, request_bytes("HEAD", "/v1/models", [KEY]), head=True)
    assert resp.status == 200 and resp.header("content-length") == b"5"
    assert len(busy.requests) == len(fine.requests) == 1


def test_a_chunked_refusal_is_relayed_with_its_trailers_when_it_is_the_last(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    first = make(answers(refusal(503, ("retry-after", "30"))))
    chunked = (
        b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\nTrailer: x-end\r\n"
        b"retry-after: 20\r\n\r\n5\r\nslow \r\n4\r\ndown\r\n0\r\nx-end: yes\r\n\r\n"
    )
    last = make(answers(chunked))
    proxy = proxies(multi_config([("first", first.url, 1), ("last", last.url, 2)]))
    with raw_connect(proxy.port) as sock:
        sock.sendall(request_bytes("POST", MESSAGES, [KEY], b'{"model":"m"}'))
        resp = read_response(sock)
    assert resp.status == 429 and resp.body == b"slow down"
    assert resp.header("retry-after") == b"20"
    assert resp.raw.endswith(b"0\r\nx-end: yes\r\n\r\n")


def test_pipelined_requests_keep_their_order_through_a_failover(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    def busy_for_first(request: Recorded) -> list[Any]:
        if b"first" in request.body:
            return [refusal(429, ("retry-after", "0"))]
        return [ok_response(b"busy saw " + bytes(request.body))]

    busy = make(busy_for_first)
    fine = make(lambda r: [ok_response(b"fine saw " + bytes(r.body))])
    proxy = proxies(multi_config([("busy", busy.url, 1), ("fine", fine.url, 2)]))
    with raw_connect(proxy.port) as sock:
        sock.sendall(
            request_bytes("POST", MESSAGES, [KEY], b"first")
            + request_bytes("POST", MESSAGES, [KEY], b"second")
        )
        one, two = read_responses(sock, 2)  # both may come in one read
    assert one.body == b"fine saw first"
    assert two.body == b"busy saw second"  # retry-after 0: busy is not resting


def test_a_client_gone_while_a_refusal_is_read_ends_everything(
    make: Callable[..., RawUpstream],
    proxies: Callable[[Config], ProxyHandle],
    lt: LoopThread,
) -> None:
    release = threading.Event()
    head = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 30\r\nContent-Length: 10\r\n\r\n"
    slow = make(answers(head, b"12345", release, b"67890"))
    spare = make(answered_by("spare"))
    proxy = proxies(multi_config([("slow", slow.url, 1), ("spare", spare.url, 2)]))
    try:
        with raw_connect(proxy.port) as sock:
            sock.sendall(request_bytes("POST", MESSAGES, [KEY], b'{"model":"m"}'))
            slow.wait_for(lambda: len(slow.requests) == 1)
            state = proxy.server.state
            assert state is not None
            lt_wait(
                lt,
                lambda: any(
                    c.active is not None and c.active.resp.label == "refused"
                    for c in state.connections
                ),
            )
        # the client is gone: the exchange ends, the refusing upstream is let go, nothing
        # goes to the spare
        lt_wait(lt, lambda: not any(c.active for c in state.connections))
        slow.wait_for(lambda: not slow.open_protocols)
    finally:
        release.set()
    assert spare.requests == []


def lt_wait(lt: LoopThread, predicate: Callable[[], bool]) -> None:
    """Wait for a condition on the proxy's own state, read on its loop."""
    wait_until(lambda: lt.call(predicate))


def test_a_routed_body_that_waits_for_100_continue_is_asked_for(
    make: Callable[..., RawUpstream], proxies: Callable[[Config], ProxyHandle]
) -> None:
    """Routing needs the body before any upstream is asked: the proxy says 100 itself."""
    opus = make(answered_by("opus"))
    other = make(answered_by("other"))
    routes = (RouteConfig(models=("claude-opus-*",), upstreams=("opus",)),)
    proxy = proxies(multi_config([("opus", opus.url), ("other", other.url)], routes=routes))
    body = b'{"model":"claude-opus-4-8","messages":[]}'
    head = request_bytes(
        "POST",
        MESSAGES,
        [KEY, ("content-type", "application/json"), ("expect", "100-continue")],
        body,
    )[: -len(body)]
    with raw_connect(proxy.port) as sock:
        sock.sendall(head)
        sock.settimeout(5)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body[:10])
        sock.sendall(body[10:])  # the model's route is known only now
        resp = read_response(sock)
    assert resp.json() == {"from": "opus"} and opus.requests[0].body == body


@pytest.mark.parametrize("known_failed", [False, True], ids=["while-acquiring", "known-failed"])
def test_an_upstream_whose_credential_fails_moves_the_request_on(
    make: Callable[..., RawUpstream],
    proxies: Callable[[Config], ProxyHandle],
    access_log: pytest.LogCaptureFixture,
    known_failed: bool,
) -> None:
    """An Entra token for one upstream cannot be had (its token endpoint is down): the
    request goes to the next upstream, which has a key of its own."""
    entra = make(answered_by("entra"))
    keyed = make(answered_by("keyed"))
    config = multi_config([("entra", entra.url, 1), ("keyed", keyed.url, 2)])
    down = UpstreamAuthConfig(
        type="azure_ad",
        tenant_id="00000000-0000-0000-0000-000000000001",
        client_id="00000000-0000-0000-0000-000000000002",
        client_secret="not-a-real-secret-0123456789",
        authority_host=f"https://127.0.0.1:{closed_port()}",
        token_timeout=5.0,
    )
    SECRETS.add("not-a-real-secret-0123456789")
    first = dataclasses.replace(config.upstreams[0], auth=down)
    proxy = proxies(dataclasses.replace(config, upstreams=(first, config.upstreams[1])))
    if known_failed:  # the failure is on record before the request: credential_now says so
        from claude_proxy.credentials import TokenAuth

        auth = proxy.server.auths[down]
        assert isinstance(auth, TokenAuth)
        wait_until(lambda: proxy.lt.call(lambda: not auth.acquiring and not auth.ready()))
    resp = post(proxy.port)
    assert resp.json() == {"from": "keyed"}
    assert entra.requests == []
    assert any(
        "failover: entra -> keyed (credential)" in r.getMessage() for r in access_log.records
    )
