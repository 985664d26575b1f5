"""Several worker processes behind the same listening sockets (``workers = N``; POSIX only).

The supervisor binds the sockets, starts N copies of the same command line with the sockets'
descriptors inherited (``CLAUDE_PROXY_WORKER_FD``), replaces a worker that dies, forwards
SIGHUP, and on SIGTERM/SIGINT forwards the signal and waits for every worker to drain. It also
serves the admin listener: metrics from every worker (prometheus-client's multiprocess mode)
and readiness from theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

from .admin import AdminServer
from .config import Config
from .logs import flush_handlers
from .metrics import READY, multiprocess_exposition, multiprocess_registry, sample_value
from .server import listen_socket

logger = logging.getLogger(__name__)

WORKER_FD_ENV = "CLAUDE_PROXY_WORKER_FD"
WORKER_ID_ENV = "CLAUDE_PROXY_WORKER_ID"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker that keeps dying is restarted at most this often.
RESTART_INTERVAL = 1.0


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self._stop = asyncio.Event()

    async def _spawn(self, index: int, fds: Sequence[int]) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env[WORKER_FD_ENV] = ",".join(str(fd) for fd in fds)
        env[WORKER_ID_ENV] = str(index)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "claude_proxy", *self.argv, env=env, pass_fds=tuple(fds)
        )
        self.workers[index] = proc
        return proc

    async def _keep(self, index: int, fds: Sequence[int]) -> None:
        """Run worker ``index``; start a new one whenever it dies, until stopping."""
        while not self.stopping:
            started = time.monotonic()
            proc = await self._spawn(index, fds)
            code = await proc.wait()
            _forget_process(proc.pid)
            if self.stopping:
                return
            logger.error(
                "worker %d (pid %d) exited with %s; starting a new one", index, proc.pid, code
            )
            await asyncio.sleep(max(0.0, RESTART_INTERVAL - (time.monotonic() - started)))

    def _signal_all(self, signum: int) -> None:
        for proc in self.workers.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    def _on_stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            self._stop.set()

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "draining"
        alive = sum(1 for p in self.workers.values() if p.returncode is None)
        if alive < self.config.workers:
            return False, f"{alive} of {self.config.workers} workers running"
        value = sample_value(multiprocess_registry(), READY)
        if value is None or math.isnan(value) or value < 1:
            return False, "a worker has no valid upstream credential"
        return True, "ok"

    async def run(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        socks = [listen_socket(config.bind_address, config.port)]
        if config.tls.mode == "manual":
            socks.append(listen_socket(config.bind_address, config.tls.https_port))
        fds = [s.fileno() for s in socks]
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        admin = None
        if config.admin.port is not None:
            admin = AdminServer(
                config.admin.bind_address,
                config.admin.port,
                multiprocess_exposition,
                self.readiness,
            )
            await admin.start()
        logger.info(
            "supervisor %d: %d workers listening on http://%s:%d%s",
            os.getpid(),
            config.workers,
            config.bind_address,
            socks[0].getsockname()[1],
            f", admin on port {admin.port}" if admin else "",
        )
        keepers = [loop.create_task(self._keep(i, fds)) for i in range(config.workers)]
        keepers.append(loop.create_task(_flush_logs_every_second()))
        await self._stop.wait()
        try:
            async with asyncio.timeout(config.shutdown_timeout + 5):
                await asyncio.gather(*keepers[:-1])
                await asyncio.gather(*(p.wait() for p in self.workers.values()))
        except TimeoutError:
            logger.error("workers did not stop in time; killing them")
            self._signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in self.workers.values()))
        for task in keepers:
            task.cancel()
        if admin is not None:
            await admin.close()
        for sock in socks:
            sock.close()
        logger.info("supervisor: all workers stopped")
        return 0


async def _flush_logs_every_second() -> None:
    while True:
        flush_handlers()
        await asyncio.sleep(1.0)


def _forget_process(pid: int) -> None:
    """Drop a dead worker's live gauges from the aggregate."""
    if MULTIPROC_ENV in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A fresh directory for prometheus-client's per-process files, removed afterwards."""
    path = tempfile.mkdtemp(prefix="claude-proxy-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def worker_sockets() -> tuple[list[int], int] | None:
    """(listening descriptors, worker index) when this process is a worker, else None."""
    fds = os.environ.get(WORKER_FD_ENV)
    if fds is None:
        return None
    return [int(fd) for fd in fds.split(",")], int(os.environ.get(WORKER_ID_ENV, "0"))


def supported() -> bool:
    return sys.platform != "win32"
