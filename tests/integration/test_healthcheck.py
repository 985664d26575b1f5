"""The image's HEALTHCHECK script, run as Docker runs it, against listeners on loopback."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "deploy" / "docker" / "healthcheck.py"
IMAGE_CONFIG = SCRIPT.parent / "image-config.toml"


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admin_port() -> Iterator[int]:
    """A /healthz server; listening before the thread starts, so no wait is needed."""
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening, held for the test."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "HOME": str(tmp_path),
        "CLAUDE_PROXY_CONFIG_FILE": str(IMAGE_CONFIG),
        "CLAUDE_PROXY__UPSTREAM_URL": "https://my-resource.services.ai.azure.com",
        "CLAUDE_PROXY__UPSTREAM_AUTH__TYPE": "azure_managed_identity",
        "CLAUDE_PROXY__ADMIN__BIND_ADDRESS": "0.0.0.0",
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthy_on_the_configured_admin_port(tmp_path: Path, admin_port: int) -> None:
    done = run(tmp_path, CLAUDE_PROXY__ADMIN__PORT=str(admin_port))
    assert done.returncode == 0, done.stderr


def test_follows_a_port_set_in_a_mounted_file(tmp_path: Path, admin_port: int) -> None:
    mounted = tmp_path / "config.toml"
    mounted.write_text(f'bind_address = "0.0.0.0"\n[admin]\nport = {admin_port}\n')
    done = run(tmp_path, CLAUDE_PROXY_CONFIG_FILE=str(mounted))
    assert done.returncode == 0, done.stderr


def test_unhealthy_when_nothing_answers(tmp_path: Path, closed_port: int) -> None:
    done = run(tmp_path, CLAUDE_PROXY__ADMIN__PORT=str(closed_port))
    assert done.returncode == 1
    assert "healthcheck:" in done.stderr


def test_unhealthy_on_a_config_error(tmp_path: Path) -> None:
    done = run(tmp_path, CLAUDE_PROXY__UPSTREAM_AUTH__TYPE="azure-ad")
    assert done.returncode == 1
    assert "upstream_auth.type" in done.stderr


def test_without_admin_listener_the_client_port_stands_in(tmp_path: Path) -> None:
    mounted = tmp_path / "config.toml"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        mounted.write_text(f'bind_address = "127.0.0.1"\nport = {port}\n')
        done = run(tmp_path, CLAUDE_PROXY_CONFIG_FILE=str(mounted))
    assert done.returncode == 0, done.stderr
