"""Running it for a team: admin listener, metrics after real traffic, usage, TLS listener."""

from __future__ import annotations

import dataclasses
import json
import re
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from claude_proxy.cli import EXIT_CHECK_FAILED, EXIT_CONFIG_ERROR, EXIT_OK, main
from claude_proxy.config import AdminConfig, ClientKey, TlsConfig, UpstreamAuthConfig
from claude_proxy.credentials import make_auth

from ..conftest import CA_FILE, SESSION_CA
from ..helpers import (
    CLIENT_KEY,
    LoopThread,
    ProxyHandle,
    RawUpstream,
    Recorded,
    exchange,
    make_config,
    raw_connect,
    request_bytes,
    secret,
    start_proxy,
    wait_until,
)

ADMIN = AdminConfig(port=0)


def admin_get(proxy: ProxyHandle, path: str) -> tuple[int, str]:
    assert proxy.server.admin is not None
    url = f"http://127.0.0.1:{proxy.server.admin.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, in Prometheus text
    format; a series that is not there at all fails the test (it cannot read as 0)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    assert seen, f"no sample {name}{labels}"
    return total


@pytest.fixture
def mock_proxy(mock, make_proxy) -> ProxyHandle:
    _, port = mock
    keys = (ClientKey("alice", secret("alice-key-0001")),)
    return make_proxy(f"http://127.0.0.1:{port}", admin=ADMIN, client_api_keys=keys)


def test_admin_is_off_by_default(proxy: ProxyHandle) -> None:
    assert proxy.server.admin is None and proxy.server.metrics is None


def test_health_and_metrics_after_traffic(access_log, mock_proxy: ProxyHandle) -> None:
    assert admin_get(mock_proxy, "/healthz") == (200, '{"status": "ok"}')
    assert admin_get(mock_proxy, "/readyz")[0] == 200
    client = anthropic.Anthropic(
        base_url=mock_proxy.url + "/anthropic", api_key="alice-key-0001", max_retries=0
    )
    messages = [{"role": "user", "content": "count these four words"}]
    with client:
        client.messages.create(model="claude-a", max_tokens=9, messages=messages)
        with client.messages.stream(model="claude-a", max_tokens=9, messages=messages) as s:
            s.until_done()
    with openai.OpenAI(
        base_url=mock_proxy.url + "/openai/v1", api_key=CLIENT_KEY, max_retries=0
    ) as oai:
        list(
            oai.chat.completions.create(
                model="gpt-b",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        oai.responses.create(model="gpt-b", input="two words")
    exchange(
        mock_proxy.port,
        request_bytes("POST", "/anthropic/v1/messages", [("x-api-key", "wrong")], b"{}"),
    )
    wait_until(
        lambda: (
            metric(
                admin_get(mock_proxy, "/metrics")[1],
                "claude_proxy_requests_total",
                client="rejected",
            )
            == 1
        )
    )
    status, text = admin_get(mock_proxy, "/metrics")
    assert status == 200
    assert (
        metric(text, "claude_proxy_requests_total", route="anthropic", status="2xx", client="alice")
        == 2
    )
    assert (
        metric(text, "claude_proxy_requests_total", route="openai", status="2xx", client="default")
        == 2
    )
    assert (
        metric(
            text, "claude_proxy_requests_total", route="anthropic", status="4xx", client="rejected"
        )
        == 1
    )
    # tokens as the mock reported them, streamed and not
    reply = "Hello from the claude-proxy mock! You said: count these four words"
    reply_words = len(reply.split(" "))
    assert (
        metric(text, "claude_proxy_tokens_total", client="alice", model="claude-a", kind="input")
        == 8
    )
    assert (
        metric(text, "claude_proxy_tokens_total", client="alice", model="claude-a", kind="output")
        == 2 * reply_words
    )
    assert (
        metric(text, "claude_proxy_tokens_total", client="default", model="gpt-b", kind="input")
        == 4 + 2
    )
    assert metric(text, "claude_proxy_time_to_first_byte_seconds_count", route="anthropic") == 3
    assert metric(text, "claude_proxy_request_duration_seconds_count", route="openai") == 2
    assert metric(text, "claude_proxy_response_bytes_total", route="anthropic") > 1000
    assert metric(text, "claude_proxy_requests_in_flight") == 0
    assert "alice-key-0001" not in text and CLIENT_KEY not in text
    lines = [r.getMessage() for r in access_log.records if r.name == "claude_proxy.access"]
    assert any(" model=claude-a tokens_in=4 tokens_out=" in line for line in lines), lines


def test_open_streams_gauge_and_drain(make_upstream, lt: LoopThread) -> None:
    release = threading.Event()

    def handler(rec: Recorded) -> list[object]:
        return [
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n7\r\ndata:\n\n\r\n",
            release,
            b"0\r\n\r\n",
        ]

    up = make_upstream(handler)
    proxy = start_proxy(lt, make_config(up.url, admin=ADMIN))
    sock = raw_connect(proxy.port)
    sock.sendall(request_bytes("POST", "/v1/messages", [("x-api-key", CLIENT_KEY)], b"{}"))
    got = b""
    while b"data:" not in got:
        got += sock.recv(1000)
    text = admin_get(proxy, "/metrics")[1]
    assert metric(text, "claude_proxy_open_streams") == 1
    assert metric(text, "claude_proxy_requests_in_flight") == 1
    shutdown = lt.loop.call_soon_threadsafe  # start draining without waiting for it
    future: Any = None

    def begin() -> None:
        nonlocal future
        future = lt.loop.create_task(proxy.server.shutdown(10))

    shutdown(begin)
    wait_until(lambda: admin_get(proxy, "/readyz")[0] == 503)
    assert json.loads(admin_get(proxy, "/readyz")[1])["reason"] == "draining"
    release.set()
    while not got.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(1000)
        assert chunk
        got += chunk
    sock.close()
    wait_until(lambda: future is not None and future.done())
    assert future.result() is True  # drained in time


def test_readyz_when_credential_unavailable(
    lt: LoopThread, upstream: RawUpstream, tmp_path: Path, monkeypatch
) -> None:
    from ..entra_fakes import install_fake_az

    bindir = install_fake_az(tmp_path / "bin")
    (tmp_path / "az.log").write_text("")
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_AZ_LOG", str(tmp_path / "az.log"))
    monkeypatch.setenv("FAKE_AZ_MODE", "notloggedin")
    auth_config = UpstreamAuthConfig(type="azure_cli")
    config = dataclasses.replace(make_config(upstream.url, admin=ADMIN), upstream_auth=auth_config)
    proxy = start_proxy(lt, config, make_auth(auth_config, backoff_max=0.2))
    try:
        wait_until(lambda: admin_get(proxy, "/readyz")[0] == 503)
        body = json.loads(admin_get(proxy, "/readyz")[1])
        assert body["reason"] == "no valid upstream credential"
        monkeypatch.setenv("FAKE_AZ_MODE", "ok")
        wait_until(lambda: admin_get(proxy, "/readyz")[0] == 200, timeout=10)
        text = admin_get(proxy, "/metrics")[1]
        assert metric(text, "claude_proxy_credential_failures_total") >= 1
        assert metric(text, "claude_proxy_credential_acquisitions_total") >= 2
        assert metric(text, "claude_proxy_credential_expires_in_seconds") > 3000
    finally:
        proxy.stop(2)


def test_upstream_error_kinds_counted(make_proxy) -> None:
    proxy = make_proxy("http://127.0.0.1:9", admin=ADMIN)
    assert (
        exchange(proxy.port, request_bytes("POST", "/x", [("x-api-key", CLIENT_KEY)], b"{}")).status
        == 502
    )
    wait_until(
        lambda: (
            metric(
                admin_get(proxy, "/metrics")[1],
                "claude_proxy_upstream_errors_total",
                kind="connect_refused",
            )
            == 1
        )
    )


# ----------------------------------------------------------------- TLS listener


def tls_files(tmp_path: Path, name: str) -> tuple[str, str, Any]:
    cert = SESSION_CA.issue_cert("127.0.0.1", "localhost", common_name=name)
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    return str(cert_path), str(key_path), cert


def served_common_name(port: int) -> str:
    context = ssl.create_default_context(cafile=CA_FILE)
    with raw_connect(port) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        subject = dict(x[0] for x in tls.getpeercert()["subject"])  # type: ignore[index]
        return str(subject["commonName"])


def test_tls_listener_serves_the_sdk_and_reloads(mock, make_proxy, tmp_path: Path) -> None:
    _, mock_port = mock
    cert_path, key_path, _ = tls_files(tmp_path, "first")
    tls = TlsConfig(mode="manual", cert_path=cert_path, key_path=key_path, https_port=0)
    proxy = make_proxy(f"http://127.0.0.1:{mock_port}", tls=tls)
    port = proxy.server.tls_port
    assert port
    client = anthropic.Anthropic(
        base_url=f"https://127.0.0.1:{port}/anthropic",
        api_key=CLIENT_KEY,
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(verify=ssl.create_default_context(cafile=CA_FILE)),
    )
    with client:
        with client.messages.stream(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "over tls"}]
        ) as s:
            assert "You said: over tls" in "".join(s.text_stream)
    assert served_common_name(port) == "first"
    # SIGHUP's reload: a new certificate for new connections, the listener untouched
    cert2, key2, _ = tls_files(tmp_path, "second")
    new = dataclasses.replace(
        proxy.server.config, tls=dataclasses.replace(tls, cert_path=cert2, key_path=key2)
    )
    proxy.lt.call(lambda: proxy.server.reload(new))
    assert served_common_name(port) == "second"
    # a broken certificate path is refused and the running one kept
    bad = dataclasses.replace(new, tls=dataclasses.replace(tls, cert_path=str(tmp_path / "no")))
    proxy.lt.call(lambda: proxy.server.reload(bad))
    assert served_common_name(port) == "second"
    # plain HTTP still works beside it
    body = b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
    resp = exchange(
        proxy.port,
        request_bytes("POST", "/anthropic/v1/messages", [("x-api-key", CLIENT_KEY)], body),
    )
    assert resp.status == 200


def break_tls(tmp_path: Path, breakage: str) -> tuple[str, str, str, str]:
    """A certificate/key pair broken as named: (cert, key, the file to blame, the reason)."""
    cert_path, key_path, _ = tls_files(tmp_path, "served")
    if breakage == "missing":
        Path(cert_path).unlink()
        return cert_path, key_path, cert_path, "cannot read: No such file or directory"
    if breakage == "not-pem":
        Path(cert_path).write_text("not a certificate\n")
        return cert_path, key_path, cert_path, "not a PEM certificate"
    if breakage == "mismatch":
        other_key = tls_files(tmp_path, "other")[1]
        return cert_path, other_key, other_key, f"does not match the certificate in {cert_path}"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    Path(key_path).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return cert_path, key_path, key_path, "the private key is encrypted"


@pytest.mark.parametrize(
    ("breakage", "workers"),
    [("missing", 1), ("not-pem", 1), ("mismatch", 1), ("encrypted", 1), ("mismatch", 2)],
)
def test_bad_tls_certificate_is_named_not_cannot_listen(
    tmp_path: Path, upstream: RawUpstream, breakage: str, workers: int
) -> None:
    """Start-up with an unusable certificate or key: exit 2 naming the file and the cause
    (not 'cannot listen on', not a worker restarted every second)."""
    from .test_cli import env_with_keys, write_config

    cert, key, blamed, reason = break_tls(tmp_path, breakage)
    tls = f'[tls]\nmode = "manual"\ncert_path = "{cert}"\nkey_path = "{key}"\nhttps_port = 0\n'
    path = write_config(tmp_path, upstream.url, f"workers = {workers}\n{tls}")
    done = subprocess.run(
        [sys.executable, "-m", "claude_proxy", "-c", str(path)],
        env=env_with_keys(),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,  # an encrypted key must not wait for a passphrase
    )
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_CONFIG_ERROR, output
    assert f"{blamed}: {reason}" in output
    assert "cannot listen on" not in output and "Traceback" not in output


def test_check_reports_a_bad_tls_certificate(
    tmp_path: Path,
    upstream: RawUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from .test_cli import env_with_keys, write_config

    for name, value in env_with_keys().items():
        monkeypatch.setenv(name, value)
    cert, key, blamed, reason = break_tls(tmp_path, "mismatch")
    tls = f'[tls]\nmode = "manual"\ncert_path = "{cert}"\nkey_path = "{key}"\nhttps_port = 0\n'
    path = write_config(tmp_path, upstream.url, tls)
    assert main(["check", "-c", str(path)]) == EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert f"tls files:    FAILED: tls.key_path {blamed}: {reason}" in out
    good_cert, good_key, _ = tls_files(tmp_path, "good")
    path.write_text(path.read_text().replace(cert, good_cert).replace(key, good_key))
    assert main(["check", "-c", str(path)]) == EXIT_OK
    assert f"tls files:    {good_cert} and {good_key} load" in capsys.readouterr().out
