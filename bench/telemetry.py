"""``python -m bench.telemetry``: what telemetry costs per finished exchange, without the relay.

A micro-benchmark, not a test: :meth:`Telemetry.on_record` is called N times with sample_ratio
1.0 and 0.0 (and :meth:`Telemetry.child_traceparent` for ``propagate``), exporting to a
loopback sink that answers 200 to every OTLP post. Reports wall-clock microseconds per call on
the calling thread, and CPU microseconds per record for the whole process once everything is
exported (the SDK's threads encode and post: that CPU is taken from the same cores).
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


def run(url: str, ratio: float, n: int, traceparent: bool) -> tuple[float, float, float]:
    """(µs per on_record, CPU µs per record including export, µs per child_traceparent)."""
    telemetry = Telemetry(TelemetryConfig(url, sample_ratio=ratio, propagate=True), "https://x")
    records = [replace(RECORD, start_time=time.time(), request_id=f"r{i}") for i in range(n)]
    sent = [telemetry.child_traceparent(None) if traceparent else None for _ in range(n)]
    t0 = time.perf_counter()
    for _ in range(n):
        telemetry.child_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    head = (time.perf_counter() - t0) / n * 1e6
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for rec, tp in zip(records, sent, strict=True):
        telemetry.on_record(rec, tp)
    wall = (time.perf_counter() - t0) / n * 1e6
    telemetry.force_flush(30.0)
    cpu = (time.process_time() - cpu0) / n * 1e6
    telemetry.shutdown(5.0)
    return wall, cpu, head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="records per round (queue: 2048)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with sink() as url:
        run(url, 1.0, 200, False)  # warm up imports and connections
        print(f"{'case':<34} {'on_record µs':>13} {'CPU µs/record':>14} {'traceparent µs':>15}")
        for name, ratio, tp in (
            ("sample_ratio 1.0", 1.0, False),
            ("sample_ratio 1.0, propagate", 1.0, True),
            ("sample_ratio 0.0", 0.0, False),
        ):
            rows = [run(url, ratio, args.n, tp) for _ in range(args.rounds)]
            wall, cpu, head = (statistics.median(col) for col in zip(*rows, strict=True))
            print(f"{name:<34} {wall:>13.1f} {cpu:>14.1f} {head:>15.2f}")


if __name__ == "__main__":
    main()
