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
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .admin import AdminServer
from .config import Config
from .logs import flush_handlers, reopen_logs
from .metrics import READY as READY_METRIC
from .metrics import multiprocess_exposition, multiprocess_registry, sample_value
from .server import listen_socket

logger = logging.getLogger(__name__)

WORKER_FD_ENV = "CLAUDE_PROXY_WORKER_FD"
WORKER_ID_ENV = "CLAUDE_PROXY_WORKER_ID"
# The write end of a pipe on which a worker says how its start ended: "ready" or "error <why>".
READY_FD_ENV = "CLAUDE_PROXY_READY_FD"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker that keeps dying is restarted at most this often.
RESTART_INTERVAL = 1.0
# A worker that fails this many starts in a row stops the supervisor with its error.
START_TRIES = 3
# A worker that has not said it is ready by then counts as a failed start.
START_TIMEOUT = 60.0
READY = "ready"


class StartupError(Exception):
    """The supervisor cannot serve: a port cannot be bound, or a worker keeps failing to start.

    ``exit_code`` is the failing worker's own (2 for a config error), else None.
    """

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(slots=True)
class Worker:
    index: int
    proc: asyncio.subprocess.Process
    ready: bool = False
    # Signals that arrived while it was starting: sent once it is ready (before its handlers
    # exist, a SIGTERM or SIGHUP would kill it).
    held: set[int] = field(default_factory=set)


class Supervisor:
    def __init__(
        self,
        config: Config,
        argv: Sequence[str],
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.argv = list(argv)
        self.on_ready = on_ready
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.failure: StartupError | None = None
        self._announced = False
        self._listening = ""
        self._stop = asyncio.Event()
        # Signals for workers between fork and registration, by index.
        self._spawning: dict[int, set[int]] = {}

    async def _spawn(self, index: int, fds: Sequence[int]) -> tuple[Worker, int]:
        """Start worker ``index``; returns it and the read end of its start report pipe."""
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env[WORKER_FD_ENV] = ",".join(str(fd) for fd in fds)
        env[WORKER_ID_ENV] = str(index)
        env[READY_FD_ENV] = str(write_end)
        self._spawning[index] = set()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "claude_proxy",
                *self.argv,
                env=env,
                pass_fds=(*fds, write_end),
            )
        except BaseException:
            os.close(read_end)
            self._spawning.pop(index, None)
            raise
        finally:
            os.close(write_end)  # the worker holds the only write end: EOF when it exits
        worker = Worker(index, proc, held=self._spawning.pop(index))
        self.workers[index] = worker
        return worker, read_end

    async def _start_report(self, worker: Worker, read_end: int) -> str:
        """The worker's report: ``ready``, ``error <why>``, or "" when it exited without one."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(read_end, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await reader.readline()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
            return f"error it did not report ready within {START_TIMEOUT:g}s"
        finally:
            transport.close()
        return line.decode("utf-8", "replace").strip()

    async def _keep(self, index: int, fds: Sequence[int]) -> None:
        """Run worker ``index``; start a new one whenever it dies, until stopping. A worker
        that fails ``START_TRIES`` starts in a row stops everything with its error."""
        failures = 0
        while not self.stopping:
            started = time.monotonic()
            worker, read_end = await self._spawn(index, fds)
            report = await self._start_report(worker, read_end)
            if report == READY:
                failures = 0
                self._ready(worker)
            code = await worker.proc.wait()
            _forget_process(worker.proc.pid)
            if self.stopping:
                return
            if report != READY:
                failures += 1
                why = report.removeprefix("error ") if report else f"it exited with {code}"
                if failures >= START_TRIES:
                    self._give_up(index, why, code)
                    return
                logger.error(
                    "worker %d (pid %d) failed to start: %s; trying again (%d of %d)",
                    index,
                    worker.proc.pid,
                    why,
                    failures + 1,
                    START_TRIES,
                )
            else:
                logger.error(
                    "worker %d (pid %d) exited with %s; starting a new one",
                    index,
                    worker.proc.pid,
                    code,
                )
            delay = RESTART_INTERVAL - (time.monotonic() - started)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)

    def _keeper_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        logger.error("supervisor: a worker's keeper failed; stopping", exc_info=exc)
        self.failure = self.failure or StartupError(f"cannot run a worker: {exc}")
        self._on_stop()

    def _reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): this process's files, then each worker's."""
        reopen_logs()
        self._signal_all(signal.SIGUSR1)

    def _ready(self, worker: Worker) -> None:
        """A worker's handlers exist and it accepts: deliver what it was spared while starting."""
        worker.ready = True
        held, worker.held = worker.held, set()
        if self.stopping:
            self._send(worker, signal.SIGTERM)
        elif signal.SIGHUP in held:
            self._send(worker, signal.SIGHUP)
        if self.stopping or self._announced:
            return
        if len(self._ready_workers()) == self.config.workers:
            self._announced = True
            if self.on_ready is not None:
                self.on_ready(f"ready: {self.config.workers} workers {self._listening}")

    def _give_up(self, index: int, why: str, code: int | None) -> None:
        message = f"worker {index} cannot start: {why} (failed {START_TRIES} times in a row)"
        logger.info("supervisor: worker %d keeps failing to start; stopping the others", index)
        self.failure = StartupError(message, code if code in (2, 3) else None)
        self._on_stop()

    def _ready_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.ready and w.proc.returncode is None]

    @staticmethod
    def _send(worker: Worker, signum: int) -> None:
        if worker.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signum)

    def _signal_all(self, signum: int) -> None:
        """Send ``signum`` to every ready worker; one still starting gets it once ready."""
        for held in self._spawning.values():
            held.add(signum)
        for worker in self.workers.values():
            if worker.ready or signum == signal.SIGKILL:
                self._send(worker, signum)
            elif worker.proc.returncode is None:
                worker.held.add(signum)

    def _on_stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            self._stop.set()

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "draining"
        alive = len(self._ready_workers())
        if alive < self.config.workers:
            return False, f"{alive} of {self.config.workers} workers running"
        value = sample_value(multiprocess_registry(), READY_METRIC)
        if value is None or math.isnan(value) or value < 1:
            return False, "a worker has no valid upstream credential"
        return True, "ok"

    def _bind(self) -> list[socket.socket]:
        config = self.config
        ports = [config.port]
        if config.tls.mode == "manual":
            ports.append(config.tls.https_port)
        socks: list[socket.socket] = []
        for port in ports:
            try:
                socks.append(listen_socket(config.bind_address, port))
            except OSError as exc:
                for sock in socks:
                    sock.close()
                raise StartupError(
                    f"cannot listen on {config.bind_address}:{port}: {exc.strerror}"
                ) from None
        return socks

    async def run(self, early_signals: Sequence[int] = ()) -> int:
        """Serve until SIGTERM/SIGINT; raises :class:`StartupError` when it cannot.

        ``early_signals``: signals that arrived before these handlers existed.
        """
        config = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        if any(sig != signal.SIGHUP for sig in early_signals):
            return 0  # stopped before anything started; a SIGHUP needs nothing: none runs yet
        socks = self._bind()
        fds = [s.fileno() for s in socks]
        admin = None
        try:
            if config.admin.port is not None:
                admin = AdminServer(
                    config.admin.bind_address,
                    config.admin.port,
                    multiprocess_exposition,
                    self.readiness,
                )
                await admin.start()
            return await self._supervise(socks, fds, admin)
        finally:
            if admin is not None:
                await admin.close()
            for sock in socks:
                sock.close()

    async def _supervise(
        self, socks: Sequence[socket.socket], fds: Sequence[int], admin: AdminServer | None
    ) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        host = config.bind_address
        urls = [f"http://{host}:{socks[0].getsockname()[1]}"]
        if len(socks) > 1:
            urls.append(f"https://{host}:{socks[1].getsockname()[1]}")
        self._listening = "listening on " + ", ".join(urls)
        if admin is not None:
            self._listening += f", admin on http://{config.admin.bind_address}:{admin.port}"
        logger.info(
            "supervisor %d: starting %d workers %s", os.getpid(), config.workers, self._listening
        )
        keepers = [loop.create_task(self._keep(i, fds)) for i in range(config.workers)]
        for task in keepers:
            task.add_done_callback(self._keeper_done)
        flusher = loop.create_task(_flush_logs_every_second())
        await self._stop.wait()
        try:
            async with asyncio.timeout(config.shutdown_timeout + 5):
                await asyncio.gather(*keepers, return_exceptions=True)
                await asyncio.gather(*(w.proc.wait() for w in self.workers.values()))
        except TimeoutError:
            logger.error("workers did not stop in time; killing them")
            self._signal_all(signal.SIGKILL)
            await asyncio.gather(*(w.proc.wait() for w in self.workers.values()))
        for task in (*keepers, flusher):
            task.cancel()
        await asyncio.gather(*keepers, flusher, return_exceptions=True)
        logger.info("supervisor: all workers stopped")
        if self.failure is not None:
            raise self.failure
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


def report_start(outcome: str) -> None:
    """Tell the supervisor, when this process is its worker, how its start ended: ``ready``
    (signal handlers installed, listeners accepting) or ``error <why>``. Once per process."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    line = " ".join(outcome.split())[:400] + "\n"
    with contextlib.suppress(OSError, ValueError), os.fdopen(int(fd), "wb", buffering=0) as pipe:
        pipe.write(line.encode("utf-8", "replace"))
