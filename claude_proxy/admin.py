"""The admin listener: ``/healthz``, ``/readyz``, ``/metrics``, ``/usage`` on a port of their own.

Off unless ``[admin] port`` is set, so it never shadows a proxied path. Admin traffic is a
probe every few seconds, so aiohttp (already a dependency of azure-identity) serves it.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

# () -> (ready, reason)
ReadyCheck = Callable[[], tuple[bool, str]]
# () -> the /usage document (limits.Limiter.usage)
UsageReport = Callable[[], Awaitable[dict[str, Any]]]


class AdminServer:
    """``render`` produces the metrics page; ``ready`` answers /readyz; ``usage``, when given,
    answers /usage (keys and users: a JSON document, never a metric label)."""

    def __init__(
        self,
        host: str,
        port: int,
        render: Callable[[], bytes],
        ready: ReadyCheck,
        usage: UsageReport | None = None,
    ) -> None:
        self.host = host
        self.usage = usage
        self.requested_port = port
        self.render = render
        self.ready = ready
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, reason = self.ready()
        body = {"status": "ready" if ready else "not ready", "reason": reason}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def usage_page(self, request: web.Request) -> web.Response:
        if self.usage is None:
            return web.json_response({"error": "no limits or identities configured"}, status=404)
        return web.json_response(await self.usage())

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/usage", self.usage_page)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.requested_port))
        await web.SockSite(self._runner, sock).start()
        self.port = int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
