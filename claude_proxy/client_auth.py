"""Client keys: where a client presents one, and whether it is one of ours.

A key may come in ``x-api-key``, ``api-key`` or ``Authorization: Bearer``. Comparison hashes the
presented key and compares digests with :func:`hmac.compare_digest` against every configured key,
so the time taken does not depend on how much of a key matches, nor on its length.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import ClientKey, key_digest
from .errors import Unauthorized
from .headers import CREDENTIAL_HEADERS, Headers

PASSTHROUGH = "passthrough"
OPEN = "open"
REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Presented:
    """The credentials a request carries: the lower-cased header names and the keys in them."""

    headers: frozenset[bytes]
    keys: tuple[bytes, ...]
    malformed: bool  # an Authorization header that is not ``Bearer <key>``


def presented(headers: Headers, lnames: Sequence[bytes] | None = None) -> Presented:
    """The credentials in ``headers`` (``lnames``: their lower-cased names, if at hand)."""
    names: set[bytes] = set()
    keys: list[bytes] = []
    malformed = False
    if lnames is None:
        lnames = [name.lower() for name, _ in headers]
    for (_, value), lname in zip(headers, lnames, strict=True):
        if lname not in CREDENTIAL_HEADERS:
            continue
        names.add(lname)
        # a field value excludes leading and trailing whitespace (RFC 9110 §5.5)
        if lname == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                malformed = True
                continue
            keys.append(token.strip())
        else:
            keys.append(value.strip())
    return Presented(frozenset(names), tuple(keys), malformed)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def hash_key(key: str) -> str:
    """What ``key_sha256`` holds for ``key``: its SHA-256 as lower-case hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The configured client keys, kept only as digests (``key_sha256`` is one already).

    ``compare`` is :func:`hmac.compare_digest`; a test passes a recording wrapper to check that
    every configured key is compared, always as two digests of one length.
    """

    __slots__ = ("_compare", "_entries")

    def __init__(
        self,
        keys: Sequence[ClientKey],
        compare: Callable[[bytes, bytes], bool] = hmac.compare_digest,
    ) -> None:
        self._entries = tuple((bytes.fromhex(key_digest(k)), k.name) for k in keys)
        self._compare = compare

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"KeyRing(names={[name for _, name in self._entries]!r})"

    def match(self, key: bytes) -> str | None:
        """The name of the key, or None; every configured key is compared, match or not."""
        digest = _digest(key)
        compare = self._compare
        found = None
        for expected, name in self._entries:
            if compare(digest, expected) and found is None:
                found = name
        return found


def authenticate(creds: Presented, ring: KeyRing, passthrough: bool) -> str | None:
    """The client key's name, or None for a request relayed untouched (passthrough).

    No keys configured: every request is accepted under the name ``open`` and gets the upstream
    credential. No key presented: passthrough, unless turned off. Any presented key that is not
    ours: :class:`Unauthorized`.
    """
    if not ring:
        return OPEN
    if not creds.headers:
        if passthrough:
            return None
        raise Unauthorized(
            "No API key presented. Send your proxy key in x-api-key or Authorization."
        )
    for key in creds.keys:
        name = ring.match(key)
        if name is not None:
            return name
    raise Unauthorized("Invalid API key for this proxy.")
