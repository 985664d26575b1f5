"""Write batching: what one read causes to be written goes out as one write.

Relaying a small request takes a request head and a body to the upstream, and a response head
and a body back; written one by one, each is a system call. While a protocol handles a read,
writes to any connection are collected and sent, one write per connection, when the read has
been handled. Nothing waits longer than the read that caused it.

Bookkeeping (usage reading, metrics, access lines) waits instead: it is collected and run
once per turn of the event loop, in one go, after the bytes it accounts for have gone out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Batch:
    """The batch of one event loop: open while a read is being handled.

    Work that must not hold bytes back (usage reading, metrics, access lines) is deferred with
    :meth:`defer` and run, in order and all in one go, after the loop turn (cheaper
    than a little after each read), or when :meth:`run_deferred` is called (before a scrape,
    at shutdown).
    """

    __slots__ = ("_handle", "deferred", "pending")

    def __init__(self) -> None:
        self.pending: list[Batched] | None = None
        self.deferred: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        self._handle: asyncio.Handle | None = None

    def begin(self) -> bool:
        """Open the batch; False when it is already open (the caller must not end it)."""
        if self.pending is not None:
            return False
        self.pending = []
        return True

    def end(self) -> None:
        pending, self.pending = self.pending, None
        for writer in pending or ():
            writer.flush()

    def defer(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` after this loop turn; deferred calls keep their order."""
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self.run_deferred)
        self.deferred.append((fn, args))

    def run_deferred(self) -> None:
        """Run what was deferred, now."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        deferred, self.deferred = self.deferred, []
        for fn, args in deferred:
            try:
                fn(*args)
            except Exception:  # bookkeeping must never break the relay
                logger.exception("error in deferred bookkeeping")


class Batched:
    """Mixin for a protocol whose writes go through the batch."""

    __slots__ = ("_out", "batch")
    transport: asyncio.Transport | None

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self._out: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        pending = self.batch.pending
        if pending is None:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
        elif self._out is None:
            self._out = [data]
            pending.append(self)
        else:
            self._out.append(data)

    def flush(self) -> None:
        out, self._out = self._out, None
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))
