"""Token usage read on the side from responses, without touching a byte sent to the client.

Pure: the relay feeds the same body bytes it has already written. JSON bodies are kept (up to
:data:`MAX_JSON`) and decoded once complete; event streams are scanned per chunk, and only the
``data:`` lines that mention ``"usage"`` are decoded. Compressed or other content is never read.

What is recognised, at the top level of a document or of its ``message`` / ``response``:

* Anthropic JSON and ``message_start`` / ``message_delta`` events (``input_tokens``,
  ``output_tokens``, ``cache_read_input_tokens``, ``cache_creation_input_tokens``);
* OpenAI chat completions JSON and the final chunk (``prompt_tokens``, ``completion_tokens``);
* OpenAI responses JSON and ``response.completed`` (``input_tokens``, ``output_tokens``).

msgspec decodes straight into the few fields above and skips the rest without building it,
which for a typical reply takes well under a microsecond. A document it cannot take (fields of
other types than expected, a byte order mark) is decoded again by the standard library and
read field by field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from .headers import HeaderScan, scan

MAX_JSON: Final = 4 * 1024 * 1024
MAX_LINE: Final = 1024 * 1024
MAX_NAME: Final = 200
KINDS: Final = ("input", "output", "cache_read", "cache_write")


def reader_for(
    headers: Sequence[tuple[bytes, bytes]], scanned: HeaderScan | None = None
) -> UsageReader | None:
    """A reader when the response is plain JSON or an event stream, else None."""
    if scanned is None:
        scanned = scan(headers)
    encoding = scanned.content_encoding
    if encoding and encoding != b"identity":
        return None
    ctype = scanned.content_type
    if ctype.startswith(b"application/json"):
        return UsageReader(False)
    if ctype.startswith(b"text/event-stream"):
        return UsageReader(True)
    return None


# (field, index in KINDS): a later field of the same kind wins (only one of them is ever
# present); _read spells the same table out for the decoded struct
_TOKEN_FIELDS: Final = (
    ("input_tokens", 0),
    ("prompt_tokens", 0),
    ("output_tokens", 1),
    ("completion_tokens", 1),
    ("cache_read_input_tokens", 2),
    ("cache_creation_input_tokens", 3),
)


class _Usage(msgspec.Struct, gc=False):
    input_tokens: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    completion_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _Holder(msgspec.Struct, gc=False):
    model: str | None = None
    usage: _Usage | None = None


class _Document(_Holder, gc=False):
    message: _Holder | None = None  # Anthropic message_start
    response: _Holder | None = None  # OpenAI response.completed


_decode: Final = msgspec.json.Decoder(_Document).decode


class UsageReader:
    """``tokens``: None until the response reports usage, then one count per :data:`KINDS`
    (-1 where it reported none of that kind)."""

    __slots__ = ("_body", "_size", "model", "stream", "tokens")

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self._body: list[bytes] | None = []
        self._size = 0
        self.tokens: list[int] | None = None
        self.model: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        """The counts reported, by kind."""
        tokens = self.tokens
        if tokens is None:
            return {}
        return {kind: n for kind, n in zip(KINDS, tokens, strict=True) if n >= 0}

    def feed(self, data: bytes) -> None:
        body = self._body
        if body is None:
            return
        if not self.stream:
            self._size += len(data)
            if self._size > MAX_JSON:
                self._body = None
            else:
                body.append(data)
            return
        if body:  # an unfinished line from the previous chunk
            data = b"".join((*body, data))
            body.clear()
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) < MAX_LINE:
                body.append(data)
            return
        if end + 1 < len(data):
            body.append(data[end + 1 :])
        if data.find(b'"usage"', 0, end) >= 0:
            for line in data[:end].split(b"\n"):
                # OpenAI repeats "usage": null in every chunk but the last: not worth a decode
                if (
                    line.startswith(b"data:")
                    and b'"usage"' in line
                    and b'"usage":null' not in line
                    and b'"usage": null' not in line
                ):
                    self._take(line[5:])

    def finish(self) -> None:
        """Call once the response is complete (JSON is only read then)."""
        parts = self._body
        self._body = None
        if self.stream or not parts:
            return
        self._take(parts[0] if len(parts) == 1 else b"".join(parts))

    def _take(self, raw: bytes) -> None:
        try:
            doc = _decode(raw)
        except msgspec.DecodeError:  # another shape (or a byte order mark): the slow way
            self._take_any(raw)
            return
        self._read(doc.usage, doc.model)
        if doc.message is not None:
            self._read(doc.message.usage, doc.message.model)
        if doc.response is not None:
            self._read(doc.response.usage, doc.response.model)

    def _take_any(self, raw: bytes) -> None:
        try:
            doc = json.loads(raw)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        for holder in (doc, doc.get("message"), doc.get("response")):
            if isinstance(holder, dict):
                usage = holder.get("usage")
                self._read(usage if isinstance(usage, dict) else None, holder.get("model"))

    def _read(self, usage: _Usage | dict[str, Any] | None, model: object) -> None:
        if isinstance(model, str) and model:
            self.model = model[:MAX_NAME]
        if usage is None:
            return
        tokens = self.tokens
        if tokens is None:
            tokens = self.tokens = [-1, -1, -1, -1]
        # Anthropic's message_delta repeats totals so far: the latest value wins.
        if isinstance(usage, _Usage):
            n = usage.input_tokens if usage.prompt_tokens is None else usage.prompt_tokens
            if n is not None and n >= 0:
                tokens[0] = n
            n = usage.output_tokens if usage.completion_tokens is None else usage.completion_tokens
            if n is not None and n >= 0:
                tokens[1] = n
            n = usage.cache_read_input_tokens
            if n is not None and n >= 0:
                tokens[2] = n
            n = usage.cache_creation_input_tokens
            if n is not None and n >= 0:
                tokens[3] = n
            return
        for key, index in _TOKEN_FIELDS:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                tokens[index] = value
