"""Flow control: who paused reading a connection, so that the one who paused it lifts it.

Each connection (client or upstream) has one :class:`ReadGate`. A pause is taken by a named
owner; reading resumes when no owner is left. Owners are bits, so taking or lifting a pause
twice is harmless, and lifting every pause an owner holds is one call when that owner goes away
(an exchange that ends, an upstream that detaches). Modelled on uvicorn's ``flow_control.py``,
with owners instead of a single flag.
"""

from __future__ import annotations

import asyncio
from typing import Final

# Owners of a pause on the client's reading.
UPSTREAM_FULL: Final = 1  # the upstream takes the request body slower than the client sends it
BUFFER_FULL: Final = 2  # the body waits in memory for an upstream and passed the high-water mark
PIPELINE: Final = 4  # a pipelined request waits, unparsed, until the response before it is done
# Owner of a pause on the upstream's reading.
CLIENT_FULL: Final = 8  # the client takes the response slower than the upstream sends it
# What an exchange's request direction may hold; lifted whenever the request stops reading.
REQUEST_OWNERS: Final = UPSTREAM_FULL | BUFFER_FULL

_NAMES: Final = {
    UPSTREAM_FULL: "upstream_full",
    BUFFER_FULL: "buffer_full",
    PIPELINE: "pipeline",
    CLIENT_FULL: "client_full",
}


class ReadGate:
    """Reading from one transport, paused while any owner holds a pause."""

    __slots__ = ("owners", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.owners = 0

    def __repr__(self) -> str:
        held = [name for bit, name in _NAMES.items() if self.owners & bit]
        return f"ReadGate(paused_by={held})"

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    @property
    def paused(self) -> bool:
        return self.owners != 0

    def pause(self, owner: int) -> None:
        if self.owners == 0 and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.owners |= owner

    def resume(self, owner: int) -> None:
        """Lift every pause in ``owner`` (one bit or several); reading resumes if none is left."""
        if not self.owners & owner:
            return
        self.owners &= ~owner
        if self.owners == 0 and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def resume_all(self) -> None:
        self.resume(self.owners)

    def holds(self, owner: int) -> bool:
        return bool(self.owners & owner)
