"""``make bench``: claude-proxy beside nginx and the upstream itself, measured in one run.

Everything runs on loopback. The upstream is nginx serving fixed bodies (plain and TLS) and a
light SSE server; the same load goes to the upstream directly, through nginx configured for
streaming, and through claude-proxy. With two or more cores, the relay under test (nginx or
claude-proxy) is pinned to core 0 and the load generator and upstream to the other cores.

Prints one table (ratios first) and writes ``bench/results/bench-<time>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@dataclass
class Env:
    work: Path
    smoke: bool
    up: int = field(default_factory=free_port)
    up_tls: int = field(default_factory=free_port)
    sse: int = field(default_factory=free_port)
    ngx: int = field(default_factory=free_port)
    ngx_tls: int = field(default_factory=free_port)
    ngx_sse: int = field(default_factory=free_port)
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
            up=env.up, up_tls=env.up_tls, work=env.work, reply=SMALL_REPLY, unread=UNREAD_PATH
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
    for port in (env.up, env.up_tls, env.ngx, env.ngx_tls, env.sse, env.ngx_sse):
        wait_port(port)


@contextlib.contextmanager
def claude_proxy(
    env: Env,
    upstream: str,
    workers: int = 1,
    *,
    metrics: bool = False,
    access_log: bool = False,
    admin_port: int = 0,
) -> Iterator[tuple[int, int]]:
    """A claude-proxy process in front of ``upstream``; yields (port, pid).

    ``metrics``: with the admin listener (metrics and usage reading) on ``admin_port``;
    ``access_log``: with an access log file.
    """
    port = free_port()
    conf = env.work / f"cp-{port}.toml"
    logging = (
        f'[logging]\nlevel = "info"\nlog_path = "{env.work}/logs"\n'
        if access_log
        else '[logging]\nlevel = "warn"\n'
    ) + (f"[admin]\nport = {admin_port}\n" if metrics else "")
    conf.write_text(
        f'upstream_url = "{upstream}"\nport = {port}\nworkers = {workers}\n'
        f'client_api_key = "{KEY}"\n[upstream_auth]\ntype = "api_key"\n'
        f'api_key = "{UPSTREAM_KEY}"\n{logging}'
    )
    conf.chmod(0o600)
    cmd = [PY, "-m", "claude_proxy", "-c", str(conf)]
    if workers == 1:
        cmd = [*pin(RELAY_CORE), *cmd]
    environ = dict(os.environ, SSL_CERT_FILE=str(env.work / "ca.pem"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


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
    while client.poll() is None:
        if pid:
            peak = max(peak, rss_kb(pid))
        time.sleep(0.25)
    assert client.stdout is not None
    result = json.loads(client.stdout.read())
    if pid:
        result["rss_base_kb"] = base
        result["rss_peak_kb"] = peak
        result["rss_per_stream_kb"] = (peak - base) / streams
    return result


def run(env: Env) -> dict[str, Any]:
    smoke = env.smoke
    secs = 1.0 if smoke else 4.0
    results: dict[str, Any] = {"small": {}, "small_tls": {}, "large": {}, "sse": {}, "workers": {}}
    direct = f"http://127.0.0.1:{env.up}"
    with claude_proxy(env, direct) as (cp, cp_pid):
        targets = {"direct": env.up, "nginx": env.ngx, "claude-proxy": cp}
        for conns in [1, 16] if smoke else [1, 16, 64, 256]:
            row = {
                name: wrk(env, f"http://127.0.0.1:{port}/v1/messages", conns, secs)
                for name, port in targets.items()
            }
            results["small"][str(conns)] = row
            report_row(f"small POST c={conns}", row)
        results["large"]["download"] = large(env, targets, "GET", "/large", "none")
        results["memory_after_load_kb"] = rss_kb(cp_pid)
    results["observed"] = observe(env)
    with claude_proxy(env, f"https://127.0.0.1:{env.up_tls}") as (cp, _):
        targets = {"direct": env.up_tls, "nginx": env.ngx_tls, "claude-proxy": cp}
        row = {}
        for name, port in targets.items():
            scheme = "https" if name == "direct" else "http"
            row[name] = wrk(env, f"{scheme}://127.0.0.1:{port}/v1/messages", 64, secs)
        results["small_tls"]["64"] = row
        report_row("small POST, TLS upstream, c=64", row)
    streams = 100 if smoke else 2000
    with claude_proxy(env, f"http://127.0.0.1:{env.sse}") as (cp, cp_pid):
        # nginx cannot consume a request body without a module; the Python upstream reads it
        targets = {"direct": env.sse, "nginx": env.ngx_sse, "claude-proxy": cp}
        results["large"]["upload"] = large(env, targets, "POST", "/upload", "large")
        results["memory_after_upload_kb"] = rss_kb(cp_pid)
        row = {
            "direct": sse_run(env, env.sse, streams, None),
            "nginx": sse_run(env, env.ngx_sse, streams, nginx_worker_pid(env)),
            "claude-proxy": sse_run(env, cp, streams, cp_pid),
        }
    with claude_proxy(env, f"http://127.0.0.1:{env.sse}", metrics=True) as (cp, cp_pid):
        row["+ metrics, usage"] = sse_run(env, cp, streams, cp_pid)
    results["sse"][str(streams)] = row
    report_sse(streams, row)
    for workers in (1, 2):
        with claude_proxy(env, direct, workers=workers) as (cp, _):
            results["workers"][str(workers)] = wrk(
                env, f"http://127.0.0.1:{cp}/v1/messages", 64, secs
            )
    report_workers(results["workers"])
    return results


def observe(env: Env) -> dict[str, dict[str, float]]:
    """What metrics, usage reading and an access log cost, each on top of the one before.

    Three processes run side by side (only the one under load uses the relay's core) and are
    measured in alternating rounds, so that drift between runs does not pass for a cost. Usage
    reading is measured against the same reply served as text/plain, which is not read, in the
    same process: unread, read, unread again in each round, so that the second unread run shows
    the noise and, averaged with the first, cancels a drift. The relay's CPU time per request is
    the steadier figure.
    """
    conns = 16 if env.smoke else 64
    secs = 1.0 if env.smoke else 4.0
    upstream = f"http://127.0.0.1:{env.up}"
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(claude_proxy(env, upstream))
        admin = free_port()
        metrics = stack.enter_context(claude_proxy(env, upstream, metrics=True, admin_port=admin))
        logged = stack.enter_context(claude_proxy(env, upstream, metrics=True, access_log=True))
        cases = {
            "claude-proxy": (plain, "/v1/messages"),
            "metrics": (metrics, UNREAD_PATH),
            "usage": (metrics, "/v1/messages"),
            "metrics_again": (metrics, UNREAD_PATH),  # an A/A pair: the noise of the A/B
            "access_log": (logged, "/v1/messages"),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(1 if env.smoke else 3):
            for name, ((port, pid), path) in cases.items():
                before = cpu_seconds(pid)
                rps = wrk(env, f"http://127.0.0.1:{port}{path}", conns, secs)["rps"]
                used = cpu_seconds(pid) - before
                runs[name].append((rps, used / (rps * secs) * 1e6 if rps else float("nan")))
        tokens = tokens_counted(admin)
    rows = {
        name: {
            "rps": sum(rps for rps, _ in r) / len(r),
            "cpu_us": sum(cpu for _, cpu in r) / len(r),
            "runs": len(r),
        }
        for name, r in runs.items()
    }
    labels = {
        "claude-proxy": f"observability c={conns}: claude-proxy",
        "metrics": "+ metrics (reply not read)",
        "usage": "+ usage reading",
        "access_log": "+ access log file",
    }
    # the unread case is the mean of its two runs in each round
    unread = {k: (rows["metrics"][k] + rows["metrics_again"][k]) / 2 for k in ("rps", "cpu_us")}
    rows["metrics"] |= unread
    before: dict[str, float] = {}
    for name, label in labels.items():
        row = rows[name]
        line = f"{label:<34} {row['rps']:>9.0f} req/s  CPU {row['cpu_us']:5.1f} us/request"
        if before:
            line += (
                f"  ({row['rps'] / before['rps'] - 1:+.1%} throughput,"
                f" {row['cpu_us'] - before['cpu_us']:+.1f} us CPU per request)"
            )
        print(line, flush=True)
        before = row

    def differences(a: str, b: str) -> list[float]:
        """CPU per request of ``a`` minus ``b``, round by round (same process)."""
        return [x[1] - y[1] for x, y in zip(runs[a], runs[b], strict=True)]

    # A, B, A again in each round: B against the mean of the two A's cancels a steady drift
    noise_pairs = differences("metrics_again", "metrics")
    usage_pairs = [
        d - n / 2 for d, n in zip(differences("usage", "metrics"), noise_pairs, strict=True)
    ]
    print(
        f"{'  usage reading, round by round':<34} "
        + ", ".join(f"{d:+.1f}" for d in usage_pairs)
        + " us CPU per request; the unread case measured twice: "
        + ", ".join(f"{d:+.1f}" for d in noise_pairs),
        flush=True,
    )
    rows["usage"]["cpu_us_added"] = sum(usage_pairs) / len(usage_pairs)
    rows["usage"]["cpu_us_min"] = min(usage_pairs)
    rows["usage"]["cpu_us_max"] = max(usage_pairs)
    rows["metrics_again"]["cpu_us_min"] = min(noise_pairs)
    rows["metrics_again"]["cpu_us_max"] = max(noise_pairs)
    # the A/B means nothing unless the reader did read: the bench reply has 46 tokens
    print(f"{'  (tokens counted by usage reading)':<34} {tokens:>9.0f}", flush=True)
    if not tokens:
        print("usage reading counted no tokens: the usage row measured nothing", file=sys.stderr)
    rows["usage"]["tokens_counted"] = tokens
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
            f"  p99 {c['p99_ms']:.2f}/{n['p99_ms']:.2f} ms",
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
    for name in ("nginx", "claude-proxy", "+ metrics, usage"):
        r = row[name]
        print(
            f"SSE {streams} streams, {name:<16} added p50 {r['p50_ms'] - d['p50_ms']:6.2f} ms"
            f"  p99 {r['p99_ms'] - d['p99_ms']:6.2f} ms  max {r['max_ms']:7.1f} ms"
            f"  completed {r['completed']}/{streams}"
            f"  RSS/stream {r.get('rss_per_stream_kb', float('nan')):5.1f} KB",
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
    args = parser.parse_args(argv)
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
    with tempfile.TemporaryDirectory(prefix="claude-proxy-bench-") as tmp:
        env = Env(Path(tmp), args.smoke)
        try:
            start_servers(env)
            results = run(env)
        finally:
            env.stop_all()
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
