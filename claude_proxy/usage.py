"""Token usage read on the side from responses, without touching a byte sent to the client.

Pure: the relay feeds the same body bytes it has already written. JSON bodies are kept (up to
:data:`MAX_JSON`) and parsed once complete; event streams are scanned per chunk, and only the
``data:`` lines that mention ``"usage"`` are parsed. Compressed or other content is never read.

What is recognised:

* Anthropic JSON and ``message_start`` / ``message_delta`` events (``input_tokens``,
  ``output_tokens``, ``cache_read_input_tokens``, ``cache_creation_input_tokens``);
* OpenAI chat completions JSON and the final chunk (``prompt_tokens``, ``completion_tokens``);
* OpenAI responses JSON and ``response.completed`` (``input_tokens``, ``output_tokens``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from .headers import HeaderScan, scan

MAX_JSON: Final = 4 * 1024 * 1024
MAX_LINE: Final = 1024 * 1024
KINDS: Final = ("input", "output", "cache_read", "cache_write")


def reader_for(
    headers: Sequence[tuple[bytes, bytes]], scanned: HeaderScan | None = None
) -> UsageReader | None:
    """A reader when the response is plain JSON or an event stream, else None."""
    scanned = scanned or scan(headers)
    if scanned.content_encoding not in (b"", b"identity"):
        return None
    ctype = scanned.content_type
    if ctype.startswith(b"text/event-stream"):
        return UsageReader(stream=True)
    if ctype.startswith(b"application/json"):
        return UsageReader(stream=False)
    return None


_TOKEN_FIELDS: Final = (
    ("input_tokens", "input"),
    ("prompt_tokens", "input"),
    ("output_tokens", "output"),
    ("completion_tokens", "output"),
    ("cache_read_input_tokens", "cache_read"),
    ("cache_creation_input_tokens", "cache_write"),
)
_TOKEN_KEYS: Final = frozenset(key for key, _ in _TOKEN_FIELDS)
_WHITESPACE: Final = b" \t\r\n"
_DECODER: Final = json.JSONDecoder()
# A usage object or a model name is far shorter than this; longer: the whole body is parsed.
_SLICE: Final = 4096


def _value_after(body: bytes, key: bytes, *, last: bool, size: int = _SLICE) -> Any:
    """The JSON value of ``key`` in ``body`` without parsing the rest of it.

    In valid JSON a quote inside a string is escaped, so ``"usage"`` followed by a colon can only
    be an object key. The top-level ``usage`` is the last one in both APIs' responses and the
    top-level ``model`` the first; a nested one found instead fails the caller's checks and the
    body is parsed whole. None when absent or not decodable.
    """
    at = body.rfind(key) if last else body.find(key)
    if at < 0:
        return None
    i = at + len(key)
    end = len(body)
    while i < end and body[i] in _WHITESPACE:
        i += 1
    if i >= end or body[i] != 0x3A:  # ':'
        return None
    try:
        value, _ = _DECODER.raw_decode(body[i + 1 : i + 1 + size].decode("utf-8").lstrip())
    except ValueError:  # includes UnicodeDecodeError: a slice may cut a character
        return None
    return value


class UsageReader:
    __slots__ = ("_body", "_size", "counts", "model", "stream")

    def __init__(self, *, stream: bool) -> None:
        self.stream = stream
        self._body: list[bytes] | None = []
        self._size = 0
        self.counts: dict[str, int] = {}
        self.model: str | None = None

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
                # OpenAI repeats "usage": null in every chunk but the last: not worth a parse
                if (
                    line.startswith(b"data:")
                    and b'"usage"' in line
                    and b'"usage":null' not in line
                    and b'"usage": null' not in line
                ):
                    self._take(line[5:])

    def finish(self) -> None:
        """Call once the response is complete (JSON is only read then)."""
        if not self.stream and self._body:
            body = b"".join(self._body)
            usage = _value_after(body, b'"usage"', last=True)
            model = _value_after(body, b'"model"', last=False, size=512)
            if (
                isinstance(usage, dict)
                and _TOKEN_KEYS.intersection(usage)
                and (isinstance(model, str) or b'"model"' not in body)
            ):
                self._read({"usage": usage, "model": model})
            else:
                self._take(body)  # an unusual layout (or a long, escaped name): parse it all
        self._body = None

    def _take(self, raw: bytes) -> None:
        try:
            doc = json.loads(raw)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        for holder in (doc, doc.get("message"), doc.get("response")):
            if isinstance(holder, dict):
                self._read(holder)

    def _read(self, holder: dict[str, Any]) -> None:
        model = holder.get("model")
        if isinstance(model, str) and model:
            self.model = model[:200]
        usage = holder.get("usage")
        if not isinstance(usage, dict):
            return
        for key, kind in _TOKEN_FIELDS:
            value = usage.get(key)
            # Anthropic's message_delta repeats totals so far: the latest value wins.
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                self.counts[kind] = value
