"""Token usage read on the side from responses, without touching a byte sent to the client.

Pure: the relay hands over the same body bytes it has already written. A JSON reply is kept (up
to :data:`MAX_JSON`) and decoded once complete (:func:`read_json`); an event stream is scanned
per chunk (:class:`StreamReader`), and only the ``data:`` lines that mention ``"usage"`` are
decoded. Compressed or other content is never read (:func:`kind_of`).

What is recognised, at the top level of a document or of its ``message`` / ``response``:

* Anthropic JSON and ``message_start`` / ``message_delta`` events (``input_tokens``,
  ``output_tokens``, ``cache_read_input_tokens``, ``cache_creation_input_tokens``);
* OpenAI chat completions JSON and the final chunk (``prompt_tokens``, ``completion_tokens``);
* OpenAI responses JSON and ``response.completed`` (``input_tokens``, ``output_tokens``).

The result is a :data:`Usage`: the model name and one count per kind in :data:`KINDS` (-1 for a
kind not reported). msgspec decodes straight into the few fields above and skips the rest
without building it, which for a typical reply takes well under a microsecond. A document it
cannot take (fields of other types than expected, a byte order mark) is decoded again by the
standard library and read field by field.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import msgspec

from .headers import HeaderScan

MAX_JSON: Final = 4 * 1024 * 1024
MAX_LINE: Final = 1024 * 1024
MAX_NAME: Final = 200
KINDS: Final = ("input", "output", "cache_read", "cache_write")

# What kind_of finds: not read, a JSON reply, an event stream.
NOT_READ: Final = 0
JSON: Final = 1
STREAM: Final = 2

# (model name or None, [input, output, cache_read, cache_write], -1 for a kind not reported)
Usage = tuple[str | None, list[int]]


def kind_of(scanned: HeaderScan) -> int:
    """How a response with these headers is read: :data:`JSON`, :data:`STREAM` or not at all."""
    encoding = scanned.content_encoding
    if encoding and encoding != b"identity":
        return NOT_READ
    ctype = scanned.content_type
    if ctype.startswith(b"application/json"):
        return JSON
    if ctype.startswith(b"text/event-stream"):
        return STREAM
    return NOT_READ


def counts(usage: Usage | None) -> dict[str, int]:
    """The counts reported, by kind name."""
    if usage is None:
        return {}
    return {kind: n for kind, n in zip(KINDS, usage[1], strict=True) if n >= 0}


class _Tokens(msgspec.Struct, gc=False):
    input_tokens: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    completion_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _Holder(msgspec.Struct, gc=False):
    model: str | None = None
    usage: _Tokens | None = None


class _Document(_Holder, gc=False):
    message: _Holder | None = None  # Anthropic message_start
    response: _Holder | None = None  # OpenAI response.completed


_decode: Final = msgspec.json.Decoder(_Document).decode

# (field, index in KINDS): a later field of the same kind wins (only one of them is ever
# present); read_json spells the same table out
_TOKEN_FIELDS: Final = (
    ("input_tokens", 0),
    ("prompt_tokens", 0),
    ("output_tokens", 1),
    ("completion_tokens", 1),
    ("cache_read_input_tokens", 2),
    ("cache_creation_input_tokens", 3),
)


def read_json(parts: list[bytes]) -> Usage | None:
    """The usage in a complete JSON reply, given as the chunks it arrived in."""
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    try:
        doc = _decode(raw)
    except msgspec.DecodeError:  # another shape (or a byte order mark): the slow way
        found = _Found()
        found.take_any(raw)
        return found.usage
    tokens = doc.usage
    if tokens is None:
        return None
    # spelled out rather than through _Found: this runs once per reply
    n = tokens.input_tokens if tokens.prompt_tokens is None else tokens.prompt_tokens
    counted = [-1 if n is None or n < 0 else n]
    n = tokens.output_tokens if tokens.completion_tokens is None else tokens.completion_tokens
    counted.append(-1 if n is None or n < 0 else n)
    n = tokens.cache_read_input_tokens
    counted.append(-1 if n is None or n < 0 else n)
    n = tokens.cache_creation_input_tokens
    counted.append(-1 if n is None or n < 0 else n)
    model = doc.model
    return (model[:MAX_NAME] if model else None), counted


class _Found:
    """Usage gathered from one or more documents; the latest value of each wins, as Anthropic's
    message_delta repeats the totals so far."""

    __slots__ = ("model", "tokens")

    def __init__(self) -> None:
        self.model: str | None = None
        self.tokens: list[int] | None = None

    @property
    def usage(self) -> Usage | None:
        return (self.model, self.tokens) if self.tokens is not None else None

    def take(self, raw: bytes) -> None:
        try:
            doc = _decode(raw)
        except msgspec.DecodeError:
            self.take_any(raw)
            return
        for holder in (doc, doc.message, doc.response):
            if holder is not None:
                tokens = holder.usage
                self.add(
                    None if tokens is None else {k: getattr(tokens, k) for k, _ in _TOKEN_FIELDS},
                    holder.model,
                )

    def take_any(self, raw: bytes) -> None:
        try:
            doc = json.loads(raw)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        for holder in (doc, doc.get("message"), doc.get("response")):
            if isinstance(holder, dict):
                tokens = holder.get("usage")
                self.add(tokens if isinstance(tokens, dict) else None, holder.get("model"))

    def add(self, tokens: dict[str, Any] | None, model: object) -> None:
        if isinstance(model, str) and model:
            self.model = model[:MAX_NAME]
        if tokens is None:
            return
        counted = self.tokens
        if counted is None:
            counted = self.tokens = [-1, -1, -1, -1]
        for key, index in _TOKEN_FIELDS:
            value = tokens.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                counted[index] = value


class StreamReader(_Found):
    """Reads an event stream chunk by chunk; :attr:`usage` is what it has found so far.

    Each chunk gets a glance as it passes (:meth:`look`: a suffix check and a substring search,
    no copy); only a chunk that may hold usage, or part of a line, is scanned (:meth:`scan`),
    which the relay does once the chunk is on its way. Most events of a stream carry text, not
    usage, and are never scanned.
    """

    __slots__ = ("_partial", "_rest")

    def __init__(self) -> None:
        super().__init__()
        self._partial = False  # the last chunk looked at ended inside a line
        self._rest: list[bytes] | None = []

    def look(self, data: bytes) -> bool:
        """Whether ``data``, the next chunk, must be passed to :meth:`scan`."""
        partial = self._partial
        self._partial = not data.endswith(b"\n")
        return partial or self._partial or (b'"usage"' in data and _reports_usage(data))

    def scan(self, data: bytes) -> None:
        """Read the events of the chunks :meth:`look` asked for, in order."""
        rest = self._rest
        if rest is None:
            return
        if rest:  # an unfinished line from the previous chunk
            data = b"".join((*rest, data))
            rest.clear()
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) < MAX_LINE:
                rest.append(data)
            return
        if end + 1 < len(data):
            rest.append(data[end + 1 :])
        if data.find(b'"usage"', 0, end) >= 0:
            for line in data[:end].split(b"\n"):
                # OpenAI repeats "usage": null in every chunk but the last: not worth a decode
                if (
                    line.startswith(b"data:")
                    and b'"usage"' in line
                    and b'"usage":null' not in line
                    and b'"usage": null' not in line
                ):
                    self.take(line[5:])

    def finish(self) -> None:
        """Call once the stream is complete (an unfinished last line is not read)."""
        self._rest = None


_USAGE_OBJECT: Final = re.compile(rb'"usage"\s*:\s*\{')


def _reports_usage(data: bytes) -> bool:
    """Whether a ``"usage"`` key in ``data`` has an object for a value: OpenAI repeats
    ``"usage": null`` in every chunk but the last."""
    return _USAGE_OBJECT.search(data) is not None
