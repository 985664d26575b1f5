"""Local stand-ins for Entra ID: an HTTPS token endpoint, a managed-identity endpoint, a fake az.

azure-identity is used for real against these; nothing of it is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

from .helpers import SECRETS

AUDIENCE = "https://ai.azure.com"


def fake_jwt(n: int, audience: str = AUDIENCE) -> str:
    def b64(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return f"{b64({'alg': 'none'})}.{b64({'aud': audience, 'n': n})}.c2ln"


class FakeEntra:
    """Token endpoint (``/<tenant>/oauth2/v2.0/token``) and managed-identity endpoints.

    ``mode``: ok | error | hang | garbage; ``lifetime``: seconds a token lives;
    ``delay``: seconds before answering; ``hold``: an event token requests wait for (set
    it to let them through).
    """

    def __init__(self, lifetime: int = 3600, delay: float = 0.0) -> None:
        self.mode = "ok"
        self.lifetime = lifetime
        self.delay = delay
        self.count = 0
        self.forms: list[dict[str, str]] = []
        self.mi_requests: list[dict[str, Any]] = []
        self.issued: list[str] = []
        self.hold: threading.Event | None = None
        self._cond = threading.Condition()

    def wait_count(self, n: int, timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= n, timeout), self.count

    def _issue(self) -> tuple[str, int]:
        token = fake_jwt(self.count + 1)
        self.issued.append(token)
        SECRETS.add(token)
        self._count()
        return token, self.lifetime

    def _count(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    async def _gate(self) -> web.Response | None:
        """The failure modes: None means answer normally."""
        if self.delay:
            await asyncio.sleep(self.delay)
        hold = self.hold
        if hold is not None:
            await asyncio.get_running_loop().run_in_executor(None, hold.wait, 20)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "error":
            self._count()
            return web.json_response(
                {"error": "temporarily_unavailable", "error_description": "AADSTS50000: down"},
                status=503,
            )
        if self.mode == "garbage":
            self._count()
            return web.Response(text="<html>not json</html>", content_type="text/html")
        return None

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.forms.append({k: str(v) for k, v in form.items()})
        gated = await self._gate()
        if gated is not None:
            return gated
        token, lifetime = self._issue()
        return web.json_response(
            {
                "access_token": token,
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "token_type": "Bearer",
            }
        )

    async def openid(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        base = f"https://{request.host}/{tenant}"
        return web.json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"{base}/v2.0",
            }
        )

    async def app_service(self, request: web.Request) -> web.Response:
        """``IDENTITY_ENDPOINT`` style (App Service, Container Apps)."""
        self.mi_requests.append({"query": dict(request.query), "headers": dict(request.headers)})
        gated = await self._gate()
        if gated is not None:
            return gated
        token, lifetime = self._issue()
        return web.json_response(
            {
                "access_token": token,
                "expires_on": str(int(time.time()) + lifetime),
                "resource": request.query.get("resource", ""),
                "token_type": "Bearer",
            }
        )

    async def imds(self, request: web.Request) -> web.Response:
        """IMDS style (VMs, AKS pod identity), reached via ``AZURE_POD_IDENTITY_AUTHORITY_HOST``."""
        self.mi_requests.append({"query": dict(request.query), "headers": dict(request.headers)})
        if request.headers.get("Metadata") != "true":
            return web.json_response({"error": "missing Metadata header"}, status=400)
        gated = await self._gate()
        if gated is not None:
            return gated
        token, lifetime = self._issue()
        return web.json_response(
            {
                "access_token": token,
                "expires_in": str(lifetime),
                "token_type": "Bearer",
                "resource": AUDIENCE,
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self.token)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self.openid)
        app.router.add_get("/msi/token", self.app_service)
        app.router.add_get("/metadata/identity/oauth2/token", self.imds)
        return app


async def start_app(app: web.Application, ssl_context: ssl.SSLContext | None) -> tuple[Any, int]:
    import socket

    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    return runner, sock.getsockname()[1]


def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


FAKE_AZ = """\
#!{python}
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_AZ_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
mode = os.environ.get("FAKE_AZ_MODE", "ok")
if mode == "notloggedin":
    sys.stderr.write("ERROR: Please run 'az login' to setup account.\\n")
    sys.exit(1)
if mode == "hang":
    time.sleep(120)
if mode == "wrongtenant":
    sys.stderr.write("ERROR: AADSTS90002: Tenant 'nope' not found.\\n")
    sys.exit(1)
n = sum(1 for _ in open(os.environ["FAKE_AZ_LOG"]))
lifetime = int(os.environ.get("FAKE_AZ_LIFETIME", "3600"))
print(json.dumps({{
    "accessToken": os.environ.get("FAKE_AZ_TOKEN_PREFIX", "az-token-") + str(n),
    "expiresOn": "2099-01-01 00:00:00.000000",
    "expires_on": int(time.time()) + lifetime,
    "subscription": "00000000-0000-0000-0000-000000000000",
    "tenant": "11111111-1111-1111-1111-111111111111",
    "tokenType": "Bearer",
}}))
"""


def rsa_certificate_pem() -> bytes:
    """A self-signed RSA certificate with its key, as a service principal would have."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "claude-proxy-test-sp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def install_fake_az(directory: Path) -> Path:
    """Write an ``az`` that answers like the Azure CLI; returns the directory for PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "az"
    script.write_text(textwrap.dedent(FAKE_AZ.format(python=sys.executable)))
    script.chmod(0o755)
    return directory
