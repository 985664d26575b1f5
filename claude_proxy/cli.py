"""Command line: ``claude-proxy [serve]``, ``check``, ``env``, ``demo``, ``mock`` and ``hash-key``.

Flags default to "not given" and override the file and environment. Signal handlers live here
and nowhere else: SIGTERM/SIGINT drain and exit, SIGHUP reloads client keys and log level.
They are held from the first line of :func:`main`, so a signal during start-up is acted on once
the proxy runs instead of killing it; ``ready: listening on ...`` on stdout says that the
handlers exist and the listeners accept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__, checks, client_env, supervisor
from .client_auth import hash_key
from .config import (
    Config,
    Loaded,
    LoggingConfig,
    UpstreamAuthConfig,
    UpstreamConfig,
    keys_file_path,
    literal_secrets,
    load_config,
    reload_plan,
    walk_secrets,
)
from .credentials import TokenAuth, UpstreamAuth, describe_credential_error, make_auth
from .errors import ConfigError
from .logs import configure_logging, flush_handlers, register_secret, reopen_logs, set_level
from .server import ProxyServer
from .tls import CertificateError, server_tls_context

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
HELD_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1")
    if hasattr(signal, name)
)
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
    check.add_argument(
        "--json", action="store_true", help="print one JSON object: ok, problems, warnings"
    )
    env = sub.add_parser("env", help="print settings that point a client at this proxy")
    env.add_argument("target", choices=client_env.TARGETS, help="the client to set up")
    _config_flags(env)
    env.add_argument("--key", metavar="NAME", help="print the value of this configured key")
    env.add_argument("--url", help="the proxy's URL as clients reach it (e.g. a load balancer)")
    env.add_argument(
        "--write",
        action="store_true",
        help="merge into ~/.claude/settings.json, keeping a backup (claude-code targets only)",
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


class HeldSignals:
    """SIGTERM, SIGINT and SIGHUP noted, not acted on, until the event loop's handlers exist:
    their default action would kill a proxy that is still starting. :meth:`take` hands them
    over; :meth:`restore` puts back the handlers found (for callers of :func:`main` in-process).
    """

    def __init__(self) -> None:
        self.seen: list[int] = []
        self._saved: dict[int, Any] = {}

    def hold(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works only there; a caller on another thread owns signals
        for sig in HELD_SIGNALS:
            self._saved[sig] = signal.signal(sig, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.seen.append(signum)

    def take(self) -> list[int]:
        seen, self.seen = self.seen, []
        return seen

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
        self.seen.clear()


_held = HeldSignals()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mock"]:
        from .mock import main as mock_main

        return mock_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "hash-key":
        return hash_key_command(sys.stdin, sys.stdout)
    if args.command in ("check", "env"):
        return load_and_inspect(args)
    _held.hold()
    try:
        if args.command == "demo":
            return run(demo(args.port, args.verbose))
        return start(args, argv)
    finally:
        _held.restore()


def load_and_inspect(args: argparse.Namespace) -> int:
    """``check`` and ``env``: they load the config and report; they do not serve."""
    try:
        loaded = load_config(getattr(args, "config", None), overrides_from(args))
    except ConfigError as exc:
        if args.command == "check" and args.json:
            print(json.dumps(config_error_report(exc)))
        print(f"claude-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.command == "env":
        return run_env(args, loaded.config)
    return run_check(args, loaded)


def failed(code: int, message: str, *, logged: bool = True) -> int:
    """Say why the proxy cannot start (to the log, or stderr before logging is set up), tell
    the supervisor when this is its worker, and return the exit code."""
    if logged:
        logger.error("%s", message)
    else:
        print(f"claude-proxy: {message}", file=sys.stderr, flush=True)
    supervisor.report_start(f"error {message}")
    return code


def start(args: argparse.Namespace, argv: list[str]) -> int:
    """``serve``: load and check the config, set up logging, then run one proxy or workers."""
    try:
        loaded = load_config(getattr(args, "config", None), overrides_from(args))
        startup_check(loaded.config)
    except ConfigError as exc:
        return failed(EXIT_CONFIG_ERROR, f"config error: {exc}", logged=False)
    worker = supervisor.worker_sockets()
    log_config = loaded.config.logging
    if worker is not None and (log_config.log_path or log_config.access_log_path):
        # one file per worker: rotation by several processes of one file would collide
        log_config = dataclasses.replace(
            log_config, log_prefix=f"{log_config.log_prefix}-{worker[1]}"
        )
    try:
        configure_logging(log_config, secrets=walk_secrets(loaded.config))
    except OSError as exc:
        message = f"config error: {log_file_error(log_config, exc)}"
        return failed(EXIT_CONFIG_ERROR, message, logged=False)
    if worker is None:
        warn_if_readable(loaded.path)
        if loaded.config.workers > 1:
            if not supervisor.supported():
                logger.error("workers > 1 needs Linux or macOS; run one process per port instead")
                return EXIT_CONFIG_ERROR
            return run_supervisor(loaded.config, argv)

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


def run_supervisor(config: Config, argv: list[str]) -> int:
    async def supervise() -> int:
        sup = supervisor.Supervisor(config, argv, on_ready=announce)
        try:
            return await sup.run(_held.take())
        except supervisor.StartupError as exc:
            logger.error("%s", exc)
            return exc.exit_code or EXIT_STARTUP_FAILURE

    with supervisor.multiprocess_dir():
        return run(supervise())


def announce(line: str) -> None:
    """A lifecycle line (`ready: ...`, `draining: ...`) on stdout, after the log lines before it."""
    flush_handlers()
    print(line, flush=True)


def startup_check(config: Config) -> None:
    """What would fail only once serving: an unusable certificate or log directory.
    Raises :class:`ConfigError` naming the file and the reason."""
    if config.tls.mode == "manual":
        server_tls_context(config)
    for key, path in (
        ("logging.log_path", config.logging.log_path),
        ("logging.access_log_path", config.logging.access_log_path),
    ):
        problem = checks.log_path_problem(path)
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")


def log_file_error(config: LoggingConfig, exc: OSError) -> str:
    """A log file that could not be opened although the check before found no problem."""
    where = exc.filename or config.log_path
    return f"logging: cannot write {where}: {exc.strerror or exc}"


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
        probe_path = getattr(args, "probe_path", None)
        return run(check(loaded, probe, probe_path, as_json=args.json), uvloop=False)
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def run_env(args: argparse.Namespace, config: Config) -> int:
    """``claude-proxy env TARGET``: print (or ``--write``) a client's settings for this proxy."""
    target: client_env.Target = args.target
    key = client_env.PLACEHOLDER
    if args.key is not None:
        names = [k.name for k in config.client_keys()]
        found = [k for k in config.client_keys() if k.name == args.key]
        if not found:
            known = ", ".join(names) if names else "none (any key works: none is checked)"
            return _env_error(f"--key: no client key named {args.key!r}; configured: {known}")
        if found[0].key is None:
            return _env_error(
                f"--key: {args.key!r} is configured by its digest (key_sha256), so the proxy "
                "does not know the key; leave out --key and fill in the placeholder"
            )
        key = found[0].key
    if args.url is not None and not re.match(r"https?://[^/\s]+", args.url):
        return _env_error(f"--url: expected http(s)://host[:port][/prefix]; got {args.url!r}")
    try:
        base = client_env.base_url(config, args.url)
    except ValueError as exc:
        return _env_error(str(exc))
    if not args.write:
        print(client_env.render(target, config, base, key), end="")
        return EXIT_OK
    if target not in client_env.OVERRIDDEN:
        return _env_error(
            f"--write is offered for claude-code and claude-code-foundry only: {target}'s "
            "file would lose its comments and layout in a merge; paste the printed lines instead"
        )
    env = client_env.claude_code_env(
        config, base, key, foundry_mode=target == "claude-code-foundry"
    )
    try:
        written, backup, removed = write_claude_settings(
            Path.home() / ".claude" / "settings.json", env, client_env.OVERRIDDEN[target]
        )
    except (OSError, client_env.SettingsError) as exc:
        return _env_error(f"--write: {exc}")
    print(f"wrote {', '.join(env)} into {written}")
    if backup is not None:
        print(f"the previous version is in {backup}")
    if removed:
        print(f"removed {', '.join(removed)} (it would make Claude Code ignore these settings)")
    return EXIT_OK


def _env_error(message: str) -> int:
    print(f"claude-proxy env: {message}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


def write_claude_settings(
    path: Path, env: dict[str, str], remove: tuple[str, ...]
) -> tuple[Path, Path | None, list[str]]:
    """Merge ``env`` into the settings file at ``path`` and replace it atomically (mode 600:
    it holds a key), after copying the old one aside. Returns (path, backup, names removed)."""
    existing = path.read_text(encoding="utf-8") if path.exists() else None
    try:
        text, removed = client_env.merge_settings(existing, env, remove)
    except client_env.SettingsError as exc:
        raise client_env.SettingsError(f"{path} is {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    backup = None
    if existing is not None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"{path.name}.{stamp}.bak")
        n = 1
        while backup.exists():
            backup = path.with_name(f"{path.name}.{stamp}-{n}.bak")
            n += 1
        shutil.copy2(path, backup)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path, backup, removed


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or a Secret volume swaps its symlink."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


async def watch_keys_file(path: Path, interval: float, on_change: Callable[[], None]) -> None:
    """Call ``on_change`` (the SIGHUP reload) each time ``path`` changes; poll every
    ``interval`` seconds. A reload that fails is logged by ``on_change`` once per change."""
    seen = _file_signature(path)
    while True:
        await asyncio.sleep(interval)
        now = _file_signature(path)
        if now == seen:
            continue
        seen = now
        logger.info("client_api_keys_file %s changed: reloading", path)
        try:
            on_change()
        except Exception:  # the watcher must outlive one bad reload
            logger.exception("reloading after a change of %s failed", path)


@contextlib.asynccontextmanager
async def keys_file_watcher(config: Config, on_change: Callable[[], None]) -> AsyncIterator[None]:
    """While inside, a task owned here watches ``client_api_keys_file`` (when one is set)."""
    path = keys_file_path({"client_api_keys_file": config.client_api_keys_file})
    if path is None:
        yield
        return
    interval = config.client_api_keys_file_interval
    task = asyncio.get_running_loop().create_task(watch_keys_file(path, interval, on_change))

    def died(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            logger.error("the watcher of %s stopped: %r", path, t.exception())

    task.add_done_callback(died)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


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
    """Warn when a config file that writes secrets out literally is readable by other users.

    Secrets taken from the environment (``key = "${VAR}"``) are not in the file, so such a
    file may be world-readable (a ConfigMap, a file in a repository).
    """
    if path is None or os.name != "posix":
        return
    try:
        mode = path.stat().st_mode
        if not mode & (stat.S_IRGRP | stat.S_IROTH):
            return
        with path.open("rb") as fh:
            found = literal_secrets(tomllib.load(fh))
    except (OSError, tomllib.TOMLDecodeError):
        return
    if found:
        uid = os.getuid()
        logger.warning(
            "config file %s writes out secrets (%s) and is readable by other users (mode %o); "
            'take them from the environment instead (api_key = "${UPSTREAM_API_KEY}"), or '
            "let only the proxy's user read it: chown %d %s && chmod 600 %s "
            "(the container image runs as uid 10001)",
            path,
            ", ".join(found),
            stat.S_IMODE(mode),
            uid,
            path,
            path,
        )


def _install_signals(stop: asyncio.Event, on_hup: Callable[[], None]) -> None:
    """SIGTERM/SIGINT set ``stop``; SIGHUP calls ``on_hup``; then the signals that arrived
    while they were held (since :func:`main` began) are acted on.

    They stay installed until the process exits: a second SIGTERM during the drain must not
    fall back to the default action and kill the process mid-drain.
    """
    loop = asyncio.get_running_loop()
    actions: dict[int, Callable[[], None]] = {
        signal.SIGTERM: stop.set,
        signal.SIGINT: stop.set,
    }
    if hasattr(signal, "SIGHUP"):
        actions[signal.SIGHUP] = on_hup
    if hasattr(signal, "SIGUSR1"):
        actions[signal.SIGUSR1] = reopen_logs  # logrotate moved the files away
    for sig, handler in actions.items():
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError):  # Windows' standard loop
            signal.signal(sig, lambda *_, h=handler: loop.call_soon_threadsafe(h))
    for sig in dict.fromkeys(_held.take()):
        actions[sig]()


def banner(loaded: Loaded, server: ProxyServer) -> str:
    config = loaded.config
    keys = config.client_keys()
    if keys:
        who = f"{len(keys)} client key(s) [{', '.join(k.name for k in keys)}]"
        who += ", passthrough " + ("on" if config.passthrough_unauthenticated else "off")
    else:
        who = "no client keys (every request gets the upstream credential)"
    lines = [
        f"claude-proxy {__version__} listening on http://{config.bind_address}:{server.port}",
        *_upstream_lines(config, server, who),
        f"  config {loaded.path or '(none: environment and flags)'}",
    ]
    if server.tls_port:
        lines.insert(1, f"  and https://{config.bind_address}:{server.tls_port}")
    return "\n".join(lines)


def _upstream_lines(config: Config, server: ProxyServer, who: str) -> list[str]:
    if not config.upstreams:
        return [f"  upstream {config.upstream_url}, auth {server.auth.description}, {who}"]
    lines = []
    for up in config.targets():
        assert up.auth is not None
        auth = server.auths[up.auth]
        lines.append(
            f"  upstream {up.name} {up.url} (priority {up.priority}, weight {up.weight}), "
            f"auth {auth.description}"
        )
    if config.routes:
        lines.append(f"  {len(config.routes)} route(s) by model")
    on = ", ".join(str(s) for s in config.failover.on_status)
    lines.append(f"  failover on {on} and connect failures, {who}")
    return lines


def listening(config: Config, server: ProxyServer) -> str:
    urls = [f"http://{config.bind_address}:{server.port}"]
    if server.tls_port:
        urls.append(f"https://{config.bind_address}:{server.tls_port}")
    if server.admin is not None:
        urls.append(f"admin on http://{config.admin.bind_address}:{server.admin.port}")
    return "listening on " + ", ".join(urls)


async def serve(
    loaded: Loaded, reload: Callable[[], Loaded], sockets: Sequence[socket.socket] = ()
) -> int:
    """Run the proxy until SIGTERM/SIGINT; SIGHUP reloads keys, log level and TLS certificate.

    ``sockets``: already listening sockets (a worker under the supervisor, which also serves
    the admin listener). The handlers come first: a signal during start-up waits for it.
    """
    config = loaded.config
    auth = make_auth(config.upstream_auth) if config.upstream_auth is not None else None
    worker = supervisor.worker_sockets()
    server = ProxyServer(
        config,
        auth,
        sockets=sockets,
        serve_admin=not sockets,
        worker=worker[1] if worker is not None else None,
    )
    running = loaded
    started = False
    reload_held = False

    def on_hup() -> None:
        nonlocal running, reload_held
        if not started:
            reload_held = True
            return
        running = apply_reload(running, reload, server)

    stop = asyncio.Event()
    _install_signals(stop, on_hup)
    if stop.is_set():
        return EXIT_OK  # told to stop before anything started
    try:
        await server.start()
    except (ssl.SSLError, CertificateError) as exc:
        await server.shutdown(0)
        return failed(EXIT_CONFIG_ERROR, f"config error: TLS certificate: {exc}")
    except OSError as exc:
        await server.shutdown(0)
        where = f"{config.bind_address}:{config.port}"
        return failed(EXIT_STARTUP_FAILURE, f"cannot listen on {where}: {exc.strerror or exc}")
    started = True
    # The banner shows at any level: it is the one line every operator needs.
    logger.log(max(logging.INFO, logger.getEffectiveLevel()), "%s", banner(loaded, server))
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
    if reload_held:
        running = apply_reload(running, reload, server)
    if not stop.is_set():
        if sockets:
            supervisor.report_start(supervisor.READY)
        else:
            announce(f"ready: {listening(config, server)}")
        async with keys_file_watcher(config, on_hup):
            await stop.wait()
    timeout = running.config.shutdown_timeout
    logger.info("shutting down: draining for up to %gs", timeout)
    server.stop_accepting()
    if not sockets:
        announce("draining: no longer accepting")  # true when printed: the listeners are shut
    drained = await server.shutdown(timeout)
    logger.info("stopped%s", "" if drained else " (some connections were cut at the deadline)")
    return EXIT_OK


def apply_reload(running: Loaded, reload: Callable[[], Loaded], server: ProxyServer) -> Loaded:
    """SIGHUP: load the config again and apply, in one step, the part of it that reloads;
    say what changed and what keeps its running value until a restart."""
    try:
        new = reload()
    except ConfigError as exc:
        logger.error("reload rejected, keeping the running config: %s", exc)
        return running
    plan = reload_plan(running.config, new.config)
    config = plan.config
    for secret in walk_secrets(new.config):
        register_secret(secret)
    set_level(config.logging.level)  # first: the server reads it to enable access lines
    logging.getLogger("claude_proxy.access").disabled = not config.logging.access_log
    server.reload(config)
    keys = config.client_keys()
    logger.info(
        "reloaded %s: %s; in force: %d client key(s) [%s], passthrough %s, log level %s",
        new.path or "config",
        "; ".join(plan.changes) or "no change that reloads",
        len(keys),
        ", ".join(k.name for k in keys),
        "on" if config.passthrough_unauthenticated else "off",
        config.logging.level,
    )
    for line in plan.restart_needed:
        logger.warning("not reloaded, needs a restart: %s", line)
    return Loaded(config, new.path, new.searched)


class CheckReport:
    """What ``check`` found: lines for a person as they come, or one JSON object at the end."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.problems: list[dict[str, str]] = []
        self.warnings: list[dict[str, str]] = []

    def line(self, label: str, text: str) -> None:
        if not self.as_json:
            print(f"{label + ':':<14}{text}", flush=True)

    def problem(self, label: str, key: str, message: str) -> None:
        self.problems.append({"key": key, "message": message})
        self.line(label, f"FAILED: {message}")

    def warning(self, key: str, message: str) -> None:
        self.warnings.append({"key": key, "message": message})
        self.line("warning", message)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "problems": self.problems, "warnings": self.warnings}


_CONFIG_KEY = re.compile(r"(--config|[A-Za-z_][\w.\[\]]*)(?: \([^)]*\))?: ")


def config_error_report(exc: ConfigError) -> dict[str, object]:
    """``check --json``'s object for a config that does not load."""
    match = _CONFIG_KEY.match(str(exc))
    key = match.group(1) if match else "config"
    return {"ok": False, "problems": [{"key": key, "message": str(exc)}], "warnings": []}


def _check_local(config: Config, report: CheckReport) -> None:
    """What ``serve`` needs on this machine: its ports, TLS files and log directory."""
    labels = {"port": "listen", "tls.https_port": "https listen", "admin.port": "admin listen"}
    for key, host, port in checks.listeners(config):
        bind = checks.bind_problem(host, port)
        if bind:
            report.problem(labels[key], key, bind)
        else:
            report.line(labels[key], f"{host}:{port} " + ("free" if port else "(chosen at start)"))
    if config.tls.mode == "manual":
        tls = checks.tls_problem(config)
        if tls:
            report.problem("tls files", "tls.cert_path", tls)
        else:
            report.line("tls files", f"{config.tls.cert_path} and {config.tls.key_path} load")
    log = checks.log_path_problem(config.logging.log_path)
    if log:
        report.problem("log path", "logging.log_path", log)
    else:
        report.line("log path", f"{config.logging.log_path or '(stdout)'} writable")
    access = config.logging.access_log_path
    if access:
        problem = checks.log_path_problem(access)
        if problem:
            report.problem("access log", "logging.access_log_path", problem)
        else:
            report.line("access log", f"{access} writable")
    relay = checks.open_relay_warning(config)
    if relay:
        report.warning("client_api_keys", relay)


async def check(
    loaded: Loaded, probe: str | None, probe_path: str | None, *, as_json: bool = False
) -> int:
    """Validate, try what ``serve`` will need, obtain a credential, optionally probe."""
    config = loaded.config
    report = CheckReport(as_json)
    report.line("config file", str(loaded.path or "(none: environment and flags)"))
    targets = [_Checked(config, i, up) for i, up in enumerate(config.targets())]
    for t in targets:
        report.line("upstream" + t.tag, t.up.url)
        report.line("auth type" + t.tag, t.auth.type)
    keys = config.client_keys()
    report.line("client keys", f"{len(keys)} ({', '.join(k.name for k in keys) or 'none'})")
    _check_local(config, report)
    for t in targets:  # every upstream's reachability and credential, one after the other
        unreachable, seen = await checks.upstream_problem(t.up.url, config.connect_timeout)
        if unreachable:
            report.problem("connect" + t.tag, t.url_key, unreachable)
        else:
            report.line("connect" + t.tag, seen)
        auth = make_auth(t.auth)
        try:
            usable = await _check_credential(t, auth, report)
            if usable and probe and not unreachable:
                await _probe(config, t, auth, probe, probe_path, report)
        finally:
            await auth.close()
    report.line("result", "OK" if report.ok else "NOT USABLE")
    if as_json:
        print(json.dumps(report.as_dict()), flush=True)
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


class _Checked:
    """One upstream as ``check`` reports it: its lines are tagged with its name when there
    are several, and its problems name its own keys."""

    def __init__(self, config: Config, index: int, up: UpstreamConfig) -> None:
        self.up = up
        assert up.auth is not None
        self.auth = up.auth
        several = bool(config.upstreams)
        self.tag = f" ({self.up.name})" if several else ""
        self.url_key = f"upstreams[{index}].url" if several else "upstream_url"
        own = several and config.upstreams[index].auth is not None
        self.auth_key = f"upstreams[{index}].auth" if own else "upstream_auth"


async def _check_credential(t: _Checked, auth: UpstreamAuth, report: CheckReport) -> bool:
    if not isinstance(auth, TokenAuth):
        problem = _api_key_problem(t.auth)
        if problem:
            report.problem("api key" + t.tag, t.auth_key + ".api_key", problem)
        else:
            report.line("api key" + t.tag, "present")
        return problem is None
    report.line("scope" + t.tag, auth.scope)
    started = time.monotonic()
    await auth.start()
    await auth.wait_ready()
    status = auth.status()
    if not auth.ready():
        report.problem("token" + t.tag, t.auth_key, str(status.get("error", "unknown error")))
        return False
    expires = status["expires_on"]
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expires))
    report.line(
        "token" + t.tag,
        f"obtained in {time.monotonic() - started:.1f}s, "
        f"expires in {status['expires_in']}s ({when})",
    )
    report.line("audience" + t.tag, str(status.get("audience") or "(not a JWT; cannot tell)"))
    return True


def _api_key_problem(auth: UpstreamAuthConfig) -> str | None:
    key = auth.api_key or ""
    if not key:
        return "missing"
    if key != key.strip() or any(c.isspace() for c in key):
        return "contains white space (a copy-paste accident?)"
    if not key.isascii() or not key.isprintable():
        return "contains characters that cannot go in an HTTP header"
    return None


async def _probe(
    config: Config,
    t: _Checked,
    auth: UpstreamAuth,
    model: str,
    path: str | None,
    report: CheckReport,
) -> None:
    import aiohttp

    from .upstream import Origin

    origin = Origin(t.up.url)
    if path is None:
        path = "/anthropic/v1/messages" if origin.host.endswith("azure.com") else "/v1/messages"
    credential = await auth.credential_wait()
    headers = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
    if credential.kind == "bearer":
        headers["authorization"] = "Bearer " + credential.value.decode()
    else:
        headers["x-api-key"] = headers["api-key"] = credential.value.decode()
    body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
    url = t.up.url.rstrip("/") + path
    timeout = aiohttp.ClientTimeout(total=60, connect=config.connect_timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, data=json.dumps(body), headers=headers) as response,
        ):
            text = (await response.text())[:300]
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.problem("probe" + t.tag, "probe", describe_credential_error(exc))
        return
    finally:
        # aiohttp closes the session's sockets a loop turn later; check's loop ends right after
        await asyncio.sleep(0)
    seen = f"POST {path} -> {response.status} {' '.join(text.split())[:200]}"
    if response.status < 400:
        report.line("probe" + t.tag, seen)
    else:
        report.problem("probe" + t.tag, "probe", seen)


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
    assert config.upstream_auth is not None
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
