"""``make bench``: claude-proxy beside nginx, the upstream itself and, optionally, older code.

Everything runs on loopback. The upstream is nginx serving fixed bodies (plain and TLS) and a
light SSE server; the same load goes to the upstream directly, through nginx configured for
streaming, and through claude-proxy. With two or more cores, the relay under test (nginx or
claude-proxy) is pinned to core 0 and the load generator and upstream to the other cores.

``--baseline REF`` also runs the claude_proxy package of REF (a commit, checked out with
``git worktree add --detach`` into the run's temporary directory and removed afterwards, or the
path of a checkout) with the same configs, alternating A/B/A with the code under test in each
compared row, and prints the comparison as a Markdown table. ``FEATURES`` lists the config
variants whose cost is measured against the plain config.

Prints one table (ratios first) and writes ``bench/results/bench-<time>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.compare import (
    Comparison,
    Metric,
    alternate,
    compare,
    config_text,
    feature_cost,
    markdown_table,
    mean_run,
)
from bench.routing_cost import BUDGET_US, measure_routing, upstreams_toml
from claude_proxy.config import parse as parse_config
from claude_proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
KEY = "bench-client-key"
UPSTREAM_KEY = "bench-upstream-key"
SMALL_BODY = json.dumps({"model": "m", "max_tokens": 1, "pad": "x" * 960}).encode()[:1024]
# A Messages-API reply with usage as Anthropic sends it, so that usage reading does real work.
SMALL_REPLY = json.dumps(
    {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "bench-model",
        "content": [{"type": "text", "text": "y" * 600}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 34,
            "service_tier": "standard",
        },
    }
).replace('"', '\\"')
# The same bytes as text/plain, which the usage reader leaves alone: an A/B of usage reading.
UNREAD_PATH = "/v1/messages/unread"
LARGE = 10 * 1024 * 1024

# Feature cost rows: (name, extra config TOML laid over the plain config). Each variant runs in a
# process of its own under the plain rows' load (small POST, c=64), between two runs of the plain
# config, and is reported as CPU per request added and throughput change against them. In the
# TOML, ${work} is a directory of the variant's own and ${upstream} the plain config's upstream
# URL ($$ for a literal $); [[upstreams]] in a row replace the plain upstream_url. Add a row per
# feature.
# A key with limits: the client's key moves from client_api_key to a named, limited entry.
LIMITED_KEY = (
    'client_api_key = "bench-unused-key"\n'
    "[[client_api_keys]]\n"
    'name = "team"\n'
    f'key = "{KEY}"\n'
    "requests_per_minute = 1000000000\n"
    "tokens_per_minute = 1000000000\n"
    "max_concurrent = 100000\n"
)
FEATURES: list[tuple[str, str]] = [
    ("metrics", "[admin]\nport = 0\n"),
    ("access log file", '[logging]\nlevel = "info"\nlog_path = "${work}/logs"\n'),
    ("key with limits, in-process", LIMITED_KEY),
    ("key with limits, Redis on loopback", LIMITED_KEY + '[limits]\nredis_url = "${redis}"\n'),
    ("telemetry, sample 1.0", '[telemetry]\notlp_endpoint = "${otlp}"\nsample_ratio = 1.0\n'),
    # All three at the plain upstream: the router plans and failover is armed on every request,
    # but no upstream refuses, so the first attempt always answers.
    ("three [[upstreams]] (failover armed)", upstreams_toml(routes=False)),
    # The route names models, so the whole body is held for its model before the upstream is
    # chosen (the small body's "model" is "m", its first member).
    ("[[upstreams]] + routes by model", upstreams_toml(routes=True)),
]
# The rows compared with the baseline (small POST concurrency); in a smoke run, every row.
BASELINE_CONNS = (1, 64, 256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pin(core_set: str) -> list[str]:
    return ["taskset", "-c", core_set] if shutil.which("taskset") and cores() >= 2 else []


RELAY_CORE = "0"
LOAD_CORES = "1" if cores() == 2 else f"1-{cores() - 1}"


def rss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) if m else 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (NaN without /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process meant to listen on {port} exited ({proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass(frozen=True)
class Build:
    """One version of the claude_proxy package: the code under test, or the baseline."""

    name: str
    root: Path  # the directory holding the claude_proxy package
    rev: str  # what it is, for the table: a commit, "+dirty" when the tree has changes

    def environ(self, extra: dict[str, str]) -> dict[str, str]:
        """The environment of its processes: its checkout first on the path, no config overrides."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PROXY__")}
        path = [str(self.root), *filter(None, [os.environ.get("PYTHONPATH")])]
        return environ | {"PYTHONPATH": os.pathsep.join(path)} | extra

    def check(self) -> None:
        """Fail unless ``python -m claude_proxy`` run as the bench runs it imports this build."""
        done = subprocess.run(
            [PY, "-c", "import claude_proxy; print(claude_proxy.__file__)"],
            cwd=self.root,
            env=self.environ({}),
            capture_output=True,
            text=True,
            timeout=60,
        )
        found = done.stdout.strip()
        if done.returncode or not Path(found).resolve().is_relative_to(self.root.resolve()):
            raise RuntimeError(
                f"{self.name}: claude_proxy imports from {found or done.stderr.strip()!r}, "
                f"not from {self.root}"
            )


def describe(root: Path) -> str:
    try:
        return git("describe", "--always", "--dirty=+dirty", "--abbrev=10", cwd=root)
    except RuntimeError:
        return "not a git checkout"


def current_build() -> Build:
    return Build("claude-proxy", ROOT, describe(ROOT))


@contextlib.contextmanager
def baseline_build(ref: str, work: Path) -> Iterator[Build]:
    """The baseline's code: ``ref`` checked out for the run (then removed), or a checkout's path."""
    path = Path(ref).expanduser()
    if (path / "claude_proxy" / "__init__.py").is_file():
        yield Build("baseline", path.resolve(), f"{describe(path)} at {path}")
        return
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except RuntimeError:
        raise RuntimeError(
            f"--baseline {ref}: neither a commit nor a checkout with a claude_proxy package"
        ) from None
    dest = work / "baseline"
    git("worktree", "add", "--detach", "--quiet", str(dest), commit)
    try:
        yield Build("baseline", dest, f"{ref} = {commit[:10]}")
    finally:
        git("worktree", "remove", "--force", str(dest))


@dataclass
class Env:
    work: Path
    smoke: bool
    current: Build = field(default_factory=current_build)
    baseline: Build | None = None
    # A/B pairs per compared row, after the first A run: 1 gives A/B/A
    rounds: int = 1
    up: int = field(default_factory=free_port)
    up_tls: int = field(default_factory=free_port)
    sse: int = field(default_factory=free_port)
    ngx: int = field(default_factory=free_port)
    ngx_tls: int = field(default_factory=free_port)
    ngx_sse: int = field(default_factory=free_port)
    redis: int = field(default_factory=free_port)  # a redis-server for the limits rows
    otlp: int = field(default_factory=free_port)  # an OTLP sink for the telemetry row
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


NGINX_COMMON = """
worker_processes 1;
{user}
pid {work}/{name}.pid;
error_log {work}/{name}.err warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {work}/{name}-body;
    proxy_temp_path {work}/{name}-proxy;
{servers}
}}
"""

UPSTREAM_SERVERS = """
    server {{
        listen 127.0.0.1:{up} backlog=4096;
        listen 127.0.0.1:{up_tls} ssl backlog=4096;
        ssl_certificate {work}/server.pem;
        ssl_certificate_key {work}/server.key;
        client_max_body_size 0;
        location = /large {{ alias {work}/large.bin; }}
        location = {unread} {{ default_type text/plain; return 200 "{reply}"; }}
        location / {{ default_type application/json; return 200 "{reply}"; }}
    }}
    # an OTLP/HTTP sink for the telemetry row: every export is accepted
    server {{
        listen 127.0.0.1:{otlp};
        client_max_body_size 0;
        location / {{ default_type application/x-protobuf; return 200 ""; }}
    }}
"""

PROXY_SERVERS = """
    upstream plain {{ server 127.0.0.1:{up}; keepalive 256; }}
    upstream tls {{ server 127.0.0.1:{up_tls}; keepalive 256; }}
    upstream sse {{ server 127.0.0.1:{sse}; keepalive 256; }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header x-api-key "{upstream_key}";
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_read_timeout 600s;
    client_max_body_size 0;
    server {{ listen 127.0.0.1:{ngx} backlog=4096; location / {{ proxy_pass http://plain; }} }}
    server {{
        listen 127.0.0.1:{ngx_tls} backlog=4096;
        location / {{
            proxy_pass https://tls;
            proxy_ssl_session_reuse on;
            proxy_ssl_verify off;
        }}
    }}
    server {{ listen 127.0.0.1:{ngx_sse} backlog=4096; location / {{ proxy_pass http://sse; }} }}
"""


def write_nginx(env: Env, name: str, servers: str) -> Path:
    user = "user root;" if os.geteuid() == 0 else ""
    conf = env.work / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(user=user, work=env.work, name=name, servers=servers))
    return conf


def make_certs(env: Env) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(env.work / "server.pem")
    cert.private_key_pem.write_to_path(env.work / "server.key")
    ca.cert_pem.write_to_path(env.work / "ca.pem")


def start_servers(env: Env) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    make_certs(env)
    (env.work / "large.bin").write_bytes(os.urandom(LARGE))
    up = write_nginx(
        env,
        "upstream",
        UPSTREAM_SERVERS.format(
            up=env.up,
            up_tls=env.up_tls,
            work=env.work,
            reply=SMALL_REPLY,
            unread=UNREAD_PATH,
            otlp=env.otlp,
        ),
    )
    px = write_nginx(
        env,
        "proxy",
        PROXY_SERVERS.format(
            up=env.up,
            up_tls=env.up_tls,
            sse=env.sse,
            ngx=env.ngx,
            ngx_tls=env.ngx_tls,
            ngx_sse=env.ngx_sse,
            upstream_key=UPSTREAM_KEY,
        ),
    )
    env.start([*pin(LOAD_CORES), nginx, "-c", str(up), "-g", "daemon off;"])
    redis = shutil.which("redis-server")
    if redis is not None:  # for the limits row (install-tools.sh installs it)
        args = ["--port", str(env.redis), "--bind", "127.0.0.1", "--save", ""]
        env.start([*pin(LOAD_CORES), redis, *args, "--appendonly", "no", "--dir", str(env.work)])
    env.start([*pin(RELAY_CORE), nginx, "-c", str(px), "-g", "daemon off;"])
    events, interval = (40, 0.05) if env.smoke else (200, 0.05)
    env.start(
        [
            *pin(LOAD_CORES),
            PY,
            "-m",
            "bench.sse",
            "server",
            str(env.sse),
            str(events),
            str(interval),
        ],
        cwd=ROOT,
    )
    for port in (env.up, env.up_tls, env.ngx, env.ngx_tls, env.sse, env.ngx_sse, env.otlp):
        wait_port(port)
    if redis is not None:
        wait_port(env.redis)


def base_config(upstream: str, port: int, workers: int) -> dict[str, Any]:
    """The plain config every build and variant starts from."""
    return {
        "upstream_url": upstream,
        "port": port,
        "workers": workers,
        "client_api_key": KEY,
        "upstream_auth": {"type": "api_key", "api_key": UPSTREAM_KEY},
        "logging": {"level": "warn"},
    }


@contextlib.contextmanager
def claude_proxy(
    env: Env, upstream: str, workers: int = 1, *, build: Build | None = None, extra: str = ""
) -> Iterator[tuple[int, int]]:
    """A claude-proxy process of ``build`` (this code by default) in front of ``upstream``.

    Yields (port, pid). ``extra``: TOML laid over the plain config (``${work}`` is a directory of
    this process's own, ``${upstream}`` is ``upstream``).
    """
    build = build or env.current
    port = free_port()
    work = env.work / f"cp-{port}"
    work.mkdir()
    conf = work / "config.toml"
    conf.write_text(
        config_text(
            base_config(upstream, port, workers),
            extra,
            work=str(work),
            upstream=upstream,
            redis=f"redis://127.0.0.1:{env.redis}/0",
            otlp=f"http://127.0.0.1:{env.otlp}",
        )
    )
    conf.chmod(0o600)
    cmd = [PY, "-m", "claude_proxy", "-c", str(conf)]
    if workers == 1:
        cmd = [*pin(RELAY_CORE), *cmd]
    environ = build.environ({"SSL_CERT_FILE": str(env.work / "ca.pem")})
    with (work / "stderr").open("wb") as err:
        proc = subprocess.Popen(
            cmd, cwd=build.root, env=environ, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        try:
            wait_port(port, proc=proc)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{build.name} ({build.rev}) did not start ({exc}): see above"
            ) from None
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        with contextlib.suppress(OSError):  # what it said, as when its stderr was the bench's
            sys.stderr.write((work / "stderr").read_text(errors="replace")[-4000:])


WRK_LUA = """
wrk.method = "{method}"
wrk.headers["x-api-key"] = "{key}"
wrk.headers["content-type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
{body}
"""


def wrk(
    env: Env, url: str, conns: int, secs: float, *, method: str = "POST", body: str = "small"
) -> dict[str, float]:
    if body == "small":
        lua_body = "wrk.body = [[" + SMALL_BODY.decode() + "]]"
    elif body == "large":
        lua_body = f'wrk.body = string.rep("a", {LARGE})'
    else:
        lua_body = ""
    script = env.work / f"wrk-{method}-{body}.lua"
    script.write_text(WRK_LUA.format(method=method, key=KEY, body=lua_body))
    cmd = [
        *pin(LOAD_CORES),
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(secs))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    result = parse_wrk(done.stdout)
    if not result["rps"]:
        print(
            f"wrk against {url} failed: {done.stdout.strip()} {done.stderr.strip()}",
            file=sys.stderr,
        )
    return result


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def parse_wrk(out: str) -> dict[str, float]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": _ms(p50.group(1)) if p50 else float("nan"),
        "p99_ms": _ms(p99.group(1)) if p99 else float("nan"),
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": sock_err.group(1) if sock_err else "",  # type: ignore[dict-item]
    }


def sse_run(env: Env, port: int, streams: int, pid: int | None) -> dict[str, float]:
    secs = 2.0 if env.smoke else 10.0
    client = subprocess.Popen(
        [
            *pin(LOAD_CORES),
            PY,
            "-m",
            "bench.sse",
            "client",
            f"127.0.0.1:{port}",
            str(streams),
            KEY,
            str(secs + 30),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = 0
    base = rss_kb(pid) if pid else 0
    cpu_before = cpu_seconds(pid) if pid else math.nan
    while client.poll() is None:
        if pid:
            peak = max(peak, rss_kb(pid))
        time.sleep(0.25)
    assert client.stdout is not None
    result: dict[str, float] = json.loads(client.stdout.read())
    if pid:
        result["rss_base_kb"] = base
        result["rss_peak_kb"] = peak
        result["rss_per_stream_kb"] = (peak - base) / streams
        used = cpu_seconds(pid) - cpu_before
        result["cpu_us_per_event"] = used / result["events"] * 1e6 if result["events"] else math.nan
    return result


def measure(
    env: Env, port: int, pid: int, conns: int, path: str = "/v1/messages"
) -> dict[str, Any]:
    """wrk's small POST against one proxy, with that proxy's CPU time per request from /proc."""
    secs = 1.0 if env.smoke else 4.0
    before = cpu_seconds(pid)
    result: dict[str, Any] = wrk(env, f"http://127.0.0.1:{port}{path}", conns, secs)
    used = cpu_seconds(pid) - before
    rps = result["rps"]
    result["cpu_us"] = used / (rps * secs) * 1e6 if rps else math.nan
    return result


SMALL_METRICS = (
    Metric("req/s", "rps", "req/s", relative=True),
    Metric("CPU per request", "cpu_us", "µs"),
)


def sse_metrics(direct: dict[str, Any]) -> tuple[Metric, ...]:
    return (
        Metric("added p50", "p50_ms", "ms", minus=direct["p50_ms"]),
        Metric("added p99", "p99_ms", "ms", minus=direct["p99_ms"]),
        Metric("RSS per stream", "rss_per_stream_kb", "KB"),
        Metric("CPU per event", "cpu_us_per_event", "µs"),
    )


def run(env: Env) -> dict[str, Any]:
    smoke = env.smoke
    secs = 1.0 if smoke else 4.0
    results: dict[str, Any] = {"small": {}, "small_tls": {}, "large": {}, "sse": {}, "workers": {}}
    table: list[Comparison] = []
    direct = f"http://127.0.0.1:{env.up}"
    results["routing"] = routing(env)
    with contextlib.ExitStack() as stack:
        cp, cp_pid = stack.enter_context(claude_proxy(env, direct))
        old = None
        if env.baseline:
            old = stack.enter_context(claude_proxy(env, direct, build=env.baseline))
        targets = {"direct": env.up, "nginx": env.ngx}
        for conns in [1, 16] if smoke else [1, 16, 64, 256]:
            row: dict[str, Any] = {
                name: wrk(env, f"http://127.0.0.1:{port}/v1/messages", conns, secs)
                for name, port in targets.items()
            }
            this = functools.partial(measure, env, cp, cp_pid, conns)
            if old and (smoke or conns in BASELINE_CONNS):
                a, b = alternate(this, functools.partial(measure, env, *old, conns), env.rounds)
                row["claude-proxy"], row["baseline"] = mean_run(a), mean_run(b)
                row["claude-proxy"]["each"], row["baseline"]["each"] = a, b
                table += compare(f"small POST c={conns}", SMALL_METRICS, a, b)
            else:
                row["claude-proxy"] = this()
            results["small"][str(conns)] = row
            report_row(f"small POST c={conns}", row)
        targets["claude-proxy"] = cp
        results["large"]["download"] = large(env, targets, "GET", "/large", "none")
        results["memory_after_load_kb"] = rss_kb(cp_pid)
    results["features"] = features(env)
    results["usage"] = usage_reading(env)
    with claude_proxy(env, f"https://127.0.0.1:{env.up_tls}") as (cp, _):
        targets = {"direct": env.up_tls, "nginx": env.ngx_tls, "claude-proxy": cp}
        row = {}
        for name, port in targets.items():
            scheme = "https" if name == "direct" else "http"
            row[name] = wrk(env, f"{scheme}://127.0.0.1:{port}/v1/messages", 64, secs)
        results["small_tls"]["64"] = row
        report_row("small POST, TLS upstream, c=64", row)
    streams = 100 if smoke else 2000
    sse_upstream = f"http://127.0.0.1:{env.sse}"
    with claude_proxy(env, sse_upstream) as (cp, cp_pid):
        # nginx cannot consume a request body without a module; the Python upstream reads it
        targets = {"direct": env.sse, "nginx": env.ngx_sse, "claude-proxy": cp}
        results["large"]["upload"] = large(env, targets, "POST", "/upload", "large")
        results["memory_after_upload_kb"] = rss_kb(cp_pid)
    row = {
        "direct": sse_run(env, env.sse, streams, None),
        "nginx": sse_run(env, env.ngx_sse, streams, nginx_worker_pid(env)),
    }
    this = functools.partial(sse_fresh, env, streams, env.current)
    if env.baseline:
        before = functools.partial(sse_fresh, env, streams, env.baseline)
        a, b = alternate(this, before, env.rounds)
        row["claude-proxy"], row["baseline"] = mean_run(a), mean_run(b)
        table += compare(f"SSE {streams} streams", sse_metrics(row["direct"]), a, b)
    else:
        row["claude-proxy"] = this()
    row["+ metrics, usage"] = sse_fresh(env, streams, env.current, "[admin]\nport = 0\n")
    results["sse"][str(streams)] = row
    report_sse(streams, row)
    for workers in (1, 2):
        with claude_proxy(env, direct, workers=workers) as (cp, _):
            results["workers"][str(workers)] = wrk(
                env, f"http://127.0.0.1:{cp}/v1/messages", 64, secs
            )
    report_workers(results["workers"])
    if env.baseline:
        results["comparison"] = [c.as_dict() for c in table]
        print(
            f"\nthis code against the baseline, A/B/A ({env.rounds + 1} runs of this code, "
            f"{env.rounds} of the baseline per row; CPU from /proc):\n"
            + markdown_table(table, env.current.rev, env.baseline.rev),
            flush=True,
        )
    return results


def sse_fresh(env: Env, streams: int, build: Build, extra: str = "") -> dict[str, float]:
    """One SSE run through a new process of ``build``, so that each run's RSS starts alike."""
    with claude_proxy(env, f"http://127.0.0.1:{env.sse}", build=build, extra=extra) as (cp, pid):
        return sse_run(env, cp, streams, pid)


def features(env: Env) -> dict[str, Any]:
    """What each ``FEATURES`` variant costs against the plain config, under the same load.

    The plain config and every variant run side by side in processes of their own (only the
    one under load uses the relay's core). In each round, every variant's run sits between two
    runs of the plain config and is compared with their mean, so that a drift does not pass for
    a cost. The relay's CPU time per request is the steadier figure.
    """
    conns = 16 if env.smoke else 64
    upstream = f"http://127.0.0.1:{env.up}"
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(claude_proxy(env, upstream))
        variants = {
            name: stack.enter_context(claude_proxy(env, upstream, extra=toml))
            for name, toml in FEATURES
        }
        plain_runs: list[dict[str, Any]] = []
        costs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(1 if env.smoke else 3):
            before = measure(env, *plain, conns)
            plain_runs.append(before)
            for name, proc in variants.items():
                result = measure(env, *proc, conns)
                after = measure(env, *plain, conns)
                plain_runs.append(after)
                # a variant that answers errors measures its error path, not the feature
                costs[name].append(
                    feature_cost(result, before, after) | {"errors": result["errors"]}
                )
                before = after
    base = mean_run(plain_runs)
    rps = [r["rps"] for r in plain_runs]
    print(
        f"{f'feature cost c={conns}: plain config':<34} {base['rps']:>9.0f} req/s  CPU"
        f" {base['cpu_us']:5.1f} us/request  (its runs {min(rps):.0f}-{max(rps):.0f} req/s)",
        flush=True,
    )
    rows: dict[str, Any] = {"plain": base | {"each": plain_runs}}
    for name, each in costs.items():
        row = mean_run(each)
        print(
            f"{'  + ' + name:<34} {row['rps']:>9.0f} req/s  CPU {row['cpu_us']:5.1f} us/request"
            f"  {row['cpu_us_added']:+.1f} us CPU per request, {row['rps_change']:+.1%} req/s"
            "  (by round " + ", ".join(f"{c['cpu_us_added']:+.1f}" for c in each) + " us)",
            flush=True,
        )
        rows[name] = row | {"each": each}
        if any(c["errors"] for c in each):
            print(
                f"FEATURES row {name!r}: non-2xx answers: its cost is not the feature's",
                file=sys.stderr,
            )
    return rows


def routing(env: Env) -> dict[str, Any]:
    """What routing by model costs once the body is complete, in this process (no servers):
    the model from the first 64 KiB read or from the whole body, then the router's plan, for
    the routed feature row's upstreams. Only this code is measured, never the baseline."""
    n = 2000 if env.smoke else 20000
    rows = measure_routing(SMALL_BODY, n)
    print(f"routing by model, in-process (best of {rows['repeat']} x {n} requests):", flush=True)
    for key in ("claude_code_100kb", "sdk_100kb", "leading_1kb"):
        r = rows[key]
        verdict = ""
        if key == "claude_code_100kb":
            verdict = f"  budget {BUDGET_US:.0f} µs: {'ok' if rows['within_budget'] else 'OVER'}"
        print(
            f"{'  ' + r['label']:<34} {r['us']:>9.2f} us/request  {r['bytes'] / 1024:5.1f} KB"
            f" in {len(r['chunks'])} read(s), model by {r['read_by']}"
            f" ({r['model']!r} -> {', '.join(r['serving'])}){verdict}",
            flush=True,
        )
    return rows


def usage_reading(env: Env) -> dict[str, dict[str, float]]:
    """What reading token usage from replies costs, with metrics on.

    Measured in one metrics process against the same reply served as text/plain, which the
    usage reader leaves alone: unread, read, unread again in each round, so that the second
    unread run shows the noise and, averaged with the first, cancels a drift.
    """
    conns = 16 if env.smoke else 64
    upstream = f"http://127.0.0.1:{env.up}"
    admin = free_port()
    cases = {"unread": UNREAD_PATH, "read": "/v1/messages", "unread_again": UNREAD_PATH}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    with claude_proxy(env, upstream, extra=f"[admin]\nport = {admin}\n") as (port, pid):
        for _ in range(1 if env.smoke else 3):
            for name, path in cases.items():
                runs[name].append(measure(env, port, pid, conns, path))
        tokens = tokens_counted(admin)
    rows = {name: mean_run(r) for name, r in runs.items()}

    def differences(a: str, b: str) -> list[float]:
        """CPU per request of ``a`` minus ``b``, round by round (same process)."""
        return [x["cpu_us"] - y["cpu_us"] for x, y in zip(runs[a], runs[b], strict=True)]

    # A, B, A again in each round: B against the mean of the two A's cancels a steady drift
    noise_pairs = differences("unread_again", "unread")
    usage_pairs = [
        d - n / 2 for d, n in zip(differences("read", "unread"), noise_pairs, strict=True)
    ]
    added = sum(usage_pairs) / len(usage_pairs)
    print(
        f"{f'usage reading c={conns} (metrics on)':<34} {rows['read']['rps']:>9.0f} req/s  CPU"
        f" {rows['read']['cpu_us']:5.1f} us/request  {added:+.1f} us CPU per request; by round "
        + ", ".join(f"{d:+.1f}" for d in usage_pairs)
        + " us; the unread case measured twice: "
        + ", ".join(f"{d:+.1f}" for d in noise_pairs),
        flush=True,
    )
    # the A/B means nothing unless the reader did read: the bench reply has 46 tokens
    print(f"{'  (tokens counted by usage reading)':<34} {tokens:>9.0f}", flush=True)
    if not tokens:
        print("usage reading counted no tokens: the usage row measured nothing", file=sys.stderr)
    rows["read"] |= {
        "cpu_us_added": added,
        "cpu_us_min": min(usage_pairs),
        "cpu_us_max": max(usage_pairs),
        "tokens_counted": tokens,
    }
    rows["unread_again"] |= {"cpu_us_min": min(noise_pairs), "cpu_us_max": max(noise_pairs)}
    return rows


def tokens_counted(admin_port: int) -> float:
    """The sum of claude_proxy_tokens_total on a proxy's /metrics."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("claude_proxy_tokens_total{")
    )


def large(env: Env, targets: dict[str, int], method: str, path: str, body: str) -> dict[str, Any]:
    secs = 1.0 if env.smoke else 4.0
    row = {}
    for name, port in targets.items():
        r = wrk(env, f"http://127.0.0.1:{port}{path}", 1, secs, method=method, body=body)
        r["MB_s"] = r["rps"] * LARGE / 1e6
        row[name] = r
    report_row(f"10 MB {'upload' if method == 'POST' else 'download'}", row, key="MB_s")
    return row


def nginx_worker_pid(env: Env) -> int | None:
    try:
        master = int((env.work / "proxy.pid").read_text())
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return int(children[0]) if children else master
    except (OSError, ValueError):
        return None


def report_row(label: str, row: dict[str, dict[str, float]], key: str = "rps") -> None:
    d, n, c = row["direct"], row["nginx"], row["claude-proxy"]
    ratio = c[key] / n[key] if n[key] else float("nan")
    if key == "rps":
        added = c["p50_ms"] - d["p50_ms"]
        print(
            f"{label:<34} {c[key]:>9.0f} req/s  nginx {n[key]:>9.0f}  direct {d[key]:>9.0f}"
            f"  x nginx {ratio:4.2f}  p50 +{added:.3f} ms (nginx +{n['p50_ms'] - d['p50_ms']:.3f})"
            f"  p99 {c['p99_ms']:.2f}/{n['p99_ms']:.2f} ms"
            + (f"  CPU {c['cpu_us']:.1f} us/request" if "cpu_us" in c else "")
            + (
                f"  | baseline {b['rps']:>9.0f} req/s  CPU {b['cpu_us']:.1f} us/request"
                if (b := row.get("baseline"))
                else ""
            ),
            flush=True,
        )
    else:
        print(
            f"{label:<34} {c[key]:>9.0f} MB/s   nginx {n[key]:>9.0f}  direct {d[key]:>9.0f}"
            f"  x nginx {ratio:4.2f}",
            flush=True,
        )


def report_sse(streams: int, row: dict[str, dict[str, float]]) -> None:
    d = row["direct"]
    for name in ("nginx", "claude-proxy", "baseline", "+ metrics, usage"):
        if name not in row:
            continue
        r = row[name]
        print(
            f"SSE {streams} streams, {name:<16} added p50 {r['p50_ms'] - d['p50_ms']:6.2f} ms"
            f"  p99 {r['p99_ms'] - d['p99_ms']:6.2f} ms  max {r['max_ms']:7.1f} ms"
            f"  completed {r['completed']:.0f}/{streams}"
            f"  RSS/stream {r.get('rss_per_stream_kb', float('nan')):5.1f} KB"
            f"  CPU/event {r.get('cpu_us_per_event', float('nan')):5.1f} us",
            flush=True,
        )
    print(
        f"SSE {streams} streams, direct           p50 {d['p50_ms']:6.2f} ms  p99 {d['p99_ms']:6.2f}"
        f" ms  events {d['events']:.0f}",
        flush=True,
    )


def report_workers(rows: dict[str, dict[str, float]]) -> None:
    one, two = rows["1"]["rps"], rows["2"]["rps"]
    print(
        f"workers (c=64, unpinned)           1: {one:.0f} req/s   2: {two:.0f} req/s"
        f"   x{two / one if one else float('nan'):.2f}",
        flush=True,
    )


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return {
        "cpu": model,
        "cores": cores(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx_v,
        "pinning": f"relay on core {RELAY_CORE}, load+upstream on {LOAD_CORES}"
        if pin("0")
        else "none",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a short run: it must finish")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the claude_proxy of REF (a commit such as origin/main~3, checked out for"
        " the run, or the path of a checkout) and compare it row by row with this code",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="baseline runs per compared row, each between two runs of this code (default 1:"
        " A/B/A)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds: expected 1 or more")
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench needs {tool}: apt-get install nginx-light wrk", file=sys.stderr)
            return 2
    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['kernel']}, "
        f"Python {info['python']}, {info['nginx']}; pinning: {info['pinning']}",
        flush=True,
    )
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="claude-proxy-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        env = Env(Path(tmp), args.smoke, rounds=args.rounds)
        try:
            if args.baseline:
                env.baseline = stack.enter_context(baseline_build(args.baseline, env.work))
            # a typo in a feature row, or a config this code refuses, stops the run before any load
            for name, toml in FEATURES:
                try:
                    text = config_text(
                        base_config("http://127.0.0.1:1", 1, 1),
                        toml,
                        work=tmp,
                        upstream="http://127.0.0.1:1",
                        redis="redis://127.0.0.1:1/0",
                        otlp="http://127.0.0.1:1",
                    )
                    parse_config(tomllib.loads(text))
                except (ValueError, ConfigError) as exc:
                    raise ValueError(f"FEATURES row {name!r}: {exc}") from None
            builds = [env.current, *filter(None, [env.baseline])]
            for build in builds:
                build.check()
                print(f"{build.name}: {build.rev} ({build.root})", flush=True)
        except (RuntimeError, ValueError) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        try:
            start_servers(env)
            results = run(env)
        finally:
            env.stop_all()
    results["builds"] = {b.name: b.rev for b in builds}
    results["machine"] = info
    results["seconds"] = round(time.monotonic() - started, 1)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / time.strftime("bench-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(results, indent=2))
    print(f"done in {results['seconds']} s; results in {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
