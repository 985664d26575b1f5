"""Load for the soak test: N requests at concurrency C, a fixed mix of normal, streamed, faulty,
malformed and unauthorised requests, each checked against what it must get.

``python -m tests.faults.soak_client PORT TOTAL CONCURRENCY KEY`` prints a JSON summary.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


class Reader:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.body = b""
        self.done = False
        self.close = False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.close = not self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def kind_of(i: int) -> str:
    slot = i % 20
    if slot < 14:
        return "normal"
    if slot < 17:
        return "stream"
    return ("fault", "malformed", "wrong_key")[slot - 17]


def request(kind: str, key: str) -> bytes:
    if kind == "malformed":
        return b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello"
    k = "wrong-key" if kind == "wrong_key" else key
    body = b'{"soak": true}'
    return (
        f"POST /{kind} HTTP/1.1\r\nHost: soak\r\nx-api-key: {k}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def expected(kind: str, reader: Reader, ended_early: bool) -> bool:
    if kind == "normal":
        return reader.done and reader.status == 200 and reader.body == b"ok"
    if kind == "stream":
        return reader.done and reader.status == 200 and reader.body.count(b"data:") == 5
    if kind == "fault":
        return not reader.done and ended_early  # aborted, never complete-looking
    if kind == "malformed":
        return reader.done and reader.status == 400 and reader.close
    return reader.done and reader.status == 401


async def worker(port: int, key: str, jobs: list[int], counts: Counter[str]) -> None:
    reader_conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while jobs:
        i = jobs.pop()
        kind = kind_of(i)
        if reader_conn is None:
            reader_conn = await asyncio.open_connection("127.0.0.1", port)
        stream, writer = reader_conn
        writer.write(request(kind, key))
        reader = Reader()
        ended_early = False
        try:
            while not reader.done:
                data = await asyncio.wait_for(stream.read(65536), 10)
                if not data:
                    ended_early = True
                    break
                reader.parser.feed_data(data)
        except (ConnectionError, httptools.HttpParserError):
            ended_early = True
        except TimeoutError:
            counts["timeout"] += 1
            ended_early = True
        counts[kind if expected(kind, reader, ended_early) else f"UNEXPECTED_{kind}"] += 1
        if ended_early or reader.close:
            writer.close()
            reader_conn = None
    if reader_conn is not None:
        reader_conn[1].close()


async def main(port: int, total: int, concurrency: int, key: str) -> dict[str, object]:
    jobs = list(range(total))
    counts: Counter[str] = Counter()
    started = time.monotonic()
    shares = [jobs[i::concurrency] for i in range(concurrency)]
    await asyncio.gather(*(worker(port, key, share, counts) for share in shares))
    elapsed = time.monotonic() - started
    return {"counts": dict(counts), "seconds": round(elapsed, 2), "rps": round(total / elapsed)}


if __name__ == "__main__":
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    port_, total_, conc_, key_ = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(int(port_), int(total_), int(conc_), key_))))
