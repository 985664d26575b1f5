"""The official anthropic and openai SDKs, through the proxy, against the bundled mock."""

from __future__ import annotations

import anthropic
import openai
import pytest

from claude_proxy.mock import REPLY_PREFIX, MockFoundry

from ..helpers import CLIENT_KEY, UPSTREAM_KEY, ProxyHandle


@pytest.fixture
def via_proxy(mock: tuple[MockFoundry, int], make_proxy) -> ProxyHandle:
    _, port = mock
    return make_proxy(f"http://127.0.0.1:{port}")


def anthropic_client(proxy: ProxyHandle, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url + "/anthropic", max_retries=0, **kw)


CREDENTIAL_NAMES = ("x-api-key", "api-key", "authorization")
MESSAGES = [{"role": "user", "content": "ping from the SDK"}]


@pytest.mark.parametrize("how", ["api_key", "auth_token"])
def test_anthropic_messages(via_proxy: ProxyHandle, mock, how: str) -> None:
    client = anthropic_client(via_proxy, **{how: CLIENT_KEY})
    with client:
        message = client.messages.create(model="claude-x", max_tokens=20, messages=MESSAGES)
    assert message.content[0].text == f"{REPLY_PREFIX} You said: ping from the SDK"
    assert message.usage.output_tokens > 0
    # SDK versions differ in the header they use for api_key; whichever it is, the upstream
    # gets the upstream key there, and the client's key nowhere.
    seen = mock[0].seen[-1]["headers"]
    creds = {k.lower(): v for k, v in seen.items() if k.lower() in CREDENTIAL_NAMES}
    assert creds
    assert all(v in (UPSTREAM_KEY, f"Bearer {UPSTREAM_KEY}") for v in creds.values())
    assert CLIENT_KEY not in str(list(seen.items()))


def test_anthropic_streaming(via_proxy: ProxyHandle) -> None:
    with anthropic_client(via_proxy, api_key=CLIENT_KEY) as client:
        with client.messages.stream(model="claude-x", max_tokens=20, messages=MESSAGES) as s:
            pieces = list(s.text_stream)
            final = s.get_final_message()
    assert len(pieces) > 3
    assert "".join(pieces) == f"{REPLY_PREFIX} You said: ping from the SDK"
    assert final.stop_reason == "end_turn"


def test_anthropic_count_tokens_and_keepalive(via_proxy: ProxyHandle, mock) -> None:
    with anthropic_client(via_proxy, api_key=CLIENT_KEY) as client:
        for _ in range(3):
            result = client.messages.count_tokens(model="claude-x", messages=MESSAGES)
            assert result.input_tokens == 4
    assert mock[0].seen[-1]["path"] == "/anthropic/v1/messages/count_tokens"


def test_anthropic_wrong_key_is_authentication_error(via_proxy: ProxyHandle, mock) -> None:
    before = len(mock[0].seen)
    with anthropic_client(via_proxy, api_key="not-the-key") as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            client.messages.create(model="claude-x", max_tokens=5, messages=MESSAGES)
    assert info.value.status_code == 401
    assert "Invalid API key for this proxy" in str(info.value)
    assert len(mock[0].seen) == before  # never reached the upstream


def openai_client(proxy: ProxyHandle, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/openai/v1", api_key=key, max_retries=0)


def test_openai_chat(via_proxy: ProxyHandle) -> None:
    with openai_client(via_proxy) as client:
        done = client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert done.choices[0].message.content == f"{REPLY_PREFIX} You said: ping from the SDK"


def test_openai_chat_streaming(via_proxy: ProxyHandle) -> None:
    with openai_client(via_proxy) as client:
        stream = client.chat.completions.create(
            model="gpt-x", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"{REPLY_PREFIX} You said: ping from the SDK"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_openai_responses_streaming(via_proxy: ProxyHandle) -> None:
    with openai_client(via_proxy) as client:
        events = list(client.responses.create(model="gpt-x", input="hi there", stream=True))
        plain = client.responses.create(model="gpt-x", input="hi there")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == f"{REPLY_PREFIX} You said: hi there"
    assert events[-1].type == "response.completed"
    assert plain.output_text == deltas


def test_azure_openai_client_with_api_key_header(via_proxy: ProxyHandle, mock) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=via_proxy.url, api_key=CLIENT_KEY, api_version="2024-10-21", max_retries=0
    )
    with client:
        done = client.chat.completions.create(model="dep", messages=MESSAGES)
    assert done.choices[0].message.content.startswith(REPLY_PREFIX)
    seen = mock[0].seen[-1]
    assert seen["path"] == "/openai/deployments/dep/chat/completions?api-version=2024-10-21"
    assert seen["headers"]["Api-Key"] == UPSTREAM_KEY


def test_openai_wrong_key(via_proxy: ProxyHandle) -> None:
    with openai_client(via_proxy, "nope") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert info.value.code == "invalid_api_key"


async def test_async_clients_concurrently(via_proxy: ProxyHandle) -> None:
    import asyncio

    async with anthropic.AsyncAnthropic(
        base_url=via_proxy.url + "/anthropic", api_key=CLIENT_KEY, max_retries=0
    ) as client:

        async def one(i: int) -> str:
            msg = await client.messages.create(
                model="c", max_tokens=5, messages=[{"role": "user", "content": f"n{i}"}]
            )
            return msg.content[0].text

        texts = await asyncio.gather(*(one(i) for i in range(30)))
    assert texts == [f"{REPLY_PREFIX} You said: n{i}" for i in range(30)]
