"""The command line: in-process for flags and exit codes, as a real process for signals."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from claude_proxy import __version__
from claude_proxy.cli import EXIT_CHECK_FAILED, EXIT_CONFIG_ERROR, EXIT_OK, main

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

LISTENING = re.compile(r"listening on http://[\d.]+:(\d+)")


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_process_serves_and_drains_a_stream_on_signal(
    tmp_path: Path, make_upstream, proc_factory, sig: signal.Signals
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
    proc = proc_factory(["-c", str(path)])
    port = int(proc.wait_line(LISTENING).group(1))
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
    proc.wait_line("shutting down")
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
    port = int(proc.wait_line(LISTENING).group(1))
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
    port = int(proc.wait_line(LISTENING).group(1))
    # served: serve() has reached its signal handlers (the banner comes before them)
    assert exchange(port, request_bytes("POST", "/x", [("x-api-key", CLIENT_KEY)])).status == 200
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
    # the banner goes to the log file; wait for the file to show it
    import time

    deadline = time.monotonic() + 15
    while not (logs / "cp.log").exists() or "listening" not in (logs / "cp.log").read_text():
        assert time.monotonic() < deadline and proc.p.poll() is None, proc.output
        time.sleep(0.05)
    port = int(LISTENING.search((logs / "cp.log").read_text()).group(1))  # type: ignore[union-attr]
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
    match = proc.wait_line(r"2 workers listening on http://[\d.]+:(\d+), admin on port (\d+)")
    port, admin = int(match.group(1)), int(match.group(2))

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    wait_until(lambda: get("/readyz")[0] == 200, timeout=15)
    for _ in range(20):
        resp = exchange(
            port, request_bytes("POST", "/v1/messages", [("x-api-key", CLIENT_KEY)], b"{}")
        )
        assert resp.status == 200
    wait_until(
        lambda: metric(get("/metrics")[1], "claude_proxy_requests_total", client="default") == 20
    )
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
    assert metric(get("/metrics")[1], "claude_proxy_requests_total", client="default") == 30
    proc.p.send_signal(signal.SIGTERM)
    assert proc.p.wait(20) == 0
    assert "all workers stopped" in proc.output
