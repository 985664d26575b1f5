"""A local stand-in for Microsoft AI Foundry, for the demo and the tests.

Serves the Anthropic surface (``/anthropic/v1/messages``, streamed or not, and
``count_tokens``) and the OpenAI v1 surface (``/openai/v1/chat/completions`` and
``/openai/v1/responses``, streamed or not), also without the ``/anthropic`` / ``/openai``
prefix. It checks the credential the proxy attaches and replies with recognisable text.
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
        for prefix in ("/anthropic", ""):
            app.router.add_post(f"{prefix}/v1/messages", self.messages)
            app.router.add_post(f"{prefix}/v1/messages/count_tokens", self.count_tokens)
        for prefix in ("/openai", ""):
            app.router.add_post(f"{prefix}/v1/chat/completions", self.chat)
            app.router.add_post(f"{prefix}/v1/responses", self.responses)
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

    async def _read(self, request: web.Request, anthropic: bool) -> dict[str, Any] | web.Response:
        self.seen.append({"path": request.path_qs, "headers": request.headers.copy()})
        if not self._authorized(request):
            if anthropic:
                body: dict[str, Any] = {
                    "type": "error",
                    "error": {
                        "type": "authentication_error",
                        "message": "mock: invalid credential",
                    },
                }
            else:
                body = {
                    "error": {
                        "message": "mock: invalid credential",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                }
            return web.json_response(body, status=401)
        try:
            doc = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "mock: body is not JSON"}}, status=400)
        if not isinstance(doc, dict):
            return web.json_response({"error": {"message": "mock: expected an object"}}, status=400)
        return doc

    async def not_found(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": f"mock: no route {request.path}"}}, status=404
        )

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
        text = reply_text(user)
        words = text.split(" ")
        model = str(doc.get("model", "mock-model"))
        in_tokens = len(user.split())
        usage = {
            "input_tokens": in_tokens,
            "output_tokens": len(words),
            "total_tokens": in_tokens + len(words),
        }
        rid = "resp_mock" + uuid.uuid4().hex[:12]
        item = {
            "id": "msg_" + rid,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        done = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": model,
            "output": [item],
            "usage": usage,
        }
        if not doc.get("stream"):
            return web.json_response(done)

        async def events() -> AsyncIterator[bytes]:
            started = {**done, "status": "in_progress", "output": [], "usage": None}
            yield sse(
                "response.created",
                {"type": "response.created", "response": started, "sequence_number": 0},
            )
            n = 1
            for i, word in enumerate(words):
                yield sse(
                    "response.output_text.delta",
                    {
                        "type": "response.output_text.delta",
                        "item_id": item["id"],
                        "output_index": 0,
                        "content_index": 0,
                        "delta": word if i == 0 else " " + word,
                        "sequence_number": n,
                    },
                )
                n += 1
            yield sse(
                "response.completed",
                {"type": "response.completed", "response": done, "sequence_number": n},
            )

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
