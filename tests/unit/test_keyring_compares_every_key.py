"""Client key comparison, structurally: every configured key is compared, digest against digest.

Replaces a timing test (it failed about half its runs on a shared machine): what makes the
comparison's time independent of the presented key is its shape, and the shape can be checked.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from claude_proxy.client_auth import KeyRing
from claude_proxy.config import ClientKey

KEYS = [ClientKey("alice", "k" * 40), ClientKey("bob", "z" * 40), ClientKey("carol", "c")]
DIGESTS = {hashlib.sha256(k.key.encode()).digest() for k in KEYS}


class Recording:
    """``hmac.compare_digest``, noting what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((a, b))
        return hmac.compare_digest(a, b)


@pytest.mark.parametrize(
    ("presented", "expected"),
    [
        (b"k" * 40, "alice"),  # the first key: the others are still compared
        (b"z" * 40, "bob"),
        (b"c", "carol"),  # the last, and short
        (b"k" * 39 + b"x", None),  # all but the last byte of a key
        (b"k" * 20 + b"x" * 20, None),
        (b"k", None),  # a prefix
        (b"k" * 41, None),  # a key plus one byte
        (b"", None),
        (b"x" * 10_000, None),
    ],
)
def test_every_configured_key_is_compared_as_equal_length_digests(
    presented: bytes, expected: str | None
) -> None:
    compare = Recording()
    ring = KeyRing(KEYS, compare=compare)
    assert ring.match(presented) == expected
    assert len(compare.calls) == len(KEYS)
    assert {b for _, b in compare.calls} == DIGESTS  # each configured key, once
    assert {a for a, _ in compare.calls} == {hashlib.sha256(presented).digest()}
    assert {len(a) for a, _ in compare.calls} | {len(b) for _, b in compare.calls} == {32}


def test_the_default_comparison_is_compare_digest() -> None:
    ring = KeyRing(KEYS)
    assert ring._compare is hmac.compare_digest
