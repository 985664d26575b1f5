"""What routing by model costs a request once its body is complete, measured in-process.

No servers: the relay's own steps (``Exchange._request_model`` and ``Exchange._route`` in
``claude_proxy/relay.py``) are run on bodies shaped like real clients' and timed with
``time.perf_counter``. The model is taken from the first chunk when it is the body's first
member (``routing.leading_model``), else the whole body is joined and decoded
(``routing.model_of``); then ``Router.plan`` orders the upstreams.

The upstreams and the route are the ones the ``[[upstreams]]`` feature rows run with, so the
in-process figure and the wall-clock rows describe the same config.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from typing import Any, Final

from claude_proxy.config import RouteConfig, UpstreamConfig
from claude_proxy.routing import Router, leading_model, model_of

# (name, priority, weight): two at priority 1 sharing first attempts 2:1, one behind them.
UPSTREAMS: Final = (("ptu-east", 1, 2), ("ptu-west", 1, 1), ("paygo", 2, 1))
# The bench's small body names model "m": it matches, and goes to one of each priority.
ROUTE_MODELS: Final = ("m*",)
ROUTE_UPSTREAMS: Final = ("ptu-east", "paygo")

# The relay keeps a body as the pieces its reads gave. How big a piece is depends on the
# client's writes and the socket buffer (uvloop and asyncio read up to about 256 KB at once);
# the bench takes 64 KiB pieces, so a 100 KB body is two and the model is looked for in the first.
READ_SIZE: Final = 65536
BUDGET_US: Final = 20.0  # the budget for routing one Claude Code request
# The big bodies' model: a real name, which the route's "m*" does not match, so the router tries
# the route's pattern and then orders all three upstreams (the costlier of its two paths).
MODEL: Final = "claude-sonnet-4-5-20250929"


def upstreams_toml(routes: bool) -> str:
    """The ``[[upstreams]]`` tables (all at ``${upstream}``), and the route when ``routes``."""
    text = "".join(
        f'[[upstreams]]\nname = "{name}"\nurl = "${{upstream}}"\n'
        f"priority = {priority}\nweight = {weight}\n"
        for name, priority, weight in UPSTREAMS
    )
    if routes:
        text += (
            "[[routes]]\n"
            f"models = {json.dumps(list(ROUTE_MODELS))}\n"
            f"upstreams = {json.dumps(list(ROUTE_UPSTREAMS))}\n"
        )
    return text


def router() -> Router:
    """The router of the routed feature row: the three upstreams and the one route."""
    ups = [UpstreamConfig(n, "http://127.0.0.1:1", priority=p, weight=w) for n, p, w in UPSTREAMS]
    return Router(ups, [RouteConfig(ROUTE_MODELS, ROUTE_UPSTREAMS)])


# --------------------------------------------------------------------------- bodies

# Text as a coding session carries it: code with quotes, backslashes and newlines to escape.
_SNIPPET: Final = (
    'def handler(request):\n    """Return the "user" record."""\n'
    '    path = request.path.replace("\\\\", "/")\n'
    "    return {'id': request.id, 'path': path}\t# ok\n"
)


def _text(size: int, seed: int) -> str:
    words = f"step {seed}: read the file, then edit it. " + _SNIPPET
    return (words * (size // len(words) + 1))[:size]


def _messages(size: int) -> list[dict[str, Any]]:
    """User and assistant turns of text parts, about ``size`` bytes as JSON."""
    messages: list[dict[str, Any]] = []
    turn = 0
    while len(json.dumps(messages)) < size:
        role = "user" if turn % 2 == 0 else "assistant"
        parts = [{"type": "text", "text": _text(1500, turn * 3 + i)} for i in range(3)]
        messages.append({"role": role, "content": parts})
        turn += 1
    return messages


def _tools(size: int) -> list[dict[str, Any]]:
    """Tool definitions, about ``size`` bytes as JSON; the first (Task) has a "model" input."""
    tools: list[dict[str, Any]] = [
        {
            "name": "Task",
            "description": _text(1200, 900),
            "input_schema": {
                "type": "object",
                "properties": {
                    "description": {"type": "string"},
                    "prompt": {"type": "string"},
                    "model": {"type": "string", "enum": ["sonnet", "opus", "haiku"]},
                },
                "required": ["description", "prompt"],
            },
        }
    ]
    while len(json.dumps(tools)) < size:
        i = len(tools)
        tools.append(
            {
                "name": f"Tool{i}",
                "description": _text(1500, 1000 + i),
                "input_schema": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}},
                    "required": ["path"],
                },
            }
        )
    return tools


def _system() -> list[dict[str, Any]]:
    return [{"type": "text", "text": _text(3000, 7), "cache_control": {"type": "ephemeral"}}]


def claude_code_body(model: str = MODEL) -> bytes:
    """About 100 KB as Claude Code sends it: "model" first, then the conversation and tools."""
    doc = {
        "model": model,
        "messages": _messages(70_000),
        "system": _system(),
        "tools": _tools(25_000),
        "metadata": {"user_id": "user_0123456789abcdef_account__session_bench"},
        "max_tokens": 32000,
        "thinking": {"type": "enabled", "budget_tokens": 10000},
        "stream": True,
    }
    return json.dumps(doc).encode()


def sdk_body(model: str = MODEL) -> bytes:
    """The same conversation as the Anthropic Python SDK sends it: keys in alphabetical order,
    so "model" comes after the big messages array."""
    doc = {
        "max_tokens": 32000,
        "messages": _messages(70_000),
        "model": model,
        "stream": True,
        "system": _system(),
        "tools": _tools(25_000),
    }
    return json.dumps(doc).encode()


def chunks_of(body: bytes, size: int = READ_SIZE) -> list[bytes]:
    """The body as the proxy holds it: one piece per read."""
    return [body[i : i + size] for i in range(0, len(body), size)] or [b""]


# --------------------------------------------------------------------------- timing


def time_routing(chunks: Sequence[bytes], rt: Router, n: int, repeat: int = 5) -> float:
    """Microseconds per request: the best of ``repeat`` runs of ``n`` requests."""
    plan = rt.plan
    rnd = random.random
    first = chunks[0]
    join = b"".join
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            model = leading_model(first)
            if model is None:
                model = model_of(join(chunks))
            plan(model, rnd)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def cases(small_body: bytes) -> dict[str, tuple[str, bytes]]:
    """Each case: (label for the table, body)."""
    return {
        "claude_code_100kb": ("Claude Code body, model first", claude_code_body()),
        "sdk_100kb": ("Anthropic SDK body, model later", sdk_body()),
        "leading_1kb": ("1 KB body, model first", small_body),
    }


def measure_routing(small_body: bytes, n: int, repeat: int = 5) -> dict[str, Any]:
    """Every case timed, with what routing found in it (the model, how, the plan)."""
    rt = router()
    out: dict[str, Any] = {"iterations": n, "repeat": repeat, "budget_us": BUDGET_US}
    for key, (label, body) in cases(small_body).items():
        chunks = chunks_of(body)
        leading = leading_model(chunks[0])
        model = leading if leading is not None else model_of(body)
        out[key] = {
            "label": label,
            "us": time_routing(chunks, rt, n, repeat),
            "bytes": len(body),
            "chunks": [len(c) for c in chunks],
            "model": model,
            "read_by": "leading_model" if leading is not None else "model_of",
            "serving": [rt.names[i] for i in rt.serving(model)],
        }
    out["within_budget"] = out["claude_code_100kb"]["us"] <= BUDGET_US
    return out
