"""The command line: in-process for flags and exit codes, as a real process for signals."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from claude_proxy import __version__
from claude_proxy.cli import (
    EXIT_CHECK_FAILED,
    EXIT_CONFIG_ERROR,
    EXIT_OK,
    EXIT_STARTUP_FAILURE,
    main,
)

from ..helpers import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    RawUpstream,
    Recorded,
    exchange,
    ok_response,
    raw_connect,
    request_bytes,
)

# Printed once signal handlers are installed and the listeners accept: the one line process
# tests wait for (a log line would precede the state it names).
READY = re.compile(r"^ready: listening on http://[\d.]+:(\d+)")
READY_WORKERS = re.compile(r"^ready: (\d+) workers listening on http://[\d.]+:(\d+)")
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def write_config(tmp_path: Path, upstream_url: str, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'upstream_url = "{upstream_url}"\nport = 0\nclient_api_key = "${{TEST_CLIENT_KEY}}"\n'
        f"{extra}\n"
        f'[upstream_auth]\ntype = "api_key"\napi_key = "${{TEST_UPSTREAM_KEY}}"\n'
    )
    path.chmod(0o600)
    return path


def env_with_keys() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PROXY")}
    env.update(TEST_CLIENT_KEY=CLIENT_KEY, TEST_UPSTREAM_KEY=UPSTREAM_KEY, PYTHONUNBUFFERED="1")
    return env


def loop_env(loop: str) -> dict[str, str]:
    return {**env_with_keys(), "CLAUDE_PROXY_LOOP": loop}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"claude-proxy {__version__}"


def test_help_lists_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--config",
        "--verbose",
        "--bind-address",
        "--port",
        "--upstream-url",
        "--client-api-key",
        "--upstream-auth-type",
        "--upstream-api-key",
        "--log-path",
        "--log-rotation",
        "--log-level",
        "--log-prefix",
        "--version",
    ):
        assert flag in out


def test_config_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('upstream_url = "https://h"\n[upstream_auth]\ntype = "azure-ad"\n')
    assert main(["-c", str(bad)]) == EXIT_CONFIG_ERROR
    assert "upstream_auth.type: expected one of" in capsys.readouterr().err
    assert main(["-c", str(tmp_path / "missing.toml")]) == EXIT_CONFIG_ERROR


def test_check_api_key(
    tmp_path: Path,
    upstream: RawUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in env_with_keys().items():
        monkeypatch.setenv(k, v)
    path = write_config(tmp_path, upstream.url)  # check connects to it: loopback only
    assert main(["check", "-c", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"config file:  {path}" in out
    assert "auth type:    api_key" in out and "result:       OK" in out
    assert UPSTREAM_KEY not in out and CLIENT_KEY not in out
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "has space")
    assert main(["check", "-c", str(path)]) == EXIT_CHECK_FAILED
    assert "white space" in capsys.readouterr().out


def test_check_probe(
    tmp_path: Path,
    upstream: RawUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in env_with_keys().items():
        monkeypatch.setenv(k, v)
    path = write_config(tmp_path, upstream.url)
    assert main(["check", "-c", str(path), "--probe", "my-deployment"]) == EXIT_OK
    assert "probe:        POST /v1/messages -> 200" in capsys.readouterr().out
    rec = upstream.requests[0]
    assert b'"model": "my-deployment"' in rec.body
    assert rec.header("x-api-key") == UPSTREAM_KEY.encode()


# ----------------------------------------------------------------- as a real process


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "claude_proxy", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, workers included: see kill()
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: re.Pattern[str] | str, timeout: float = 15) -> re.Match[str]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        found: list[re.Match[str]] = []

        def seen() -> bool:
            found[:] = [m for line in self.lines if (m := rx.search(line))]
            return bool(found) or self.p.poll() is not None

        with self._cond:
            self._cond.wait_for(seen, timeout)
        assert found, "".join(self.lines)
        return found[0]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        """Kill the process and any worker it left behind (they would hold stdout open)."""
        with contextlib.suppress(ProcessLookupError):
            if hasattr(os, "killpg"):
                os.killpg(self.p.pid, signal.SIGKILL)
            else:
                self.p.kill()

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        code = self.p.wait(20)
        self._reader.join(5)
        if self._reader.is_alive():
            self.kill()
            self._reader.join(5)
        if self.p.stdout is not None and not self._reader.is_alive():
            self.p.stdout.close()
        return code


@pytest.fixture
def proc_factory(tmp_path: Path) -> Iterator:
    procs: list[Proc] = []

    def make(args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, env or env_with_keys(), tmp_path)
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        if proc.p.poll() is None:
            proc.kill()
        proc.stop()


@LOOPS
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_process_serves_and_drains_a_stream_on_signal(
    tmp_path: Path, make_upstream, proc_factory, sig: signal.Signals, loop: str
) -> None:
    release = threading.Event()

    def handler(rec: Recorded) -> list[object]:
        if rec.target == b"/stream":
            return [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfirs\r\n",
                release,
                b"4\r\nlast\r\n0\r\n\r\n",
            ]
        return [ok_response()]

    up = make_upstream(handler)
    path = write_config(tmp_path, up.url, "shutdown_timeout = 10")
    proc = proc_factory(["-c", str(path)], loop_env(loop))
    port = int(proc.wait_line(READY).group(1))
    assert str(path) in proc.output
    assert UPSTREAM_KEY not in proc.output
    resp = exchange(port, request_bytes("POST", "/x", [("x-api-key", CLIENT_KEY)], b"{}"))
    assert resp.status == 200

    sock = raw_connect(port, timeout=15)
    sock.sendall(request_bytes("POST", "/stream", [("x-api-key", CLIENT_KEY)], b"{}"))
    got = b""
    while b"firs" not in got:
        got += sock.recv(1000)
    proc.p.send_signal(sig)
    proc.wait_line("^draining: no longer accepting")
    # new connections are refused while the stream drains
    with pytest.raises(OSError):
        raw_connect(port, timeout=2).sendall(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
    release.set()
    while not got.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(1000)
        assert chunk, got
        got += chunk
    sock.close()
    assert b"last" in got
    assert proc.p.wait(10) == 0  # exits by itself once the stream is done
    assert proc.stop() == 0
    assert CLIENT_KEY not in proc.output and UPSTREAM_KEY not in proc.output


def test_process_sighup_reloads_keys(tmp_path: Path, upstream: RawUpstream, proc_factory) -> None:
    path = write_config(tmp_path, upstream.url, '[logging]\nlevel = "warn"')
    proc = proc_factory(["-c", str(path)])
    port = int(proc.wait_line(READY).group(1))
    new_key = "rotated-client-key-000111"
    conn = raw_connect(port)  # an open keep-alive connection survives the reload
    conn.sendall(request_bytes("POST", "/a", [("x-api-key", CLIENT_KEY)], b"{}"))
    from ..helpers import read_response

    assert read_response(conn).status == 200
    assert '"POST /a"' not in proc.output  # warn level: no access lines
    text = path.read_text().replace("${TEST_CLIENT_KEY}", new_key)
    path.write_text(text.replace('level = "warn"', 'level = "info"'))
    proc.p.send_signal(signal.SIGHUP)
    proc.wait_line("reloaded")
    conn.sendall(request_bytes("POST", "/b", [("x-api-key", new_key)], b"{}"))
    assert read_response(conn).status == 200
    proc.wait_line('"POST /b" 200')  # the new level took effect: access lines now
    assert exchange(port, request_bytes("POST", "/c", [("x-api-key", CLIENT_KEY)])).status == 401
    # an invalid config is rejected and the running one kept
    path.write_text(path.read_text() + "\nbogus_key = 1\n")
    proc.p.send_signal(signal.SIGHUP)
    proc.wait_line("reload rejected")
    conn.sendall(request_bytes("POST", "/d", [("x-api-key", new_key)], b"{}"))
    assert read_response(conn).status == 200
    conn.close()
    assert proc.stop() == 0
    assert new_key not in proc.output


def test_world_readable_config_warns(tmp_path: Path, upstream: RawUpstream, proc_factory) -> None:
    path = write_config(tmp_path, upstream.url)
    # secrets from ${VAR} are not in the file: no warning for them; a literal one warns
    path.write_text(path.read_text().replace("${TEST_UPSTREAM_KEY}", UPSTREAM_KEY))
    path.chmod(0o644)
    proc = proc_factory(["-c", str(path)])
    proc.wait_line(READY)  # printed once the signal handlers exist and the listener accepts
    assert "readable by other users" in proc.output
    assert "(upstream_auth.api_key)" in proc.output and "chown" in proc.output
    assert proc.stop() == 0
    assert UPSTREAM_KEY not in proc.output


def test_log_file_and_flags(tmp_path: Path, upstream: RawUpstream, proc_factory) -> None:
    path = write_config(tmp_path, upstream.url)
    logs = tmp_path / "logs"
    proc = proc_factory(
        [
            "-c",
            str(path),
            "--log-path",
            str(logs),
            "--log-prefix",
            "cp",
            "--log-rotation",
            "hourly",
            "-v",
        ]
    )
    # the banner goes to the log file, the ready line to stdout
    port = int(proc.wait_line(READY).group(1))
    assert "listening on" in (logs / "cp.log").read_text()
    exchange(port, request_bytes("POST", "/x", [("x-api-key", CLIENT_KEY)], b"{}"))
    assert proc.stop() == 0
    text = (logs / "cp.log").read_text()
    assert 'default "POST /x" 200' in text
    assert CLIENT_KEY not in text and UPSTREAM_KEY not in text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_demo_prints_a_curl_line_that_works(proc_factory) -> None:
    proc = proc_factory(["demo", "--port", "0"])
    proc.wait_line("Stop with Ctrl-C")
    text = proc.output
    start = text.index("  curl -N ")
    command = text[start : text.index("\n\n", start)].replace("\\\n", " ")
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=20)
    assert '"text_delta", "text": " mock!"' in out.stdout, out.stdout
    assert "message_stop" in out.stdout
    assert proc.stop() == 0


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_workers_share_the_port_are_replaced_and_aggregate_metrics(
    tmp_path: Path, upstream: RawUpstream, proc_factory
) -> None:
    from ..helpers import wait_until
    from .test_ops import metric

    path = write_config(tmp_path, upstream.url, "workers = 2\n[admin]\nport = 0")
    proc = proc_factory(["-c", str(path)])
    match = proc.wait_line(READY_WORKERS.pattern + r", admin on http://[\d.]+:(\d+)")
    port, admin = int(match.group(2)), int(match.group(3))

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    wait_until(lambda: get("/readyz")[0] == 200, timeout=15)
    anthropic = {"client": "default", "route": "anthropic"}
    for _ in range(20):
        resp = exchange(
            port, request_bytes("POST", "/v1/messages", [("x-api-key", CLIENT_KEY)], b"{}")
        )
        assert resp.status == 200
    wait_until(lambda: metric(get("/metrics")[1], "claude_proxy_requests_total", **anthropic) == 20)
    workers = children(proc.p.pid)
    assert len(workers) == 2
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(children(proc.p.pid) - {victim}) == 2, timeout=15)
    wait_until(lambda: get("/readyz")[0] == 200, timeout=15)
    assert (
        exchange(port, request_bytes("POST", "/x", [("x-api-key", CLIENT_KEY)], b"{}")).status
        == 200
    )
    assert "exited with -9; starting a new one" in proc.output
    # Workers fold their counts into the shared files each second; one that is stopped right
    # after serving folds them on its way out, so nothing is lost.
    for _ in range(10):
        resp = exchange(
            port, request_bytes("POST", "/v1/messages", [("x-api-key", CLIENT_KEY)], b"{}")
        )
        assert resp.status == 200
    before = children(proc.p.pid)
    for pid in before:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: len(children(proc.p.pid) - before) == 2, timeout=15)
    # the route too: the POST /x above is another series, which may come first in the text
    assert metric(get("/metrics")[1], "claude_proxy_requests_total", **anthropic) == 30
    proc.p.send_signal(signal.SIGTERM)
    assert proc.p.wait(20) == 0
    assert "all workers stopped" in proc.output


# ----------------------------------------------------------------- start-up and signals


@LOOPS
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_during_start_up_is_acted_on_not_fatal(
    tmp_path: Path, upstream: RawUpstream, proc_factory, sig: signal.Signals, loop: str
) -> None:
    """A signal while the proxy starts: SIGTERM stops it cleanly, SIGHUP reloads once it runs.

    The world-readable-config warning is logged before the proxy binds, so the signal lands
    in the middle of start-up (the default action killed the process there: 10 runs in 10).
    Whenever it lands after main() began, the outcome is the same, so nothing here is timing.
    """
    path = write_config(tmp_path, upstream.url)
    path.write_text(path.read_text().replace("${TEST_UPSTREAM_KEY}", UPSTREAM_KEY))
    path.chmod(0o644)  # with a secret written out: warned about before the proxy binds
    proc = proc_factory(["-c", str(path)], loop_env(loop))
    proc.wait_line("readable by other users")
    proc.p.send_signal(sig)
    if sig == signal.SIGTERM:
        assert proc.p.wait(15) == 0, proc.output
        return
    port = int(proc.wait_line(READY).group(1))
    proc.wait_line("reloaded")
    resp = exchange(port, request_bytes("POST", "/x", [("x-api-key", CLIENT_KEY)], b"{}"))
    assert resp.status == 200
    assert proc.stop() == 0


def test_ready_line_follows_the_banner_and_handlers(
    tmp_path: Path, upstream: RawUpstream, proc_factory
) -> None:
    """Once ``ready:`` is out, the listener accepts and a SIGHUP is handled, not fatal."""
    path = write_config(tmp_path, upstream.url)
    proc = proc_factory(["-c", str(path)])
    port = int(proc.wait_line(READY).group(1))
    proc.p.send_signal(signal.SIGHUP)
    resp = exchange(port, request_bytes("POST", "/x", [("x-api-key", CLIENT_KEY)], b"{}"))
    assert resp.status == 200
    proc.wait_line("reloaded")
    banner = next(i for i, line in enumerate(proc.lines) if "listening on" in line)
    ready = next(i for i, line in enumerate(proc.lines) if READY.search(line))
    assert banner < ready
    assert proc.stop() == 0


def test_sighup_says_what_changed_and_what_needs_a_restart(
    tmp_path: Path, make_upstream, proc_factory
) -> None:
    first, second = make_upstream(), make_upstream()
    keys = '[[client_api_keys]]\nname = "alice"\nkey = "alice-key-000111"\n'
    path = write_config(tmp_path, first.url, keys)
    proc = proc_factory(["-c", str(path)])
    port = int(proc.wait_line(READY).group(1))
    text = path.read_text().replace(first.url, second.url)
    text = text.replace('"alice"', '"bob"').replace("alice-key-000111", "bob-key-000222")
    path.write_text(text.replace("port = 0", "port = 0\nworkers = 3"))
    proc.p.send_signal(signal.SIGHUP)
    line = proc.wait_line(r"reloaded .*").group(0)
    assert "client keys added: bob; client keys removed: alice" in line
    assert "in force: 2 client key(s) [default, bob]" in line
    proc.wait_line(f"upstream_url: '{first.url}' stays in force; '{second.url}' needs a restart")
    proc.wait_line("workers: 1 stays in force; 3 needs a restart")
    # what needs a restart is not half-applied: requests still go to the running upstream
    resp = exchange(port, request_bytes("POST", "/x", [("x-api-key", "bob-key-000222")], b"{}"))
    assert resp.status == 200
    assert len(first.requests) == 1 and not second.requests
    gone = exchange(port, request_bytes("POST", "/y", [("x-api-key", "alice-key-000111")]))
    assert gone.status == 401
    assert proc.stop() == 0
    assert "bob-key-000222" not in proc.output and "alice-key-000111" not in proc.output


# ----------------------------------------------------------------- start-up failures


def test_port_in_use_with_workers_exits_3_with_the_message(
    tmp_path: Path, upstream: RawUpstream, proc_factory
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, upstream.url, "workers = 2")
        proc = proc_factory(["-c", str(path), "--port", str(port)])
        assert proc.p.wait(15) == EXIT_STARTUP_FAILURE, proc.output
    proc.stop()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.output
    assert "Traceback" not in proc.output


@pytest.mark.parametrize("workers", [1, 2])
def test_unwritable_log_path_is_a_config_error(
    tmp_path: Path, upstream: RawUpstream, proc_factory, workers: int
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = write_config(tmp_path, upstream.url, f"workers = {workers}")
    proc = proc_factory(["-c", str(path), "--log-path", str(blocker / "logs")])
    assert proc.p.wait(15) == EXIT_CONFIG_ERROR, proc.output
    proc.stop()
    assert f"config error: logging.log_path: {blocker} is not a directory" in proc.output
    assert "Traceback" not in proc.output


def test_check_reports_an_unwritable_log_path(
    tmp_path: Path,
    upstream: RawUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in env_with_keys().items():
        monkeypatch.setenv(k, v)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = write_config(tmp_path, upstream.url)
    assert main(["check", "-c", str(path), "--log-path", str(blocker / "logs")]) == (
        EXIT_CHECK_FAILED
    )
    out = capsys.readouterr().out
    assert f"log path:     FAILED: {blocker} is not a directory" in out
    assert "result:       NOT USABLE" in out


def as_unprivileged() -> list[str]:
    """A command prefix that runs as a user without root's permission bypass, or []."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop root's permission bypass")
    # still uid 0 (the interpreter lives under /root), but no capabilities: no DAC override
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--"]


def test_check_reports_a_log_path_this_user_cannot_write(
    tmp_path: Path, upstream: RawUpstream
) -> None:
    """As an unprivileged user (``/var/log/...`` for one): check says so; serve exits 2."""
    locked = tmp_path / "var-log"
    locked.mkdir()
    if os.geteuid() == 0:
        os.chown(locked, 65534, 65534)  # nobody's, as /var/log is root's
    locked.chmod(0o755)
    path = write_config(tmp_path, upstream.url)
    base = [*as_unprivileged(), sys.executable, "-m", "claude_proxy"]
    flags = ["-c", str(path), "--log-path", str(locked / "claude-proxy")]
    check, serve = (
        subprocess.run([*base, *args], env=env_with_keys(), capture_output=True, text=True)
        for args in (["check", *flags], flags)
    )
    assert check.returncode == EXIT_CHECK_FAILED, check.stdout + check.stderr
    problem = f"cannot create {locked / 'claude-proxy'}: {locked} is not writable by uid"
    assert f"log path:     FAILED: {problem}" in check.stdout
    assert serve.returncode == EXIT_CONFIG_ERROR, serve.stdout + serve.stderr
    assert f"config error: logging.log_path: {problem}" in serve.stderr
    assert "Traceback" not in serve.stderr + check.stderr


# ----------------------------------------------------------------- workers


def wait_for_new_worker(proc: Proc, old: set[int]) -> None:
    from ..helpers import wait_until

    wait_until(lambda: bool(children(proc.p.pid) - old), timeout=15)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@LOOPS
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_during_a_worker_restart_reaches_the_new_worker(
    tmp_path: Path, upstream: RawUpstream, proc_factory, sig: signal.Signals, loop: str
) -> None:
    """The supervisor holds a signal for a worker that is still starting and sends it once
    the worker is ready: the new worker drains (SIGTERM) or reloads (SIGHUP), never dies."""
    path = write_config(tmp_path, upstream.url, "workers = 2")
    proc = proc_factory(["-c", str(path)], loop_env(loop))
    proc.wait_line(READY_WORKERS)
    workers = children(proc.p.pid)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_for_new_worker(proc, workers)  # forked, still importing: no handlers yet
    proc.p.send_signal(sig)
    if sig == signal.SIGHUP:
        from ..helpers import wait_until

        wait_until(lambda: proc.output.count("reloaded") == 2, timeout=15)
        assert proc.stop() == 0
    else:
        assert proc.p.wait(20) == 0, proc.output
        proc.stop()
    drained = re.findall(r"INFO claude_proxy: stopped$", proc.output, re.MULTILINE)
    assert len(drained) == 2, proc.output  # both workers drained: none was killed
    assert "exited with -1" not in proc.output and "exited with -15" not in proc.output


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_worker_that_cannot_start_stops_the_supervisor_with_its_error(
    tmp_path: Path, upstream: RawUpstream, proc_factory
) -> None:
    path = write_config(tmp_path, upstream.url, "workers = 2\n[admin]\nport = 0")
    proc = proc_factory(["-c", str(path)])
    proc.wait_line(READY_WORKERS)
    path.write_text(path.read_text() + "\nbogus_key = 1\n")  # new workers cannot start
    os.kill(min(children(proc.p.pid)), signal.SIGKILL)
    assert proc.p.wait(30) == EXIT_CONFIG_ERROR, proc.output
    proc.stop()
    assert "cannot start: config error: upstream_auth.bogus_key: unknown key" in proc.output
    assert "(failed 3 times in a row)" in proc.output
    assert "all workers stopped" in proc.output  # the healthy worker drained
