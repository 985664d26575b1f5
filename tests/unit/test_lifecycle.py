"""Start-up and reload decisions: reload_plan, the TLS file checks, the log path check."""

from __future__ import annotations

import dataclasses
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from claude_proxy.checks import log_path_problem
from claude_proxy.config import (
    AdminConfig,
    ClientJwtConfig,
    ClientKey,
    Config,
    TlsConfig,
    UpstreamAuthConfig,
    reload_plan,
)
from claude_proxy.tls import CertificateError, pem_problem, server_tls_context

RUNNING = Config(
    upstream_url="https://a.services.ai.azure.com",
    upstream_auth=UpstreamAuthConfig(type="api_key", api_key="upstream-secret-1"),
    client_api_keys=(ClientKey("alice", "alice-key-1"), ClientKey("carol", "carol-key-1")),
    tls=TlsConfig(mode="manual", cert_path="/etc/a.crt", key_path="/etc/a.key"),
)


def changed(**fields: Any) -> Config:
    """RUNNING with ``fields`` replaced; dotted names reach into the tables."""
    config = RUNNING
    for dotted, value in fields.items():
        table, _, name = dotted.rpartition("__")
        if table:
            inner = dataclasses.replace(getattr(config, table), **{name: value})
            config = dataclasses.replace(config, **{table: inner})
        else:
            config = dataclasses.replace(config, **{name: value})
    return config


@pytest.mark.parametrize(
    ("new", "changes", "restart"),
    [
        pytest.param(RUNNING, [], [], id="nothing"),
        pytest.param(
            changed(client_api_keys=(ClientKey("carol", "carol-key-1"), ClientKey("bob", "b-1"))),
            ["client keys added: bob", "client keys removed: alice"],
            [],
            id="keys-added-removed",
        ),
        pytest.param(
            changed(client_api_keys=(ClientKey("alice", "alice-key-2"), ClientKey("carol", "c-2"))),
            ["client keys replaced: alice, carol"],
            [],
            id="key-rotated",
        ),
        pytest.param(
            changed(
                client_api_keys=(
                    ClientKey("alice", key_sha256="ab" * 32),
                    ClientKey("carol", "carol-key-1", requests_per_minute=10),
                )
            ),
            ["client keys replaced: alice", "client keys with other limits: carol"],
            [],
            id="key-as-digest-and-limits",
        ),
        pytest.param(
            changed(client_jwt=ClientJwtConfig(issuer="https://login.example/t", audience="api")),
            [],
            ["client_jwt: (unset) stays in force; (a table) needs a restart"],
            id="optional-table-set",
        ),
        pytest.param(
            changed(client_api_key="single-key-1"),
            ["client keys added: default"],
            [],
            id="default-key-added",
        ),
        pytest.param(
            changed(logging__level="debug", passthrough_unauthenticated=False),
            ["passthrough_unauthenticated: true -> false", "logging.level: 'info' -> 'debug'"],
            [],
            id="level-passthrough",
        ),
        pytest.param(
            changed(tls__cert_path="/etc/b.crt"),
            ["tls.cert_path: '/etc/a.crt' -> '/etc/b.crt'"],
            [],
            id="certificate",
        ),
        pytest.param(
            changed(port=9090, bind_address="0.0.0.0"),
            [],
            [
                "bind_address: '127.0.0.1' stays in force; '0.0.0.0' needs a restart",
                "port: 8080 stays in force; 9090 needs a restart",
            ],
            id="listener",
        ),
        pytest.param(
            changed(upstream_url="https://b.services.ai.azure.com", workers=4),
            [],
            [
                "upstream_url: 'https://a.services.ai.azure.com' stays in force; "
                "'https://b.services.ai.azure.com' needs a restart",
                "workers: 1 stays in force; 4 needs a restart",
            ],
            id="upstream-workers",
        ),
        pytest.param(
            changed(upstream_auth=UpstreamAuthConfig(type="azure_cli")),
            [],
            [
                "upstream_auth.type: 'api_key' stays in force; 'azure_cli' needs a restart",
                "upstream_auth.api_key: changed; the running value stays until a restart",
            ],
            id="auth-type",
        ),
        pytest.param(
            changed(tls__mode="off", admin=AdminConfig(port=9100), logging__log_path="/var/log"),
            [],
            [
                "logging.log_path: (unset) stays in force; '/var/log' needs a restart",
                "admin.port: (unset) stays in force; 9100 needs a restart",
                "tls.mode: 'manual' stays in force; 'off' needs a restart",
            ],
            id="tls-mode-admin-log-files",
        ),
    ],
)
def test_reload_plan_reports_changes_and_what_needs_a_restart(
    new: Config, changes: list[str], restart: list[str]
) -> None:
    plan = reload_plan(RUNNING, new)
    assert list(plan.changes) == changes
    assert list(plan.restart_needed) == restart
    text = repr(plan) + " ".join(plan.changes + plan.restart_needed)
    for secret in ("alice-key", "carol-key", "upstream-secret", "b-1", "single-key"):
        assert secret not in text


def test_reload_plan_applies_what_reloads_and_keeps_the_rest_running() -> None:
    new = changed(
        client_api_keys=(ClientKey("bob", "bob-key-1"),),
        logging__level="warn",
        logging__log_path="/elsewhere",
        tls__key_path="/etc/b.key",
        tls__https_port=9443,
        port=9090,
        idle_timeout=5.0,
        upstream_auth=UpstreamAuthConfig(type="api_key", api_key="upstream-secret-2"),
    )
    applied = reload_plan(RUNNING, new).config
    assert applied.client_keys() == new.client_keys()
    assert applied.logging.level == "warn" and applied.tls.key_path == "/etc/b.key"
    # the rest keeps its running value, so nothing is half-applied
    assert applied.logging.log_path is None and applied.tls.https_port == RUNNING.tls.https_port
    assert applied.port == RUNNING.port and applied.idle_timeout == RUNNING.idle_timeout
    assert applied.upstream_auth == RUNNING.upstream_auth
    assert reload_plan(RUNNING, RUNNING).config is RUNNING


# ----------------------------------------------------------------- TLS files


@pytest.mark.parametrize(
    ("data", "is_key", "problem"),
    [
        (b"-----BEGIN CERTIFICATE-----\nMII...", False, None),
        (b"hello", False, "not a PEM certificate"),
        (b"-----BEGIN PRIVATE KEY-----\nMII...", False, "not a PEM certificate"),
        (b"-----BEGIN PRIVATE KEY-----\nMII...", True, None),
        (b"-----BEGIN RSA PRIVATE KEY-----\nMII...", True, None),
        (b"-----BEGIN EC PRIVATE KEY-----\nMII...", True, None),
        (b"-----BEGIN CERTIFICATE-----\nMII...", True, "not a PEM private key"),
        (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMII", True, "the private key is encrypted"),
        (b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n", True, "is encrypted"),
    ],
)
def test_pem_problem(data: bytes, is_key: bool, problem: str | None) -> None:
    found = pem_problem(data, is_key=is_key)
    assert (found is None) if problem is None else (found is not None and problem in found)


def tls_config(cert: Path, key: Path) -> Config:
    tls = TlsConfig(mode="manual", cert_path=str(cert), key_path=str(key))
    return dataclasses.replace(RUNNING, tls=tls)


def write_pair(tmp_path: Path, ca: trustme.CA, name: str) -> tuple[Path, Path]:
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def encrypt(key: Path) -> None:
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )


@pytest.mark.parametrize(
    ("breakage", "key", "reason"),
    [
        ("missing-cert", "tls.cert_path", "cannot read: No such file or directory"),
        ("missing-key", "tls.key_path", "cannot read: No such file or directory"),
        ("cert-not-pem", "tls.cert_path", "not a PEM certificate"),
        ("key-not-pem", "tls.key_path", "not a PEM private key"),
        ("key-of-another-cert", "tls.key_path", "does not match the certificate in"),
        ("encrypted-key", "tls.key_path", "the private key is encrypted"),
    ],
)
def test_bad_certificate_names_the_file_and_the_reason(
    tmp_path: Path, breakage: str, key: str, reason: str
) -> None:
    ca = trustme.CA()
    cert, private = write_pair(tmp_path, ca, "a")
    if breakage == "missing-cert":
        cert.unlink()
    elif breakage == "missing-key":
        private.unlink()
    elif breakage == "cert-not-pem":
        cert.write_text("not a certificate")
    elif breakage == "key-not-pem":
        private.write_bytes(cert.read_bytes())
    elif breakage == "key-of-another-cert":
        private = write_pair(tmp_path, ca, "b")[1]
    elif breakage == "encrypted-key":
        encrypt(private)
    with pytest.raises(CertificateError) as info:
        server_tls_context(tls_config(cert, private))
    path = str(cert) if key == "tls.cert_path" else str(private)
    assert info.value.key == key and info.value.path == path
    assert str(info.value).startswith(f"{key} {path}: ")
    assert reason in info.value.reason


def test_good_certificate_loads(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path, trustme.CA(), "a")
    assert isinstance(server_tls_context(tls_config(cert, key)), ssl.SSLContext)


# ----------------------------------------------------------------- log path (serve's check)


def test_log_path_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    problem = log_path_problem(str(blocker / "logs"))
    assert problem is not None and problem.startswith(f"{blocker} is not a directory")


@pytest.mark.parametrize("where", ["existing", "to-create", "nested-to-create"])
def test_log_path_that_can_be_written(tmp_path: Path, where: str) -> None:
    path = {"existing": tmp_path, "to-create": tmp_path / "logs"}.get(where, tmp_path / "a" / "b")
    assert log_path_problem(str(path)) is None
    assert log_path_problem(None) is None  # stdout
    assert not (tmp_path / "logs").exists()  # looked at, not created


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
@pytest.mark.parametrize("target", ["directory", "parent"])
def test_log_path_this_user_cannot_write(tmp_path: Path, target: str) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        problem = log_path_problem(str(locked if target == "directory" else locked / "logs"))
    finally:
        locked.chmod(0o755)
    assert problem is not None and f"{locked} is not writable by uid" in problem
