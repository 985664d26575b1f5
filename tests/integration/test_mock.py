"""The bundled Foundry mock against the real openai and anthropic SDKs, with no proxy between."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from claude_proxy.mock import (
    ANTHROPIC_HINT,
    MODELS,
    OPENAI_HINT,
    REPLY_PREFIX,
    SERVED_HINT,
    MockFoundry,
    not_found_hint,
    response_events,
    response_object,
    start_mock,
)

KEY = "mock-upstream-key"
ANSWER = f"{REPLY_PREFIX} You said: ping from the SDK"


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, port = await start_mock(MockFoundry(api_key=KEY, delay=0.0))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/openai/v1", api_key=KEY, max_retries=0)


async def test_responses_stream_gives_the_answer(mock_url: str) -> None:
    async with openai_client(mock_url) as client:
        async with client.responses.stream(model="gpt-5", input="ping from the SDK") as stream:
            types = [event.type async for event in stream]
            final = await stream.get_final_response()
    assert final.output_text == ANSWER
    assert final.usage is not None and final.usage.output_tokens == len(ANSWER.split(" "))
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}


async def test_responses_stream_with_message_input(mock_url: str) -> None:
    """Codex sends a list of input items, not a string."""
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    async with openai_client(mock_url) as client:
        async with client.responses.stream(model="gpt-5-codex", input=items) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == f"{REPLY_PREFIX} You said: hi"


async def test_responses_create(mock_url: str) -> None:
    async with openai_client(mock_url) as client:
        done = await client.responses.create(model="gpt-5", input="ping from the SDK")
    assert done.output_text == ANSWER
    assert done.status == "completed" and done.model == "gpt-5"


async def test_models_list(mock_url: str) -> None:
    async with openai_client(mock_url) as client:
        names = [m.id async for m in client.models.list()]
    assert set(MODELS) <= set(names)


async def test_wrong_key_is_401(mock_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=mock_url + "/openai/v1", api_key="nope", max_retries=0)
    async with client:
        with pytest.raises(openai.AuthenticationError):
            await client.responses.create(model="gpt-5", input="x")


async def test_base_url_without_anthropic_is_404_with_a_hint(mock_url: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=mock_url, api_key=KEY, max_retries=0)
    async with client:
        with pytest.raises(anthropic.NotFoundError) as info:
            await client.messages.create(
                model="claude-x",
                max_tokens=8,
                messages=[{"role": "user", "content": "x"}],
            )
    assert "/anthropic" in str(info.value)
    body = info.value.body
    assert isinstance(body, dict) and body["error"]["code"] == "404"


async def test_base_url_without_openai_is_404_with_a_hint(mock_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=mock_url + "/v1", api_key=KEY, max_retries=0)
    async with client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.responses.create(model="gpt-5", input="x")
    assert "/openai/v1" in str(info.value)


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        ("/v1/messages", ANTHROPIC_HINT),
        ("/v1/messages/count_tokens", ANTHROPIC_HINT),
        ("/v1/chat/completions", OPENAI_HINT),
        ("/v1/responses", OPENAI_HINT),
        ("/v1/models", OPENAI_HINT),
        ("/chat/completions", OPENAI_HINT),
        ("/anthropic", SERVED_HINT),
        ("/anthropic/messages", SERVED_HINT),
        ("/openai/responses", SERVED_HINT),
        ("/", SERVED_HINT),
    ],
)
def test_not_found_hint(path: str, hint: str) -> None:
    assert not_found_hint(path) == hint


def test_anthropic_models_has_its_own_hint() -> None:
    assert "no models under /anthropic" in not_found_hint("/anthropic/v1/models")


def test_every_event_is_a_valid_sdk_event() -> None:
    """Each event validates strictly against the SDK's union of stream events, numbered 0..n."""
    adapter: pydantic.TypeAdapter[ResponseStreamEvent] = pydantic.TypeAdapter(ResponseStreamEvent)
    events = response_events("gpt-5", "hello there", "resp_x")
    parsed = [adapter.validate_python(e) for e in events]
    assert [p.sequence_number for p in parsed] == list(range(len(events)))
    assert [type(p).__name__ for p in parsed][-1] == "ResponseCompletedEvent"


def test_response_object_is_a_valid_sdk_response() -> None:
    from openai.types.responses import Response

    done = Response.model_validate(response_object("gpt-5", "hello", "resp_x"))
    assert done.output_text == f"{REPLY_PREFIX} You said: hello"
    started = Response.model_validate(response_object("gpt-5", "hello", "resp_x", "in_progress"))
    assert started.output == [] and started.usage is None


def test_responses_stream_through_the_proxy(mock: tuple[MockFoundry, int], make_proxy) -> None:
    """What Codex does in the demo: the Responses stream, via the proxy, with a proxy key."""
    from ..helpers import CLIENT_KEY

    proxy = make_proxy(f"http://127.0.0.1:{mock[1]}")
    client = openai.OpenAI(base_url=proxy.url + "/openai/v1", api_key=CLIENT_KEY, max_retries=0)
    with client, client.responses.stream(model="gpt-5-codex", input="ping from the SDK") as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text == ANSWER
