from __future__ import annotations

import asyncio

from claude_proxy.batching import Batch


async def test_deferred_calls_run_after_this_turn_in_order() -> None:
    batch = Batch()
    ran: list[str] = []

    def boom() -> None:
        ran.append("boom")
        raise RuntimeError("bookkeeping bug")

    assert batch.begin()
    batch.defer(ran.append, "a")
    batch.defer(boom)
    batch.end()
    batch.defer(ran.append, "b")  # outside a batch: still after the earlier ones
    assert ran == []  # nothing runs inside the read that deferred it
    await asyncio.sleep(0)
    assert ran == ["a", "boom", "b"]  # one failing call does not stop the others
    batch.defer(ran.append, "c")
    await asyncio.sleep(0)
    assert ran == ["a", "boom", "b", "c"]
