from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from claude_proxy.headers import scan
from claude_proxy.metrics import Metrics, exposition
from claude_proxy.record import ExchangeRecord
from claude_proxy.usage import JSON, NOT_READ, STREAM, StreamReader, counts, kind_of, read_json

from ..records import exchange_record


def sse(event: str, doc: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(doc)}\n\n".encode()


ANTHROPIC_STREAM = b"".join(
    [
        sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "model": "claude-sonnet-4-5",
                    "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 7},
                },
            },
        ),
        sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "delta": {"type": "text_delta", "text": 'say "usage": 1'},
            },
        ),
        sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 5}}),
        sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 12}}),
        sse("message_stop", {"type": "message_stop"}),
    ]
)

OPENAI_STREAM = b"".join(
    [b'data: {"model":"gpt-4o","choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'] * 3
    + [
        b'data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":9,'
        b'"completion_tokens":4,"total_tokens":13}}\n\n',
        b"data: [DONE]\n\n",
    ]
)

RESPONSES_STREAM = b"".join(
    [
        sse(
            "response.created",
            {"type": "response.created", "response": {"model": "o4", "usage": None}},
        ),
        sse(
            "response.completed",
            {
                "type": "response.completed",
                "response": {"model": "o4", "usage": {"input_tokens": 3, "output_tokens": 8}},
            },
        ),
    ]
)


@pytest.mark.parametrize(
    ("stream", "model", "expected"),
    [
        (ANTHROPIC_STREAM, "claude-sonnet-4-5", {"input": 25, "output": 12, "cache_read": 7}),
        (OPENAI_STREAM, "gpt-4o", {"input": 9, "output": 4}),
        (RESPONSES_STREAM, "o4", {"input": 3, "output": 8}),
    ],
)
@pytest.mark.parametrize("split", [1, 7, 64, 10_000])
def test_streams_any_split(stream: bytes, model: str, expected: dict, split: int) -> None:
    reader = StreamReader()
    scanned = 0
    for i in range(0, len(stream), split):
        chunk = stream[i : i + split]
        if reader.look(chunk):
            reader.scan(chunk)
            scanned += 1
    reader.finish()
    if split == 10_000:  # one chunk, with usage in it
        assert scanned == 1
    assert reader.usage is not None and reader.usage[0] == model
    assert counts(reader.usage) == expected


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {
                "model": "claude-x",
                "content": [{"type": "text", "text": "hi"}],
                "usage": {
                    "input_tokens": 10,
                    "output_tokens": 20,
                    "cache_creation_input_tokens": 3,
                },
            },
            {"input": 10, "output": 20, "cache_write": 3},
        ),
        (
            {
                "model": "gpt-x",
                "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            },
            {"input": 1, "output": 2},
        ),
        (
            {"model": "o4", "output": [], "usage": {"input_tokens": 4, "output_tokens": 5}},
            {"input": 4, "output": 5},
        ),
        ({"error": {"message": "nope"}}, {}),
        # a nested "usage" after the top-level one (tool input): the whole body is parsed
        (
            {
                "model": "m",
                "usage": {"input_tokens": 7, "output_tokens": 8},
                "content": [{"type": "tool_use", "input": {"usage": {"verbose": True}}}],
            },
            {"input": 7, "output": 8},
        ),
        (
            {
                "model": "m",
                "usage": {"input_tokens": 7, "output_tokens": 8},
                "content": [{"type": "tool_use", "input": {"usage": "a string"}}],
            },
            {"input": 7, "output": 8},
        ),
        # text that mentions "usage" in quotes is escaped, so it cannot be mistaken for a key
        (
            {
                "model": "m",
                "content": [{"text": 'say "usage": {"input_tokens": 99}'}],
                "usage": {"input_tokens": 1, "output_tokens": 2},
            },
            {"input": 1, "output": 2},
        ),
        (
            {"model": "\u00e9" * 300, "usage": {"input_tokens": 3, "output_tokens": 4}},
            {"input": 3, "output": 4},
        ),
        ({"usage": {"input_tokens": True, "output_tokens": -1}}, {}),
        # Anthropic reports absent cache figures as null
        (
            {
                "model": "m",
                "usage": {
                    "input_tokens": 5,
                    "cache_read_input_tokens": None,
                    "cache_creation_input_tokens": None,
                    "cache_creation": {"ephemeral_5m_input_tokens": 9},
                    "output_tokens": 6,
                    "service_tier": "standard",
                },
            },
            {"input": 5, "output": 6},
        ),
        # fields of unexpected types: decoded again by the standard library, the rest still read
        (
            {"model": "m", "usage": {"input_tokens": 5, "output_tokens": 6.5}},
            {"input": 5},
        ),
        (
            {"model": 7, "message": "text", "usage": {"prompt_tokens": 2}},
            {"input": 2},
        ),
        # only the top-level usage counts, wherever a nested one sits
        (
            {
                "content": [{"type": "tool_use", "input": {"usage": {"input_tokens": 99}}}],
                "model": "m",
                "usage": {"input_tokens": 1, "output_tokens": 2},
            },
            {"input": 1, "output": 2},
        ),
    ],
)
def test_json_bodies(doc: dict, expected: dict) -> None:
    body = json.dumps(doc).encode()
    usage = read_json([body[:10], body[10:]])  # the chunks as they arrived
    assert counts(usage) == expected
    if expected and isinstance(doc["model"], str):
        assert usage is not None
        assert usage[0] == doc["model"][:200]  # names are capped at 200 characters


@pytest.mark.parametrize(
    "body",
    [
        b'{"model" : "claude-x" ,"usage" :\n {"input_tokens" : 10, "output_tokens":20,'
        b' "cache_creation": {"ephemeral_5m_input_tokens": 3}, "service_tier": "standard"}}',
        b'{"id":"x","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":10,'
        b'"completion_tokens":20,"prompt_tokens_details":{"cached_tokens":0}}}',
    ],
)
def test_scan_matches_a_full_parse(body: bytes) -> None:
    usage = read_json([body])
    assert counts(usage) == {"input": 10, "output": 20}
    assert usage is not None and usage[0] in ("claude-x", "gpt-4o")


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Type", b"application/json"), (b"Content-Encoding", b"gzip")],
        [(b"Content-Type", b"text/event-stream"), (b"content-encoding", b"br")],
        [(b"Content-Type", b"text/plain")],
        [(b"Content-Type", b"application/octet-stream")],
        [],
    ],
)
def test_not_read(headers: list[tuple[bytes, bytes]]) -> None:
    assert kind_of(scan(headers)) == NOT_READ


@pytest.mark.parametrize(
    ("headers", "kind"),
    [
        ([(b"Content-Type", b"application/json; charset=utf-8")], JSON),
        ([(b"content-type", b"text/event-stream"), (b"Content-Encoding", b"identity")], STREAM),
    ],
)
def test_read(headers: list[tuple[bytes, bytes]], kind: int) -> None:
    assert kind_of(scan(headers)) == kind


def test_a_byte_order_mark_is_allowed() -> None:
    usage = read_json([b'\xef\xbb\xbf{"model": "m", "usage": {"input_tokens": 3}}'])
    assert usage == ("m", [3, -1, -1, -1])


def test_a_body_without_usage_counts_nothing() -> None:
    assert read_json([b'{"model": "m", "data": [' + b'{"usage": 1}, ' * 1000 + b"{}]}"]) is None


@pytest.mark.parametrize(
    ("chunks", "scanned"),
    [
        # text deltas, whole events: only looked at
        ([b'event: content_block_delta\ndata: {"delta": {"text": "a usage"}}\n\n'] * 3, 0),
        ([b'data: {"choices": [], "usage": null}\n\n', b'data: {"usage" : null}\r\n\r\n'], 0),
        # usage, or a chunk that ends inside a line (and the one after it): scanned
        ([b'data: {"usage":{"prompt_tokens":1}}\n\n'], 1),
        ([b'data: {"usage" : {"prompt_tokens":1}}\n\n'], 1),
        ([b"data: {", b'"usa', b'ge": null}\n\n', b"data: {}\n\n"], 3),
    ],
)
def test_only_chunks_that_may_hold_usage_are_scanned(chunks: list[bytes], scanned: int) -> None:
    reader = StreamReader()
    assert sum(reader.look(chunk) for chunk in chunks) == scanned


def test_garbage_is_ignored() -> None:
    reader = StreamReader()
    chunk = b'data: {"usage": {broken\n\ndata: [1, 2]\n\n' + b"x" * 100
    assert reader.look(chunk)
    reader.scan(chunk)
    reader.finish()
    assert reader.usage is None and reader.model is None
    assert read_json([b'{"usage": ']) is None


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def rec(client: str, model: str | None, tokens: list[int]) -> ExchangeRecord:
    n = [t if t >= 0 else None for t in tokens]
    return exchange_record(
        request_id="r",
        client_key=client,
        client_addr="",
        path="/v1/messages",
        ttfb=0.01,
        duration=0.02,
        model=model,
        input_tokens=n[0],
        output_tokens=n[1],
        cache_read_tokens=n[2],
        cache_write_tokens=n[3],
    )


def test_tokens_are_summed_per_client_and_model() -> None:
    metrics = Metrics()
    metrics.observe_record(rec("alice", "m1", [3, 4, -1, -1]))
    metrics.observe_record(rec("alice", "m1", [1, -1, 2, 0]))
    metrics.observe_record(rec("bob", None, [-1, 5, -1, 6]))
    exposition(metrics)
    metrics.observe_record(rec("alice", "m1", [-1, 10, -1, -1]))
    exposition(metrics)
    assert samples(metrics.registry, "claude_proxy_tokens_total") == {
        (("client", "alice"), ("kind", "input"), ("model", "m1")): 4,
        (("client", "alice"), ("kind", "output"), ("model", "m1")): 14,
        (("client", "alice"), ("kind", "cache_read"), ("model", "m1")): 2,
        (("client", "bob"), ("kind", "output"), ("model", "unknown")): 5,
        (("client", "bob"), ("kind", "cache_write"), ("model", "unknown")): 6,
    }
