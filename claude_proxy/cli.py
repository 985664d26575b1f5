"""Command line: ``claude-proxy [serve]``, ``check``, ``demo``, ``mock`` and ``hash-key``.

Flags default to "not given" and override the file and environment. Signal handlers live here
and nowhere else: SIGTERM/SIGINT drain and exit, SIGHUP reloads client keys and log level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__, supervisor
from .client_auth import hash_key
from .config import (
    Config,
    Loaded,
    UpstreamAuthConfig,
    load_config,
    walk_secrets,
)
from .credentials import TokenAuth, UpstreamAuth, describe_credential_error, make_auth
from .errors import ConfigError
from .logs import configure_logging, register_secret, set_level
from .server import ProxyServer

logger = logging.getLogger("claude_proxy")

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_STARTUP_FAILURE = 3
EXIT_CHECK_FAILED = 4

# flag dest -> dotted config key
OVERRIDES = {
    "bind_address": "bind_address",
    "port": "port",
    "upstream_url": "upstream_url",
    "client_api_key": "client_api_key",
    "upstream_auth_type": "upstream_auth.type",
    "upstream_api_key": "upstream_auth.api_key",
    "log_path": "logging.log_path",
    "log_rotation": "logging.rotation",
    "log_level": "logging.level",
    "log_prefix": "logging.log_prefix",
    "workers": "workers",
}
DEMO_CLIENT_KEY = "demo-key"
DEMO_UPSTREAM_KEY = "mock-upstream-key"


def _config_flags(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("-c", "--config", default=s, help="config file (else discovered)")
    parser.add_argument("-v", "--verbose", action="store_true", default=s, help="debug logging")
    parser.add_argument("--bind-address", default=s, help="listen address (default 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, default=s, help="listen port (default 8080)")
    parser.add_argument("--upstream-url", default=s, help="upstream base URL")
    parser.add_argument("--client-api-key", default=s, help="key clients must present")
    parser.add_argument("--upstream-auth-type", default=s, help="api_key, azure_ad, azure_cli, ...")
    parser.add_argument("--upstream-api-key", default=s, help="upstream API key (type api_key)")
    parser.add_argument("--log-path", default=s, help="log directory (default: stdout)")
    parser.add_argument("--log-rotation", default=s, help="hourly, daily or never")
    parser.add_argument("--log-level", default=s, help="trace, debug, info, warn, error")
    parser.add_argument("--log-prefix", default=s, help="log file name prefix")
    parser.add_argument("--workers", type=int, default=s, help="worker processes (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="claude-proxy",
        description="Let Claude and OpenAI clients use Microsoft AI Foundry through one endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"claude-proxy {__version__}")
    _config_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the proxy (the default)")
    _config_flags(serve)
    check = sub.add_parser("check", help="validate the config and obtain a credential")
    _config_flags(check)
    check.add_argument(
        "--probe",
        metavar="MODEL",
        default=argparse.SUPPRESS,
        help="also send a 1-token request for MODEL (a deployment name)",
    )
    check.add_argument(
        "--probe-path",
        default=argparse.SUPPRESS,
        help="path for --probe (default /anthropic/v1/messages on Azure hosts)",
    )
    demo = sub.add_parser("demo", help="run the proxy in front of the bundled Foundry mock")
    demo.add_argument("-p", "--port", type=int, default=8080)
    demo.add_argument("-v", "--verbose", action="store_true")
    sub.add_parser(
        "mock", help="run the bundled Foundry mock (see 'claude-proxy mock -h')", add_help=False
    )
    sub.add_parser("hash-key", help="read a client key on stdin, print its key_sha256")
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    values = {key: getattr(args, dest) for dest, key in OVERRIDES.items() if hasattr(args, dest)}
    if getattr(args, "verbose", False):
        values["logging.level"] = "debug"
    return values


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mock"]:
        from .mock import main as mock_main

        return mock_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "hash-key":
        return hash_key_command(sys.stdin, sys.stdout)
    if args.command == "demo":
        return run(demo(args.port, args.verbose))
    try:
        loaded = load_config(getattr(args, "config", None), overrides_from(args))
    except ConfigError as exc:
        print(f"claude-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.command == "check":
        return run_check(args, loaded)
    worker = supervisor.worker_sockets()
    log_config = loaded.config.logging
    if worker is not None and log_config.log_path:
        # one file per worker: rotation by several processes of one file would collide
        log_config = dataclasses.replace(
            log_config, log_prefix=f"{log_config.log_prefix}-{worker[1]}"
        )
    configure_logging(log_config, secrets=walk_secrets(loaded.config))
    if worker is None:
        warn_if_readable(loaded.path)
        if loaded.config.workers > 1:
            if not supervisor.supported():
                logger.error("workers > 1 needs Linux or macOS; run one process per port instead")
                return EXIT_CONFIG_ERROR
            with supervisor.multiprocess_dir():
                return run(supervisor.Supervisor(loaded.config, argv).run())

    def reload() -> Loaded:
        return load_config(getattr(args, "config", None), overrides_from(args))

    sockets = [socket.socket(fileno=fd) for fd in worker[0]] if worker is not None else []
    return run(serve(loaded, reload, sockets))


def hash_key_command(stdin: TextIO, stdout: TextIO) -> int:
    """``claude-proxy hash-key``: the ``key_sha256`` of the key on stdin (one line; the line
    break is not part of the key), so the config need not hold the key itself."""
    key = stdin.readline().rstrip("\r\n")
    if not key:
        print("claude-proxy hash-key: no key on standard input", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(hash_key(key), file=stdout)
    return EXIT_OK


def run_check(args: argparse.Namespace, loaded: Loaded) -> int:
    """``claude-proxy check``: it prints its own findings, so log lines (which would only
    repeat them) are silenced unless -v; the loggers are restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("claude_proxy", "azure")]
    saved = [lg.level for lg in loggers]
    quiet = logging.DEBUG if getattr(args, "verbose", False) else logging.CRITICAL
    for lg in loggers:
        lg.setLevel(quiet)
    try:
        # The standard loop: check may spawn az, whose pipes uvloop reports after closing.
        probe = getattr(args, "probe", None)
        return run(check(loaded, probe, getattr(args, "probe_path", None)), uvloop=False)
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def run(coro: Coroutine[Any, Any, int], *, uvloop: bool = True) -> int:
    """Run ``coro`` on uvloop where it exists (not on Windows), else the standard loop.

    ``CLAUDE_PROXY_LOOP=asyncio`` forces the standard loop.
    """
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if uvloop and os.environ.get("CLAUDE_PROXY_LOOP", "auto") != "asyncio":
        try:
            import uvloop as _uvloop

            factory = _uvloop.new_event_loop
        except ImportError:
            factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def warn_if_readable(path: Path | None) -> None:
    """Warn when a config file that may hold secrets is readable by other users."""
    if path is None or os.name != "posix":
        return
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            logger.warning(
                "config file %s is readable by other users (mode %o); if it holds secrets, "
                "run: chmod 600 %s",
                path,
                stat.S_IMODE(mode),
                path,
            )


def _install_signals(stop: asyncio.Event, on_hup: Callable[[], None]) -> None:
    """SIGTERM/SIGINT set ``stop``; SIGHUP calls ``on_hup``.

    They stay installed until the process exits: a second SIGTERM during the drain must not
    fall back to the default action and kill the process mid-drain.
    """
    loop = asyncio.get_running_loop()
    handlers: list[tuple[int, Callable[[], None]]] = [
        (signal.SIGTERM, stop.set),
        (signal.SIGINT, stop.set),
    ]
    if hasattr(signal, "SIGHUP"):
        handlers.append((signal.SIGHUP, on_hup))
    for sig, handler in handlers:
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError):  # Windows' standard loop
            signal.signal(sig, lambda *_, h=handler: loop.call_soon_threadsafe(h))


def banner(loaded: Loaded, server: ProxyServer, auth: UpstreamAuth) -> str:
    config = loaded.config
    keys = config.client_keys()
    if keys:
        who = f"{len(keys)} client key(s) [{', '.join(k.name for k in keys)}]"
        who += ", passthrough " + ("on" if config.passthrough_unauthenticated else "off")
    else:
        who = "no client keys (every request gets the upstream credential)"
    lines = [
        f"claude-proxy {__version__} listening on http://{config.bind_address}:{server.port}",
        f"  upstream {config.upstream_url}, auth {auth.description}, {who}",
        f"  config {loaded.path or '(none: environment and flags)'}",
    ]
    if server.tls_port:
        lines.insert(1, f"  and https://{config.bind_address}:{server.tls_port}")
    return "\n".join(lines)


async def serve(
    loaded: Loaded, reload: Callable[[], Loaded], sockets: Sequence[socket.socket] = ()
) -> int:
    """Run the proxy until SIGTERM/SIGINT; SIGHUP reloads keys, log level and TLS certificate.

    ``sockets``: already listening sockets (a worker under the supervisor, which also serves
    the admin listener).
    """
    config = loaded.config
    auth = make_auth(config.upstream_auth)
    server = ProxyServer(config, auth, sockets=sockets, serve_admin=not sockets)
    try:
        await server.start()
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", config.bind_address, config.port, exc.strerror)
        await auth.close()
        return EXIT_STARTUP_FAILURE
    # The banner shows at any level: it is the one line every operator needs.
    logger.log(max(logging.INFO, logger.getEffectiveLevel()), "%s", banner(loaded, server, auth))
    if server.admin is not None:
        logger.info(
            "admin listener on http://%s:%d (/healthz, /readyz, /metrics)",
            config.admin.bind_address,
            server.admin.port,
        )
    if config.client_keys() == () and config.bind_address not in ("127.0.0.1", "::1", "localhost"):
        logger.warning(
            "no client keys are configured and the proxy listens on %s: anyone who "
            "reaches it spends your upstream quota",
            config.bind_address,
        )

    def on_hup() -> None:
        try:
            new = reload()
        except ConfigError as exc:
            logger.error("reload rejected, keeping the running config: %s", exc)
            return
        for secret in walk_secrets(new.config):
            register_secret(secret)
        set_level(new.config.logging.level)  # first: the server reads it to enable access lines
        server.reload(new.config)
        logger.info(
            "reloaded %s: %d client key(s), log level %s",
            new.path or "config",
            len(new.config.client_keys()),
            new.config.logging.level,
        )

    stop = asyncio.Event()
    _install_signals(stop, on_hup)
    await stop.wait()
    logger.info("shutting down: draining for up to %gs", config.shutdown_timeout)
    drained = await server.shutdown()
    logger.info("stopped%s", "" if drained else " (some connections were cut at the deadline)")
    return EXIT_OK


async def check(loaded: Loaded, probe: str | None, probe_path: str | None) -> int:
    """Validate, obtain a credential, optionally probe; print what a person needs to know."""
    config = loaded.config
    out = print
    out(f"config file:  {loaded.path or '(none: environment and flags)'}")
    out(f"upstream:     {config.upstream_url}")
    out(f"auth type:    {config.upstream_auth.type}")
    keys = config.client_keys()
    out(f"client keys:  {len(keys)} ({', '.join(k.name for k in keys) or 'none'})")
    auth = make_auth(config.upstream_auth)
    ok = True
    if isinstance(auth, TokenAuth):
        out(f"scope:        {auth.scope}")
        started = time.monotonic()
        await auth.start()
        await auth.wait_ready()
        status = auth.status()
        if auth.ready():
            expires = status["expires_on"]
            when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expires))
            out(
                f"token:        obtained in {time.monotonic() - started:.1f}s, "
                f"expires in {status['expires_in']}s ({when})"
            )
            out(f"audience:     {status.get('audience') or '(not a JWT; cannot tell)'}")
        else:
            out(f"token:        FAILED: {status.get('error', 'unknown error')}")
            ok = False
    else:
        problem = _api_key_problem(config.upstream_auth)
        out(f"api key:      {problem or 'present'}")
        ok = problem is None
    if ok and probe:
        ok = await _probe(config, auth, probe, probe_path)
    await auth.close()
    out("result:       " + ("OK" if ok else "NOT USABLE"))
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def _api_key_problem(auth: UpstreamAuthConfig) -> str | None:
    key = auth.api_key or ""
    if not key:
        return "missing"
    if key != key.strip() or any(c.isspace() for c in key):
        return "contains white space (a copy-paste accident?)"
    if not key.isascii() or not key.isprintable():
        return "contains characters that cannot go in an HTTP header"
    return None


async def _probe(config: Config, auth: UpstreamAuth, model: str, path: str | None) -> bool:
    import json

    import aiohttp

    from .upstream import Origin

    origin = Origin(config.upstream_url)
    if path is None:
        path = "/anthropic/v1/messages" if origin.host.endswith("azure.com") else "/v1/messages"
    credential = await auth.credential_wait()
    headers = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
    if credential.kind == "bearer":
        headers["authorization"] = "Bearer " + credential.value.decode()
    else:
        headers["x-api-key"] = headers["api-key"] = credential.value.decode()
    body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
    url = config.upstream_url.rstrip("/") + path
    timeout = aiohttp.ClientTimeout(total=60, connect=config.connect_timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, data=json.dumps(body), headers=headers) as response,
        ):
            text = (await response.text())[:300]
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"probe:        FAILED: {describe_credential_error(exc)}")
        return False
    print(f"probe:        POST {path} -> {response.status} {' '.join(text.split())[:200]}")
    return response.status < 400


async def demo(port: int, verbose: bool) -> int:
    """The proxy in front of the bundled mock, with a curl line that works."""
    from .mock import MockFoundry, start_mock

    config = Config(
        upstream_url="http://127.0.0.1:0",
        upstream_auth=UpstreamAuthConfig(type="api_key", api_key=DEMO_UPSTREAM_KEY),
        port=port,
        client_api_key=DEMO_CLIENT_KEY,
    )
    configure_logging(config.logging, verbose=verbose)
    runner, mock_port = await start_mock(MockFoundry(api_key=DEMO_UPSTREAM_KEY))
    config = dataclasses.replace(config, upstream_url=f"http://127.0.0.1:{mock_port}")
    server = ProxyServer(config, make_auth(config.upstream_auth))
    try:
        await server.start()
    except OSError as exc:
        print(
            f"claude-proxy demo: cannot listen on port {port}: {exc.strerror}; "
            f"try: claude-proxy demo --port {_free_port()}",
            file=sys.stderr,
        )
        await runner.cleanup()
        return EXIT_STARTUP_FAILURE
    base = f"http://127.0.0.1:{server.port}"
    body = '{"model":"claude-sonnet-4-6","max_tokens":64,"stream":true,"messages":' + (
        '[{"role":"user","content":"Hello!"}]}'
    )
    print(DEMO_TEXT.format(base=base, key=DEMO_CLIENT_KEY, mock=mock_port, body=body), flush=True)
    stop = asyncio.Event()
    _install_signals(stop, lambda: None)
    try:
        await stop.wait()
    finally:
        await server.shutdown(2.0)
        await runner.cleanup()
    return EXIT_OK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DEMO_TEXT = """
claude-proxy demo: the proxy at {base} in front of a local Foundry mock (port {mock}).
Client key: {key}. Try (Anthropic, streamed):

  curl -N {base}/anthropic/v1/messages -H "x-api-key: {key}" -H "anthropic-version: 2023-06-01" \\
    -H "content-type: application/json" \\
    -d '{body}'

or OpenAI style (Responses API, as Codex uses it):

  curl {base}/openai/v1/responses -H "Authorization: Bearer {key}" \\
    -H "content-type: application/json" \\
    -d '{{"model":"gpt-5","input":"Hello!"}}'

Claude Code:
  ANTHROPIC_BASE_URL={base}/anthropic ANTHROPIC_AUTH_TOKEN={key} claude -p "Hello!"
Codex:
  CLAUDE_PROXY_KEY={key} codex exec --skip-git-repo-check -m gpt-5-codex \\
    -c model_provider=demo -c model_providers.demo.name=demo \\
    -c model_providers.demo.base_url={base}/openai/v1 -c model_providers.demo.wire_api=responses \\
    -c model_providers.demo.env_key=CLAUDE_PROXY_KEY "Hello!"
SDKs: base_url {base}/anthropic (anthropic) or {base}/openai/v1 (openai), api_key {key}.
Foundry serves only those two prefixes: a base URL without one gets 404, here as there.
Stop with Ctrl-C. For the real thing, copy config.example.toml to config.toml.
"""
