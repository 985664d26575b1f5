"""The image's HEALTHCHECK: GET /healthz on the admin port the config names.

The config is found as ``claude-proxy`` finds it (``CLAUDE_PROXY__*`` variables, a mounted
``config.toml``, ``CLAUDE_PROXY_CONFIG_FILE``), so the check follows ``[admin] port`` wherever it
is set. Without an admin listener, a TCP connect to the client port stands in. Exit 0: healthy.
"""

from __future__ import annotations

import socket
import sys
import urllib.request

from claude_proxy.config import load_config
from claude_proxy.errors import ConfigError

TIMEOUT = 2.0


def local(host: str) -> str:
    """Where to reach a listener bound to ``host`` from inside the container."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(host, host)


def main() -> int:
    try:
        config = load_config().config
    except ConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    try:
        if config.admin.port is None:
            socket.create_connection((local(config.bind_address), config.port), TIMEOUT).close()
            return 0
        host = local(config.admin.bind_address)
        url = f"http://{f'[{host}]' if ':' in host else host}:{config.admin.port}/healthz"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
