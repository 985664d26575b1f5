"""A real redis-server on a loopback port, for the limits tests: started, awaited, stopped.

Readiness is redis-server's own "Ready to accept connections" line, never a sleep. Nothing is
saved to disk. Tests skip (saying why) only where the binary is absent; CI installs it.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import time

import pytest

BINARY = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` again keep the port."""

    def __init__(self) -> None:
        if BINARY is None:
            pytest.skip("redis-server is not installed here (.ci/run installs it: apt-get)")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert BINARY is not None
        self.proc = subprocess.Popen(
            [
                BINARY,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--logfile", "",
                "--dir", os.environ.get("TMPDIR", "/tmp"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"Ready to accept connections" not in seen:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.stop()
                    raise RuntimeError(f"redis-server did not start: {seen[-500:]!r}")
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"redis-server exited: {seen[-500:]!r}")
                seen += chunk

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
