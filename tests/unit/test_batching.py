from __future__ import annotations

import asyncio

from claude_proxy.batching import Batch


async def test_deferred_calls_run_after_the_turn_in_order() -> None:
    batch = Batch()
    ran: list[str] = []
    done = asyncio.Event()

    def boom() -> None:
        ran.append("boom")
        raise RuntimeError("bookkeeping bug")

    assert batch.begin()
    batch.defer(ran.append, "a")
    batch.defer(boom)
    batch.end()
    batch.defer(ran.append, "b")  # outside a batch: still after the earlier ones
    batch.defer(done.set)
    assert ran == []  # not within the read that deferred them
    await asyncio.wait_for(done.wait(), 5)
    assert ran == ["a", "boom", "b"]  # one failing call does not stop the others


async def test_run_deferred_runs_them_now() -> None:
    batch = Batch()
    ran: list[int] = []
    batch.defer(ran.append, 1)
    batch.run_deferred()  # as before a scrape or at shutdown
    assert ran == [1]
    batch.defer(ran.append, 2)  # a new round is scheduled again
    batch.run_deferred()
    assert ran == [1, 2]
