"""Entra ID credentials for real (azure-identity, unmocked) against local fakes."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from claude_proxy.cli import EXIT_CHECK_FAILED, EXIT_OK, main
from claude_proxy.config import UpstreamAuthConfig
from claude_proxy.credentials import make_auth

from ..conftest import SESSION_CA
from ..entra_fakes import FakeEntra, install_fake_az, rsa_certificate_pem, server_ssl, start_app
from ..helpers import (
    CLIENT_KEY,
    LoopThread,
    ProxyHandle,
    RawUpstream,
    exchange,
    make_config,
    ok_response,
    request_bytes,
    secret,
    start_proxy,
    wait_until,
)

TENANT = "72f988bf-0000-0000-0000-000000000000"
CLIENT_ID = "0ac1d1e5-0000-0000-0000-000000000000"
SECRET = secret("entra-client-secret-value")


@pytest.fixture
def entra(lt: LoopThread) -> Iterator[tuple[FakeEntra, int, int]]:
    """The fake: (state, https port for token requests, http port for managed identity)."""
    fake = FakeEntra()
    https_runner, https_port = lt.run(start_app(fake.app(), server_ssl(SESSION_CA)))
    http_runner, http_port = lt.run(start_app(fake.app(), None))
    yield fake, https_port, http_port
    lt.run(https_runner.cleanup())
    lt.run(http_runner.cleanup())


@pytest.fixture
def fake_az(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = install_fake_az(tmp_path / "bin")
    log = tmp_path / "az.log"
    log.write_text("")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_AZ_LOG", str(log))
    return log


AuthMaker = Callable[..., ProxyHandle]


@pytest.fixture
def entra_proxy(lt: LoopThread, upstream: RawUpstream) -> Iterator[AuthMaker]:
    started: list[ProxyHandle] = []

    def make(auth: UpstreamAuthConfig, up: RawUpstream | None = None, **tuning: Any) -> ProxyHandle:
        config = dataclasses.replace(make_config((up or upstream).url), upstream_auth=auth)
        handle = start_proxy(lt, config, make_auth(auth, **tuning))
        started.append(handle)
        return handle

    yield make
    for handle in started:
        handle.stop(2.0)


def call(port: int, *headers: tuple[str, str], target: str = "/anthropic/v1/messages"):
    hs = list(headers) or [("x-api-key", CLIENT_KEY)]
    return exchange(port, request_bytes("POST", target, hs, b"{}"), timeout=15)


def client_secret(port: int, **extra: Any) -> UpstreamAuthConfig:
    return UpstreamAuthConfig(
        type="azure_ad",
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        client_secret=SECRET,
        authority_host=f"https://127.0.0.1:{port}",
        **extra,
    )


def bearer_of(rec: Any) -> str:
    values = rec.headers_named("authorization")
    assert len(values) == 1, rec.headers
    assert values[0].startswith(b"Bearer ")
    return values[0][7:].decode()


# ----------------------------------------------------------------- every auth type


def test_azure_ad_client_secret(entra, entra_proxy, upstream: RawUpstream, access_log) -> None:
    fake, https_port, _ = entra
    p = entra_proxy(client_secret(https_port))
    headers = [
        ("x-api-key", CLIENT_KEY),
        ("api-key", CLIENT_KEY),
        ("Authorization", f"Bearer {CLIENT_KEY}"),
        ("x-other", "1"),
    ]
    assert call(p.port, *headers).status == 200
    rec = upstream.requests[0]
    assert bearer_of(rec) == fake.issued[0]
    assert rec.header("x-api-key") is None and rec.header("api-key") is None
    assert CLIENT_KEY.encode() not in upstream.raw
    form = fake.forms[0]
    assert form["grant_type"] == "client_credentials"
    assert form["client_id"] == CLIENT_ID and form["scope"] == "https://ai.azure.com/.default"
    text = access_log.text + " ".join(str(r.__dict__) for r in access_log.records)
    assert fake.issued[0] not in text and SECRET not in text


def test_azure_cli(fake_az: Path, entra_proxy, upstream: RawUpstream) -> None:
    p = entra_proxy(UpstreamAuthConfig(type="azure_cli", tenant_id=TENANT))
    assert call(p.port).status == 200
    assert call(p.port).status == 200
    assert bearer_of(upstream.requests[0]) == "az-token-1"
    calls = fake_az.read_text().splitlines()
    assert len(calls) == 1  # cached: az is slow, it runs once per token
    assert "account get-access-token" in calls[0]
    assert "--resource https://ai.azure.com" in calls[0] and f"--tenant {TENANT}" in calls[0]


def test_managed_identity_app_service(entra, entra_proxy, upstream, monkeypatch) -> None:
    fake, _, http_port = entra
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"http://127.0.0.1:{http_port}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "secret-identity-header")
    p = entra_proxy(UpstreamAuthConfig(type="azure_managed_identity", client_id=CLIENT_ID))
    assert call(p.port).status == 200
    assert bearer_of(upstream.requests[0]) == fake.issued[0]
    query = fake.mi_requests[0]["query"]
    assert query["resource"] == "https://ai.azure.com" and query["client_id"] == CLIENT_ID
    assert fake.mi_requests[0]["headers"]["X-IDENTITY-HEADER"] == "secret-identity-header"


def test_managed_identity_imds(entra, entra_proxy, upstream, monkeypatch) -> None:
    fake, _, http_port = entra
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", f"http://127.0.0.1:{http_port}")
    p = entra_proxy(UpstreamAuthConfig(type="azure_managed_identity"))
    assert call(p.port).status == 200
    assert bearer_of(upstream.requests[0]) == fake.issued[0]
    assert fake.mi_requests[0]["query"]["resource"] == "https://ai.azure.com"


def test_workload_identity(entra, entra_proxy, upstream, monkeypatch, tmp_path) -> None:
    fake, https_port, _ = entra
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("federated-service-account-jwt")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT_ID)
    p = entra_proxy(
        UpstreamAuthConfig(
            type="azure_workload_identity", authority_host=f"https://127.0.0.1:{https_port}"
        )
    )
    assert call(p.port).status == 200
    assert bearer_of(upstream.requests[0]) == fake.issued[0]
    form = fake.forms[0]
    assert form["client_assertion"] == "federated-service-account-jwt"
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def test_certificate(entra, entra_proxy, upstream, tmp_path) -> None:
    fake, https_port, _ = entra
    pem = tmp_path / "sp.pem"
    pem.write_bytes(rsa_certificate_pem())
    p = entra_proxy(
        UpstreamAuthConfig(
            type="azure_certificate",
            tenant_id=TENANT,
            client_id=CLIENT_ID,
            certificate_path=str(pem),
            authority_host=f"https://127.0.0.1:{https_port}",
        )
    )
    assert call(p.port).status == 200
    assert bearer_of(upstream.requests[0]) == fake.issued[0]
    assert fake.forms[0]["client_assertion"].count(".") == 2  # a signed JWT


def test_default_credential_chain(entra, entra_proxy, upstream, monkeypatch) -> None:
    fake, https_port, _ = entra
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", f"https://127.0.0.1:{https_port}")
    p = entra_proxy(UpstreamAuthConfig(type="azure_default"))
    assert call(p.port).status == 200
    assert bearer_of(upstream.requests[0]) == fake.issued[0]


# ----------------------------------------------------------------- the token cache


def test_cold_start_200_concurrent_requests_one_acquisition(entra, entra_proxy, upstream) -> None:
    fake, https_port, _ = entra
    fake.delay = 0.5  # slow token endpoint: every request arrives while it is working
    p = entra_proxy(client_secret(https_port))
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: call(p.port).status, range(200)))
    assert statuses == [200] * 200
    assert fake.count == 1
    assert {bearer_of(r) for r in upstream.requests} == {fake.issued[0]}


def test_refresh_before_expiry_without_waiting(entra, entra_proxy, upstream) -> None:
    fake, https_port, _ = entra
    fake.lifetime = 4  # refreshed after 2 s, long before it expires
    p = entra_proxy(client_secret(https_port))
    assert call(p.port).status == 200
    fake.hold = hold = threading.Event()  # the refresh will wait for us
    wait_until(lambda: len(fake.forms) >= 2, timeout=10)  # it is under way, and held
    try:
        for _ in range(5):  # a request that waited for the refresh would never be answered
            assert call(p.port).status == 200
        assert {bearer_of(r) for r in upstream.requests} == {fake.issued[0]}
    finally:
        hold.set()
    fake.wait_count(2)
    wait_until(
        lambda: call(p.port).status == 200 and bearer_of(upstream.requests[-1]) != fake.issued[0]
    )


def test_outage_serves_old_token_then_503_then_recovers(
    entra, entra_proxy, upstream, access_log
) -> None:
    fake, https_port, _ = entra
    fake.lifetime = 3
    p = entra_proxy(client_secret(https_port), backoff_max=0.3)
    assert call(p.port).status == 200
    first = fake.issued[0]
    fake.mode = "error"
    fake.wait_count(2)  # the refresh at 1.5 s failed
    assert call(p.port).status == 200  # old token still valid: served
    assert bearer_of(upstream.requests[-1]) == first
    wait_until(lambda: call(p.port).status == 503, timeout=5)  # expired now
    resp = call(p.port)
    assert resp.status == 503
    # it passes: clients are told to come back, after a while
    assert resp.header("x-should-retry") == b"true" and resp.header("retry-after") == b"5"
    message = resp.json()["error"]["message"]
    assert "upstream credential (azure_ad) is unavailable" in message
    assert SECRET not in message and "Traceback" not in message
    resp = call(p.port, target="/openai/v1/chat/completions")
    assert resp.json()["error"]["code"] == "upstream_credential_unavailable"
    fake.mode = "ok"
    wait_until(lambda: call(p.port).status == 200, timeout=5)  # recovered by itself
    assert bearer_of(upstream.requests[-1]) != first
    states = [
        r.getMessage()
        for r in access_log.records
        if r.name == "claude_proxy.credentials" and "->" in r.getMessage()
    ]
    # one line per state change, not one per request
    assert [s.split(":")[0] for s in states] == [
        "upstream credential starting -> ok",
        "upstream credential ok -> degraded",
        "upstream credential degraded -> unavailable",
        "upstream credential unavailable -> ok",
    ]


@pytest.mark.parametrize("mode", ["garbage", "hang"])
def test_token_source_broken_at_start(entra, entra_proxy, mode: str) -> None:
    fake, https_port, _ = entra
    fake.mode = mode
    p = entra_proxy(
        dataclasses.replace(client_secret(https_port), token_timeout=0.5), backoff_max=0.3
    )
    resp = call(p.port)  # answered, not held: the per-test timeout would catch a hang
    assert resp.status == 503
    fake.mode = "ok"
    wait_until(lambda: call(p.port).status == 200, timeout=5)


def test_upstream_401_makes_token_suspect(entra, entra_proxy, make_upstream) -> None:
    fake, https_port, _ = entra
    rejected: set[str] = set()

    def handler(rec: Any) -> list[object]:
        token = bearer_of(rec)
        if token == fake.issued[0]:
            rejected.add(token)
            return [b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"]
        return [ok_response(token.encode())]

    up = make_upstream(handler)
    p = entra_proxy(client_secret(https_port), up=up)
    assert call(p.port).status == 401  # the upstream's answer is relayed...
    resp = call(p.port)  # ...and the next request carries a new token
    assert resp.status == 200 and resp.body.decode() == fake.issued[1]
    assert fake.count == 2


# ----------------------------------------------------------------- claude-proxy check


def write_config(tmp_path: Path, auth: str, upstream: RawUpstream) -> Path:
    """``check`` connects to the upstream: a loopback one, never a real Azure host."""
    path = tmp_path / "c.toml"
    path.write_text(f'upstream_url = "{upstream.url}"\n[upstream_auth]\n{auth}\n')
    return path


def test_check_azure_ad_prints_audience_and_expiry(entra, tmp_path, capsys, upstream) -> None:
    _, https_port, _ = entra
    path = write_config(
        tmp_path,
        (
            f'type = "azure_ad"\ntenant_id = "{TENANT}"\nclient_id = "{CLIENT_ID}"\n'
            f'client_secret = "{SECRET}"\nauthority_host = "https://127.0.0.1:{https_port}"'
        ),
        upstream,
    )
    assert main(["check", "-c", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "audience:     https://ai.azure.com" in out
    assert "expires in 3" in out and "result:       OK" in out
    assert SECRET not in out and "eyJ" not in out


# azure-identity kills a hung az without reaping it; the warnings that leaves are its own.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("notloggedin", "run 'az login'"),
        ("wrongtenant", "AADSTS90002"),
        ("hang", "Timed out waiting for Azure CLI"),
        ("missing", "not installed"),
    ],
)
def test_check_azure_cli_failures(
    fake_az, tmp_path, capsys, monkeypatch, mode, message, upstream
) -> None:
    if mode == "missing":
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("FAKE_AZ_MODE", mode)
    path = write_config(tmp_path, 'type = "azure_cli"\ntoken_timeout = 1', upstream)
    assert main(["check", "-c", str(path)]) == EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert message in out, out
    assert "Traceback" not in out
    gc.collect()  # let the unreaped process's warnings surface here, where they are ignored


def test_check_token_endpoint_unreachable(tmp_path, capsys, upstream) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # closed again: nothing listens there
    path = write_config(
        tmp_path,
        (
            f'type = "azure_ad"\ntenant_id = "{TENANT}"\nclient_id = "{CLIENT_ID}"\n'
            f'client_secret = "{SECRET}"\nauthority_host = "https://127.0.0.1:{closed_port}"\n'
            "token_timeout = 5"
        ),
        upstream,
    )
    started = time.monotonic()
    assert main(["check", "-c", str(path)]) == EXIT_CHECK_FAILED
    assert time.monotonic() - started < 8
    out = capsys.readouterr().out
    assert "token:        FAILED:" in out and "result:       NOT USABLE" in out
    assert SECRET not in out and "Traceback" not in out


# azure-identity kills a hung az without reaping it; the warnings that leaves are its own.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("mode", ["notloggedin", "wrongtenant", "missing"])
def test_credential_a_person_must_fix_tells_clients_not_to_retry(
    fake_az, entra_proxy, tmp_path, monkeypatch, mode: str
) -> None:
    if mode == "missing":
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("FAKE_AZ_MODE", mode)
    p = entra_proxy(UpstreamAuthConfig(type="azure_cli", token_timeout=2), backoff_max=0.3)
    resp = call(p.port)
    assert resp.status == 503
    assert resp.header("x-should-retry") == b"false"
    assert resp.header("retry-after") is None
    gc.collect()


def test_cold_start_chunked_request_with_trailers_is_relayed(entra, entra_proxy, upstream) -> None:
    fake, https_port, _ = entra
    fake.delay = 0.3  # the request arrives while the first token is on its way
    p = entra_proxy(client_secret(https_port))
    raw = (
        b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: p\r\nx-api-key: "
        + CLIENT_KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-t: 1\r\n\r\n"
    )
    resp = exchange(p.port, raw, timeout=15)
    assert resp.status == 200
    assert upstream.requests[0].body == b"{}"
    assert upstream.raw.endswith(b"0\r\nx-t: 1\r\n\r\n")
