"""A local stand-in for Microsoft AI Foundry, for the demo and the tests.

Serves what Foundry serves, at Foundry's paths: the Anthropic surface
(``/anthropic/v1/messages``, streamed or not, and ``count_tokens``), the OpenAI v1 surface
(``/openai/v1/chat/completions``, ``/openai/v1/responses`` streamed or not, ``/openai/v1/models``)
and the older ``/openai/deployments/{name}/chat/completions``. Any other path gets Foundry's 404,
with a hint when the path lacks ``/anthropic`` or ``/openai`` (a base URL without it works nowhere
on Foundry, so it must not work in the demo either). It checks the credential the proxy attaches
and replies with recognisable text.

A Responses stream follows OpenAI's published event sequence, each event with the fields the
OpenAI SDK's typed events have (``openai/types/responses/``), so Codex and ``responses.stream()``
assemble the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

REPLY_PREFIX = "Hello from the claude-proxy mock!"
# What /openai/v1/models lists; any other name is answered as well (it is echoed back).
MODELS = (
    "claude-sonnet-4-6",
    "claude-opus-4-6",
    "claude-haiku-4-5",
    "gpt-4o",
    "gpt-4.1",
    "gpt-5",
    "gpt-5-codex",
    "mock-model",
)
ANTHROPIC_HINT = (
    "Anthropic models are served under /anthropic: end the client's base URL with /anthropic "
    "(ANTHROPIC_BASE_URL=http://<proxy>/anthropic)."
)
OPENAI_HINT = (
    "OpenAI models are served under /openai/v1: end the client's base URL with /openai/v1 "
    '(for Codex, base_url = "http://<proxy>/openai/v1").'
)
SERVED_HINT = (
    "Foundry serves /anthropic/v1/messages, /anthropic/v1/messages/count_tokens, "
    "/openai/v1/chat/completions, /openai/v1/responses, /openai/v1/models and "
    "/openai/deployments/<name>/chat/completions."
)


class MockFoundry:
    """The mock's state: what credential it wants, how slowly it streams, what it has seen."""

    def __init__(
        self,
        api_key: str | None = None,
        token: str | None = None,
        delay: float = 0.02,
    ) -> None:
        self.api_key = api_key
        self.token = token
        self.delay = delay
        self.seen: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- plumbing

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/anthropic/v1/messages", self.messages)
        app.router.add_post("/anthropic/v1/messages/count_tokens", self.count_tokens)
        app.router.add_post("/openai/v1/chat/completions", self.chat)
        app.router.add_post("/openai/v1/responses", self.responses)
        app.router.add_get("/openai/v1/models", self.models)
        # The older Azure OpenAI surface: deployment in the path, api-version in the query.
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.chat)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    def _authorized(self, request: web.Request) -> bool:
        accepted = [v for v in (self.api_key, self.token) if v]
        if not accepted:
            return True
        offered = [request.headers.get("x-api-key"), request.headers.get("api-key")]
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:])
        return any(
            o is not None and hmac.compare_digest(o.encode(), a.encode())
            for o in offered
            for a in accepted
        )

    async def _read(
        self, request: web.Request, anthropic: bool, body: bool = True
    ) -> dict[str, Any] | web.Response:
        self.seen.append({"path": request.path_qs, "headers": request.headers.copy()})
        if not self._authorized(request):
            if anthropic:
                error: dict[str, Any] = {
                    "type": "error",
                    "error": {
                        "type": "authentication_error",
                        "message": "mock: invalid credential",
                    },
                }
            else:
                error = {
                    "error": {
                        "message": "mock: invalid credential",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                }
            return web.json_response(error, status=401)
        if not body:
            return {}
        try:
            doc = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "mock: body is not JSON"}}, status=400)
        if not isinstance(doc, dict):
            return web.json_response({"error": {"message": "mock: expected an object"}}, status=400)
        return doc

    async def not_found(self, request: web.Request) -> web.Response:
        """Foundry's 404 body, its message followed by what to change."""
        self.seen.append({"path": request.path_qs, "headers": request.headers.copy()})
        message = f"Resource not found. {not_found_hint(request.path)}"
        return web.json_response({"error": {"code": "404", "message": message}}, status=404)

    async def models(self, request: web.Request) -> web.Response:
        doc = await self._read(request, anthropic=False, body=False)
        if isinstance(doc, web.Response):
            return doc
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "claude-proxy-mock"}
            for name in MODELS
        ]
        return web.json_response({"object": "list", "data": data})

    # ---------------------------------------------------------------- Anthropic

    async def messages(self, request: web.Request) -> web.StreamResponse:
        doc = await self._read(request, anthropic=True)
        if isinstance(doc, web.Response):
            return doc
        text, words, model, in_tokens = reply_for(doc)
        msg_id = "msg_mock_" + uuid.uuid4().hex[:12]
        if not doc.get("stream"):
            return web.json_response(
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": in_tokens, "output_tokens": len(words)},
                }
            )

        async def events() -> AsyncIterator[bytes]:
            yield sse(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": in_tokens, "output_tokens": 1},
                    },
                },
            )
            yield sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                yield sse(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": len(words)},
                },
            )
            yield sse("message_stop", {"type": "message_stop"})

        return await self._stream(request, events())

    async def count_tokens(self, request: web.Request) -> web.Response:
        doc = await self._read(request, anthropic=True)
        if isinstance(doc, web.Response):
            return doc
        return web.json_response({"input_tokens": count_words(doc.get("messages"))})

    # ---------------------------------------------------------------- OpenAI

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await self._read(request, anthropic=False)
        if isinstance(doc, web.Response):
            return doc
        text, words, model, in_tokens = reply_for(doc)
        usage = {
            "prompt_tokens": in_tokens,
            "completion_tokens": len(words),
            "total_tokens": in_tokens + len(words),
        }
        cid = "chatcmpl-mock" + uuid.uuid4().hex[:12]
        created = int(time.time())
        if not doc.get("stream"):
            return web.json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                    "usage": usage,
                }
            )

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            return data_line(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
            )

        include_usage = bool((doc.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""}, None)
            for i, word in enumerate(words):
                yield chunk({"content": word if i == 0 else " " + word}, None)
            yield chunk({}, "stop")
            if include_usage:
                yield data_line(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"

        return await self._stream(request, events())

    async def responses(self, request: web.Request) -> web.StreamResponse:
        doc = await self._read(request, anthropic=False)
        if isinstance(doc, web.Response):
            return doc
        prompt = doc.get("input")
        user = prompt if isinstance(prompt, str) else last_user_text(prompt)
        model = str(doc.get("model", "mock-model"))
        if not doc.get("stream"):
            return web.json_response(response_object(model, user, "resp_mock" + _hex()))

        async def events() -> AsyncIterator[bytes]:
            for event in response_events(model, user, "resp_mock" + _hex()):
                yield sse(event["type"], event)

        return await self._stream(request, events())

    async def _stream(
        self, request: web.Request, events: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)
        try:
            async for event in events:
                await response.write(event)
                if self.delay:
                    await asyncio.sleep(self.delay)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away mid-stream: normal
        return response


def _hex() -> str:
    return uuid.uuid4().hex[:12]


def response_object(model: str, user: str, rid: str, status: str = "completed") -> dict[str, Any]:
    """An OpenAI Responses ``response`` object answering ``user``: finished, or as it starts
    (``status="in_progress"``: no output, no usage yet)."""
    text = reply_text(user)
    in_tokens = len(user.split())
    out_tokens = len(text.split(" "))
    done = status == "completed"
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": [output_message(rid, text, "completed")] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": in_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": in_tokens + out_tokens,
        }
        if done
        else None,
        "user": None,
        "metadata": {},
    }


def output_message(rid: str, text: str | None, status: str) -> dict[str, Any]:
    """The assistant message item; ``text`` None while it has no content part yet."""
    content = [] if text is None else [output_text(text)]
    return {
        "id": "msg_" + rid,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_events(model: str, user: str, rid: str) -> list[dict[str, Any]]:
    """A streamed Responses answer, event by event, in the order OpenAI publishes:
    created, in_progress, output_item.added, content_part.added, output_text.delta per word,
    output_text.done, content_part.done, output_item.done, completed (with usage)."""
    text = reply_text(user)
    item_id = "msg_" + rid
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}
    started = response_object(model, user, rid, status="in_progress")
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": output_message(rid, None, "in_progress"),
        },
        {"type": "response.content_part.added", **at, "part": output_text("")},
    ]
    for i, word in enumerate(text.split(" ")):
        delta = word if i == 0 else " " + word
        events.append({"type": "response.output_text.delta", **at, "delta": delta, "logprobs": []})
    events += [
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": output_text(text)},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": output_message(rid, text, "completed"),
        },
        {"type": "response.completed", "response": response_object(model, user, rid)},
    ]
    for n, event in enumerate(events):
        event["sequence_number"] = n
    return events


def not_found_hint(path: str) -> str:
    """What to change when Foundry has nothing at ``path``: usually the client's base URL."""
    if path.startswith("/anthropic/v1/models"):
        return "Foundry lists no models under /anthropic; name the deployment in the request."
    if path.startswith(("/anthropic", "/openai")):
        return SERVED_HINT
    if path.startswith(("/v1/messages", "/v1/complete", "/messages")):
        return ANTHROPIC_HINT
    if path.startswith(("/v1/", "/chat/", "/responses", "/models", "/deployments/")):
        return OPENAI_HINT
    return SERVED_HINT


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def data_line(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def last_user_text(messages: Any) -> str:
    """The text of the last user message in Anthropic or OpenAI message lists."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def count_words(messages: Any) -> int:
    return max(1, len(last_user_text(messages).split()))


def reply_for(doc: dict[str, Any]) -> tuple[str, list[str], str, int]:
    """The reply to a messages/chat request: text, its words, model name, input token count."""
    text = reply_text(last_user_text(doc.get("messages")))
    return (
        text,
        text.split(" "),
        str(doc.get("model", "mock-model")),
        count_words(doc.get("messages")),
    )


def reply_text(user: str) -> str:
    said = " ".join(user.split())[:200] or "nothing"
    return f"{REPLY_PREFIX} You said: {said}"


async def start_mock(
    mock: MockFoundry, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Start the mock on ``host:port`` (0: any free port); returns the runner and the port."""
    runner = web.AppRunner(mock.app(), access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    await web.SockSite(runner, sock).start()
    return runner, int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """``claude-proxy mock`` / ``python -m claude_proxy.mock``: run the mock in the foreground."""
    parser = argparse.ArgumentParser(prog="claude-proxy mock", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--api-key", help="credential the mock accepts (default: any)")
    parser.add_argument("--token", help="Entra bearer token the mock accepts as well")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds between SSE events")
    args = parser.parse_args(argv)

    async def run() -> None:
        runner, port = await start_mock(
            MockFoundry(args.api_key, args.token, args.delay), args.host, args.port
        )
        print(f"mock Foundry listening on http://{args.host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
