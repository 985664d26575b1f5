"""SSE benchmark peers: a light upstream that stamps every event, and a client that measures.

``python -m bench.sse server PORT EVENTS INTERVAL`` serves ``GET /sse``: a chunked
``text/event-stream`` of EVENTS events shaped as an Anthropic Messages stream (usage in the
first and last), one every INTERVAL seconds, each carrying in ``"t"`` the ``time.time_ns()`` at
which it was written. ``python -m bench.sse client URL N KEY`` opens N
streams and prints JSON with the delay between each event's stamp and its arrival.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from array import array

try:
    import uvloop
except ImportError:  # pragma: no cover - Windows
    uvloop = None  # type: ignore[assignment]

import httptools


class _Stream(asyncio.Protocol):
    def __init__(self, server: SseServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if getattr(self, "url", b"").startswith(b"/upload"):
            # the upload case: the whole body has been read; answer and keep the connection
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.left = self.server.events
        self.server.streams.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.streams.discard(self)


FIRST = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_bench",'
    b'"type":"message","role":"assistant","model":"bench-model","content":[],'
    b'"usage":{"input_tokens":12,"output_tokens":1}},"t":%d}\n\n'
)
DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hello there"},"t":%d}\n\n'
)
LAST = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":34},"t":%d}\n\n'
)


class SseServer:
    def __init__(self, events: int, interval: float) -> None:
        self.events = events
        self.interval = interval
        self.streams: set[_Stream] = set()

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            for stream in list(self.streams):
                if stream.left == self.events:
                    event = FIRST
                elif stream.left == 1:
                    event = LAST
                else:
                    event = DELTA
                data = event % time.time_ns()
                transport = stream.transport
                assert transport is not None
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
                stream.left -= 1
                if stream.left <= 0:
                    transport.write(b"0\r\n\r\n")
                    self.streams.discard(stream)

    async def serve(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: _Stream(self), "127.0.0.1", port, backlog=4096)
        print("ready", flush=True)
        await self.tick()


class _Client(asyncio.Protocol):
    def __init__(self, sink: array, done: asyncio.Future[None]) -> None:
        self.sink = sink
        self.done = done
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self.buf + data
        start = 0
        while True:
            i = buf.find(b'"t":', start)
            if i < 0:
                break
            j = buf.find(b"}", i)
            if j < 0:
                break
            self.sink.append((now - int(buf[i + 4 : j])) / 1e6)
            start = j
        self.buf = buf[start:] if start else buf[-256:]
        if buf.endswith(b"0\r\n\r\n") and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_client(host: str, port: int, n: int, key: str, timeout: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    sink: array = array("d")
    waits: list[asyncio.Future[None]] = []
    transports = []
    request = (
        f"GET /sse HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    for _ in range(n):
        done: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_connection(lambda d=done: _Client(sink, d), host, port)
        transport.write(request)
        waits.append(done)
        transports.append(transport)
    finished, _ = await asyncio.wait(waits, timeout=timeout)
    for transport in transports:
        transport.close()
    values = sorted(sink)
    return {
        "streams": n,
        "completed": len(finished),
        "events": len(values),
        "p50_ms": percentile(values, 0.50),
        "p99_ms": percentile(values, 0.99),
        "max_ms": values[-1] if values else float("nan"),
    }


def main(argv: list[str]) -> int:
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if argv[0] == "server":
        asyncio.run(SseServer(int(argv[2]), float(argv[3])).serve(int(argv[1])))
    else:
        host, port = argv[1].rsplit(":", 1)
        result = asyncio.run(run_client(host, int(port), int(argv[2]), argv[3], float(argv[4])))
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
