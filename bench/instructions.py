"""Instructions per request under callgrind: deterministic where wall-clock runs are noise.

    python -m bench.instructions [--baseline REF] [--requests 1000,3000]

Runs the proxy (the standard asyncio loop, one worker) under ``valgrind --tool=callgrind``
in front of a tiny upstream in another process, sends a fixed number of small POSTs at
concurrency 8, stops it, and reads the total instruction count. Two counts give the cost of
one request with start-up and shutdown subtracted. Each variant is a config: the plain one
(one ``upstream_url``), three ``[[upstreams]]``, and the same with ``[[routes]]`` by model;
``--baseline`` also runs the plain config on an older commit (checked out with ``git
worktree``). Needs valgrind; takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.compare import config_text, toml_dumps
from bench.routing_cost import upstreams_toml

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-client-key"
BODY = b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}'
REPLY = b'{"type":"message","content":[],"usage":{"input_tokens":1,"output_tokens":1}}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


UPSTREAM = f"""
import asyncio, sys
REPLY = {REPLY!r}
HEAD = (b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\n"
        b"content-length: %d\\r\\n\\r\\n" % len(REPLY))
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        while True:
            i = self.buf.find(b"\\r\\n\\r\\n")
            if i < 0: return
            n = 0
            for line in self.buf[:i].split(b"\\r\\n"):
                if line.lower().startswith(b"content-length:"): n = int(line.split(b":")[1])
            if len(self.buf) < i + 4 + n: return
            self.buf = self.buf[i + 4 + n:]
            self.t.write(HEAD + REPLY)
async def main():
    s = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await s.serve_forever()
asyncio.run(main())
"""


def wait_port(port: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


async def load(port: int, requests: int, conns: int = 8) -> None:
    head = (
        f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    left = [requests]

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left[0] > 0:
            left[0] -= 1
            writer.write(head)
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(len(REPLY))
        writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))


def instructions(root: Path, config: str, requests: int, work: Path) -> int:
    port = free_port()
    conf = work / f"config-{port}.toml"
    conf.write_text(config.replace('"port" = 0', f'"port" = {port}', 1))
    out = work / f"callgrind-{port}.out"
    env = {**os.environ, "PYTHONPATH": str(root), "CLAUDE_PROXY_LOOP": "asyncio"}
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "claude_proxy",
            "-c",
            str(conf),
        ],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        asyncio.run(load(port, requests))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)
    m = re.search(r"^summary:\s+(\d+)", out.read_text(), re.M)
    assert m, "no summary in the callgrind output"
    return int(m.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a commit whose plain config is measured too")
    parser.add_argument("--requests", default="1000,3000", help="two request counts")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    low, high = (int(n) for n in args.requests.split(","))
    with tempfile.TemporaryDirectory(prefix="claude-proxy-cg-") as tmp:
        work = Path(tmp)
        up = free_port()
        upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up)])
        builds = [("this code", ROOT)]
        try:
            wait_port(up)
            if args.baseline:
                base = work / "baseline"
                subprocess.run(
                    ["git", "worktree", "add", "--detach", str(base), args.baseline],
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                )
                builds.append((f"baseline {args.baseline}", base))
            plain = {
                "upstream_url": f"http://127.0.0.1:{up}",
                "port": 0,
                "client_api_key": KEY,
                "upstream_auth": {"type": "api_key", "api_key": "k"},
                "logging": {"level": "warn"},
            }
            variants = [(name, root, toml_dumps(plain)) for name, root in builds]
            features = [
                ("three [[upstreams]]", upstreams_toml(routes=False)),
                ("[[upstreams]] + routes by model", upstreams_toml(routes=True)),
            ]
            for name, extra in features:
                variants.append(
                    (name, ROOT, config_text(plain, extra, upstream=plain["upstream_url"]))
                )
            for name, root, text in variants:
                a = instructions(root, text, low, work)
                b = instructions(root, text, high, work)
                print(
                    f"{name:<40} {(b - a) / (high - low):>10,.0f} instructions per request",
                    flush=True,
                )
        finally:
            upstream.kill()
            if args.baseline:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(work / "baseline")],
                    cwd=ROOT,
                    capture_output=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
