"""What ``serve`` will need, tried without serving: for ``claude-proxy check``.

Each function tries one thing (bind a port, load the TLS files, write the log directory, reach
the upstream) and returns what is wrong with it in words a person can act on, or None. Nothing
here is left open: sockets are closed before returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import ssl
import time
from pathlib import Path

from .config import Config
from .upstream import Origin, client_ssl_context

_BIND_HINTS = {
    errno.EADDRINUSE: "another program (another claude-proxy?) listens there",
    errno.EACCES: "ports below 1024 need privileges; use a higher port",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address",
}


def listeners(config: Config) -> list[tuple[str, str, int]]:
    """The (dotted key, address, port) of every listener ``serve`` opens."""
    found = [("port", config.bind_address, config.port)]
    if config.tls.mode == "manual":
        found.append(("tls.https_port", config.bind_address, config.tls.https_port))
    if config.admin.port is not None:
        found.append(("admin.port", config.admin.bind_address, config.admin.port))
    return found


def bind_problem(host: str, port: int) -> str | None:
    """Whether ``host:port`` can be bound as the server binds it (SO_REUSEADDR, so a port
    left in TIME_WAIT is no problem); port 0 always can. Bound, never listening."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            hint = _BIND_HINTS.get(exc.errno or 0)
            reason = exc.strerror or str(exc)
            return f"cannot listen on {host}:{port}: {reason}" + (f" ({hint})" if hint else "")
    return None


def tls_problem(config: Config) -> str | None:
    """Whether the TLS listener's certificate and key load (as ``serve`` loads them); the
    answer names the file and the cause."""
    if config.tls.mode != "manual":
        return None
    from .tls import CertificateError, server_tls_context

    try:
        server_tls_context(config)
    except CertificateError as exc:
        return str(exc)
    return None


def log_path_problem(log_path: str | None) -> str | None:
    """Whether the log directory exists and is writable, or can be created."""
    if not log_path:
        return None
    path = Path(log_path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory; give log_path a directory, or omit it for stdout"
    if not os.access(existing, os.W_OK | os.X_OK):
        uid = os.getuid() if hasattr(os, "getuid") else "this user"
        what = "create" if existing != path else "write to"
        return (
            f"cannot {what} {path}: {existing} is not writable by uid {uid}; create it for "
            f"this user (sudo install -d -o $(id -u) {path}), or omit log_path for stdout"
        )
    return None


def open_relay_warning(config: Config) -> str | None:
    """No client keys (nor client JWTs) while other machines can reach the listener: anyone
    spends the quota."""
    if config.client_keys() or config.client_jwt is not None:
        return None
    host = config.bind_address
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"no client keys and bind_address {host}: anyone who reaches the proxy gets the "
        "upstream credential; set client_api_key(s), or bind 127.0.0.1"
    )


def _reason(exc: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed ('h', 1)``."""
    if not isinstance(exc, socket.gaierror) and exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


async def upstream_problem(
    url: str, timeout: float, context: ssl.SSLContext | None = None
) -> tuple[str | None, str]:
    """Connect to the upstream (TCP, then the TLS handshake for https), send nothing.

    Returns (problem or None, what was seen). Each step is bounded by ``timeout``.
    """
    origin = Origin(url)
    where = f"{origin.host}:{origin.port}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(origin.host, origin.port)
    except TimeoutError:
        return f"no TCP connection to {where} within {timeout:g}s (connect_timeout)", "timeout"
    except OSError as exc:
        advice = "check upstream_url, DNS, firewall"
        return f"cannot connect to {where}: {_reason(exc)} ({advice})", "failed"
    tcp_ms = (time.monotonic() - started) * 1000
    try:
        if not origin.tls:
            return None, f"TCP to {where} in {tcp_ms:.0f} ms"
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await writer.start_tls(context or client_ssl_context(), server_hostname=origin.host)
        except TimeoutError:
            return f"TLS handshake with {where} did not finish within {timeout:g}s", "timeout"
        except ssl.SSLCertVerificationError as exc:
            return (
                f"TLS handshake with {where} failed: {exc.verify_message or exc.reason}; "
                "the certificate is not trusted (set SSL_CERT_FILE to a CA bundle that has "
                "its issuer) or is for another name",
                "failed",
            )
        except (ssl.SSLError, OSError) as exc:
            return f"TLS handshake with {where} failed: {exc}", "failed"
        tls_ms = (time.monotonic() - started) * 1000
        return None, f"TCP to {where} in {tcp_ms:.0f} ms, TLS handshake in {tls_ms:.0f} ms"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
