"""``python -m bench.telemetry``: what telemetry costs per finished exchange, without the relay.

A micro-benchmark, not a test: :meth:`Telemetry.on_record` is called N times with sample_ratio
1.0 and 0.0 (and :meth:`Telemetry.child_traceparent` for ``propagate``), exporting to a
loopback sink that answers 200 to every OTLP post. Reports per record: wall-clock microseconds
of ``on_record``, its CPU time on the calling thread (the event loop's, in the proxy), and the
CPU time of the whole process once everything is exported (the SDK's threads encode and post:
that CPU comes from the same cores and, under the GIL, from the loop's time).
"""

from __future__ import annotations

import argparse
import http.server
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from claude_proxy.config import TelemetryConfig
from claude_proxy.record import ExchangeRecord
from claude_proxy.telemetry import Telemetry

RECORD = ExchangeRecord(
    request_id="ab12-1",
    start_time=0.0,
    client_key="alice",
    client_addr="127.0.0.1",
    method="POST",
    path="/anthropic/v1/messages",
    api="anthropic",
    status=200,
    outcome="complete",
    origin="upstream",
    bytes_in=1200,
    bytes_out=800,
    ttfb=0.4,
    duration=0.9,
    request_model="claude-sonnet-4-5",
    model="claude-sonnet-4-5-20250929",
    input_tokens=31877,
    output_tokens=402,
)


class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def sink() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run(url: str, ratio: float, n: int, traceparent: bool) -> tuple[float, float, float, float]:
    """(µs per on_record, its CPU µs on the calling thread, CPU µs per record for the whole
    process once exported, µs per child_traceparent)."""
    telemetry = Telemetry(TelemetryConfig(url, sample_ratio=ratio, propagate=True), "https://x")
    records = [replace(RECORD, start_time=time.time(), request_id=f"r{i}") for i in range(n)]
    sent = [telemetry.child_traceparent(None) if traceparent else None for _ in range(n)]
    t0 = time.perf_counter()
    for _ in range(n):
        telemetry.child_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    head = (time.perf_counter() - t0) / n * 1e6
    cpu0 = time.process_time()
    thread0 = time.thread_time()
    t0 = time.perf_counter()
    for rec, tp in zip(records, sent, strict=True):
        telemetry.on_record(rec, tp)
    wall = (time.perf_counter() - t0) / n * 1e6
    thread = (time.thread_time() - thread0) / n * 1e6
    telemetry.force_flush(30.0)
    cpu = (time.process_time() - cpu0) / n * 1e6
    telemetry.shutdown(5.0)
    return wall, thread, cpu, head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="records per round (queue: 2048)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with sink() as url:
        run(url, 1.0, 200, False)  # warm up imports and connections
        print(
            f"{'case':<30} {'on_record µs':>13} {'its CPU µs':>11} {'all CPU µs':>11} "
            f"{'traceparent µs':>15}"
        )
        for name, ratio, tp in (
            ("sample_ratio 1.0", 1.0, False),
            ("sample_ratio 1.0, propagate", 1.0, True),
            ("sample_ratio 0.0", 0.0, False),
        ):
            rows = [run(url, ratio, args.n, tp) for _ in range(args.rounds)]
            wall, thread, cpu, head = (statistics.median(c) for c in zip(*rows, strict=True))
            print(f"{name:<30} {wall:>13.1f} {thread:>11.1f} {cpu:>11.1f} {head:>15.2f}")


if __name__ == "__main__":
    main()
