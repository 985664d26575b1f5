"""Several worker processes behind one listening socket (``workers = N``; POSIX only).

The supervisor binds the socket, starts N copies of the same command line with the socket's
descriptor inherited (``CLAUDE_PROXY_WORKER_FD``), replaces a worker that dies, forwards SIGHUP,
and on SIGTERM/SIGINT forwards the signal and waits for every worker to drain.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from .config import Config
from .server import listen_socket

logger = logging.getLogger(__name__)

WORKER_FD_ENV = "CLAUDE_PROXY_WORKER_FD"
WORKER_ID_ENV = "CLAUDE_PROXY_WORKER_ID"
# A worker that keeps dying is restarted at most this often.
RESTART_INTERVAL = 1.0


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self._last_start: dict[int, float] = {}

    def _spawn(self, index: int, fd: int) -> None:
        env = dict(os.environ, **{WORKER_FD_ENV: str(fd), WORKER_ID_ENV: str(index)})
        since = time.monotonic() - self._last_start.get(index, 0.0)
        if since < RESTART_INTERVAL:
            time.sleep(RESTART_INTERVAL - since)
        self._last_start[index] = time.monotonic()
        self.workers[index] = subprocess.Popen(
            [sys.executable, "-m", "claude_proxy", *self.argv], env=env, pass_fds=(fd,)
        )

    def _signal_all(self, signum: int) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self._signal_all(signal.SIGTERM)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._signal_all(signal.SIGHUP)

    def run(self) -> int:
        config = self.config
        sock = listen_socket(config.bind_address, config.port)
        port = sock.getsockname()[1]
        logger.info(
            "supervisor %d: %d workers listening on http://%s:%d",
            os.getpid(),
            config.workers,
            config.bind_address,
            port,
        )
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        for index in range(config.workers):
            self._spawn(index, sock.fileno())
        while not self.stopping:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            which = next((i for i, p in self.workers.items() if p.pid == pid), None)
            if which is None:
                continue
            self.workers[which].returncode = os.waitstatus_to_exitcode(status)
            if not self.stopping:
                logger.error(
                    "worker %d (pid %d) exited with %s; starting a new one",
                    which,
                    pid,
                    self.workers[which].returncode,
                )
                self._spawn(which, sock.fileno())
        deadline = time.monotonic() + config.shutdown_timeout + 5
        for proc in self.workers.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sock.close()
        logger.info("supervisor: all workers stopped")
        return 0


def worker_socket() -> tuple[int, int] | None:
    """(fd, worker index) when this process is a worker, else None."""
    fd = os.environ.get(WORKER_FD_ENV)
    if fd is None:
        return None
    return int(fd), int(os.environ.get(WORKER_ID_ENV, "0"))


def supported() -> bool:
    return sys.platform != "win32"
