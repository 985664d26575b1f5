"""A bounded soak: 50,000 mixed requests at concurrency 200, then nothing may be left over."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import CLIENT_KEY, RESET, LoopThread, ProxyHandle, Recorded, ok_response, wait_until

ROOT = Path(__file__).parents[2]
TOTAL = int(os.environ.get("SOAK_REQUESTS", "50000"))
CONCURRENCY = 200


def handler(rec: Recorded) -> list[object]:
    if rec.target == b"/stream":
        events = [b"7\r\ndata:\n\n\r\n"] * 5
        return [
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            *events,
            b"0\r\n\r\n",
        ]
    if rec.target == b"/fault":
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial", RESET]
    return [ok_response()]


def snapshot(lt: LoopThread, proxy: ProxyHandle) -> dict[str, int]:
    """Open descriptors, asyncio tasks and RSS of this process, once all is quiet."""
    state = proxy.server.state
    assert state is not None
    wait_until(lambda: not state.connections and not state.tasks, timeout=10)
    lt.call(state.pool.close)  # pooled upstream connections: however many the load left
    gc.collect()

    async def tasks() -> int:
        await asyncio.sleep(0.05)  # let closing transports finish
        return len(asyncio.all_tasks())

    n_tasks = lt.run(tasks())
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {"fds": len(os.listdir("/proc/self/fd")), "tasks": n_tasks, "rss_kb": rss}


def soak(port: int, total: int) -> dict[str, object]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.faults.soak_client",
            str(port),
            str(total),
            str(CONCURRENCY),
            CLIENT_KEY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")
def test_soak_leaves_nothing_behind(
    lt: LoopThread, make_upstream, make_proxy, capsys, monkeypatch
) -> None:
    # Access lines and warnings are still produced (and scanned for secrets by conftest), but
    # not kept by pytest's own log capture, which would otherwise grow with every request.
    monkeypatch.setattr(logging.getLogger("claude_proxy"), "propagate", False)
    up = make_upstream(handler, record=False)
    proxy = make_proxy(up.url)
    warm = soak(proxy.port, 4000)  # the pool, caches and allocator reach their working size
    assert not any(k.startswith("UNEXPECTED") or k == "timeout" for k in warm["counts"]), warm
    before = snapshot(lt, proxy)
    result = soak(proxy.port, TOTAL)
    after = snapshot(lt, proxy)
    counts = result["counts"]
    assert isinstance(counts, dict)
    with capsys.disabled():
        print(
            f"\nsoak: {TOTAL} requests in {result['seconds']} s ({result['rps']}/s): {counts}"
            f"\n  before {before}\n  after  {after}"
        )
    assert sum(counts.values()) == TOTAL
    unexpected = {k: v for k, v in counts.items() if k.startswith("UNEXPECTED") or k == "timeout"}
    assert not unexpected, unexpected
    assert after["fds"] <= before["fds"] + 4
    assert after["tasks"] <= before["tasks"]
    assert after["rss_kb"] <= before["rss_kb"] + 20 * 1024
