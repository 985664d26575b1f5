"""What a new operator meets first: ``env``, ``check --json``, the example config, and client
keys from a file that is rotated while the proxy runs (a real process)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from claude_proxy.cli import EXIT_CHECK_FAILED, EXIT_CONFIG_ERROR, EXIT_OK, main

from ..entra_fakes import install_fake_az, server_ssl
from ..helpers import CLIENT_KEY, UPSTREAM_KEY, RawUpstream, exchange, request_bytes, secret
from . import test_cli
from .test_cli import READY, env_with_keys, write_config

proc_factory = test_cli.proc_factory  # real processes, as test_cli starts them
EXAMPLE = Path(__file__).parents[2] / "config.example.toml"
ALICE_KEY = secret("alice-proxy-key-0011223344")


@pytest.fixture
def keys_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLAUDE_PROXY"):
            monkeypatch.delenv(name)
    for k, v in env_with_keys().items():
        monkeypatch.setenv(k, v)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- env


@pytest.fixture
def foundry_config(tmp_path: Path, keys_env: None) -> Path:
    path = write_config(tmp_path, "https://res.services.ai.azure.com")
    keys = f'client_api_keys = [{{ name = "alice", key = "{ALICE_KEY}" }}]'
    path.write_text(path.read_text().replace("port = 0\n", f"port = 8123\n{keys}\n"))
    return path


def test_env_claude_code_after_the_target(
    foundry_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["env", "claude-code", "-c", str(foundry_config)], capsys)
    assert code == EXIT_OK
    assert json.loads(out) == {
        "env": {
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:8123/anthropic",
            "ANTHROPIC_AUTH_TOKEN": "<your proxy key>",
        }
    }
    assert ALICE_KEY not in out and CLIENT_KEY not in out


def test_env_key_prints_that_key(foundry_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["env", "codex", "-c", str(foundry_config), "--key", "alice"]
    code, out, _ = run_main(args, capsys)
    assert code == EXIT_OK
    codex = tomllib.loads(out)
    provider = codex["model_providers"][codex["model_provider"]]
    assert provider["base_url"] == "http://127.0.0.1:8123/openai/v1"
    assert provider["experimental_bearer_token"] == ALICE_KEY
    code, out, _ = run_main(["env", "shell", "-c", str(foundry_config), "--key", "default"], capsys)
    assert f"export OPENAI_API_KEY={CLIENT_KEY}\n" in out


def test_env_unknown_key_names_the_configured_ones(
    foundry_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["env", "shell", "-c", str(foundry_config), "--key", "bob"], capsys)
    assert code == EXIT_CONFIG_ERROR and out == ""
    assert "no client key named 'bob'; configured: default, alice" in err
    assert ALICE_KEY not in err


def test_env_key_known_only_by_its_digest(
    foundry_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = hashlib.sha256(b"some-key").hexdigest()
    text = foundry_config.read_text()
    foundry_config.write_text(
        text.replace("}]", f'}}, {{ name = "hashed", key_sha256 = "{digest}" }}]')
    )
    code, out, err = run_main(
        ["env", "shell", "-c", str(foundry_config), "--key", "hashed"], capsys
    )
    assert code == EXIT_CONFIG_ERROR and out == "" and "key_sha256" in err


def test_env_url_and_port_flags(foundry_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["env", "claude-code-foundry", "-c", str(foundry_config)]
    _, out, _ = run_main([*args, "--url", "https://llm.corp.example/"], capsys)
    env = json.loads(out)["env"]
    assert env["ANTHROPIC_FOUNDRY_BASE_URL"] == "https://llm.corp.example/anthropic"
    assert env["CLAUDE_CODE_USE_FOUNDRY"] == "1"
    _, out, _ = run_main([*args, "-p", "9999"], capsys)
    assert json.loads(out)["env"]["ANTHROPIC_FOUNDRY_BASE_URL"] == "http://127.0.0.1:9999/anthropic"
    code, _, err = run_main([*args, "--url", "llm.corp.example"], capsys)
    assert code == EXIT_CONFIG_ERROR and "--url: expected http(s)://" in err


def test_env_write_merges_into_settings_json(
    foundry_config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    args = ["env", "claude-code", "-c", str(foundry_config), "--key", "alice", "--write"]
    code, out, _ = run_main(args, capsys)  # into an empty HOME
    settings = home / ".claude" / "settings.json"
    assert code == EXIT_OK and f"into {settings}" in out
    assert json.loads(settings.read_text())["env"]["ANTHROPIC_AUTH_TOKEN"] == ALICE_KEY
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600  # it holds a key

    before = {"model": "opus", "env": {"OTHER": "1", "CLAUDE_CODE_USE_FOUNDRY": "1"}}
    settings.write_text(json.dumps(before))
    code, out, _ = run_main(args, capsys)
    assert code == EXIT_OK and "removed CLAUDE_CODE_USE_FOUNDRY" in out
    assert json.loads(settings.read_text()) == {
        "model": "opus",
        "env": {
            "OTHER": "1",
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:8123/anthropic",
            "ANTHROPIC_AUTH_TOKEN": ALICE_KEY,
        },
    }
    backups = list(settings.parent.glob("settings.json.*.bak"))
    assert len(backups) == 1 and json.loads(backups[0].read_text()) == before

    settings.write_text("{ not json")
    code, _, err = run_main(args, capsys)
    assert code == EXIT_CONFIG_ERROR and "not valid JSON" in err
    assert settings.read_text() == "{ not json"  # never overwritten


def test_env_write_is_not_offered_for_codex(
    foundry_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["env", "codex", "-c", str(foundry_config), "--write"], capsys)
    assert code == EXIT_CONFIG_ERROR and out == ""
    assert "paste the printed lines" in err


# ----------------------------------------------------------------------------- check --json


def check_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(["check", "--json", *args])
    out = capsys.readouterr().out
    report = json.loads(out)
    assert set(report) == {"ok", "problems", "warnings"}
    assert report["ok"] is (code == EXIT_OK)
    return code, report


def problem_keys(report: dict) -> list[str]:
    return [p["key"] for p in report["problems"]]


@pytest.fixture
def held_port() -> Iterator[socket.socket]:
    """A socket bound (not listening) on loopback: nothing can listen there, and a
    connection to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_check_json_ok(
    tmp_path: Path, upstream: RawUpstream, keys_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = check_json(["-c", str(write_config(tmp_path, upstream.url))], capsys)
    assert code == EXIT_OK and report == {"ok": True, "problems": [], "warnings": []}
    assert upstream.requests == []  # a connection, no request


def test_check_json_port_in_use(
    tmp_path: Path, upstream: RawUpstream, keys_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_config(tmp_path, upstream.url)
        code, report = check_json(["-c", str(path), "-p", str(port)], capsys)
    assert code == EXIT_CHECK_FAILED and problem_keys(report) == ["port"]
    assert f"127.0.0.1:{port}" in report["problems"][0]["message"]


def test_check_json_tls_files(
    tmp_path: Path, upstream: RawUpstream, keys_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.crt").write_text("not a certificate")
    extra = (
        f'[tls]\nmode = "manual"\ncert_path = "{tmp_path}/bad.crt"\n'
        f'key_path = "{tmp_path}/no.key"\nhttps_port = 0'
    )
    path = write_config(tmp_path, upstream.url, extra)
    code, report = check_json(["-c", str(path)], capsys)
    assert code == EXIT_CHECK_FAILED and problem_keys(report) == ["tls.cert_path"]


@pytest.mark.parametrize("key", ["logging.log_path", "logging.access_log_path"])
def test_check_json_log_path(
    tmp_path: Path,
    upstream: RawUpstream,
    keys_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    key: str,
) -> None:
    (tmp_path / "a-file").write_text("")
    variable = "CLAUDE_PROXY__" + key.upper().replace(".", "__")
    monkeypatch.setenv(variable, str(tmp_path / "a-file/logs"))
    code, report = check_json(["-c", str(write_config(tmp_path, upstream.url))], capsys)
    assert code == EXIT_CHECK_FAILED and problem_keys(report) == [key]
    assert "not a directory" in report["problems"][0]["message"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_check_json_log_path_not_writable(
    tmp_path: Path, upstream: RawUpstream, keys_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    path = write_config(tmp_path, upstream.url)
    _, report = check_json(["-c", str(path), "--log-path", str(locked / "logs")], capsys)
    assert problem_keys(report) == ["logging.log_path"]


def test_check_json_upstream_refused(
    tmp_path: Path, held_port: socket.socket, keys_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{held_port.getsockname()[1]}"
    code, report = check_json(["-c", str(write_config(tmp_path, url))], capsys)
    assert code == EXIT_CHECK_FAILED and problem_keys(report) == ["upstream_url"]
    assert "cannot connect" in report["problems"][0]["message"]


def test_check_json_upstream_tls_handshake(
    tmp_path: Path,
    lt,
    keys_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ..conftest import SESSION_CA

    trusted = RawUpstream()
    lt.run(trusted.start(server_ssl(SESSION_CA)))
    untrusted = RawUpstream()
    lt.run(untrusted.start(server_ssl(trustme.CA())))
    try:
        url = f"https://127.0.0.1:{trusted.port}"
        code, report = check_json(["-c", str(write_config(tmp_path, url))], capsys)
        assert code == EXIT_OK, report
        url = f"https://127.0.0.1:{untrusted.port}"
        code, report = check_json(["-c", str(write_config(tmp_path, url))], capsys)
        assert code == EXIT_CHECK_FAILED and problem_keys(report) == ["upstream_url"]
        assert "not trusted" in report["problems"][0]["message"]
    finally:
        lt.run(trusted.stop())
        lt.run(untrusted.stop())


def test_check_json_upstream_timeout(
    tmp_path: Path, keys_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # Listening but never accepting: the kernel completes TCP, nobody answers the TLS hello.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        path = write_config(tmp_path, url, "connect_timeout = 0.2")
        code, report = check_json(["-c", str(path)], capsys)
    assert code == EXIT_CHECK_FAILED and problem_keys(report) == ["upstream_url"]
    assert "within 0.2s" in report["problems"][0]["message"]


def test_check_json_open_relay_is_a_warning(
    tmp_path: Path, upstream: RawUpstream, keys_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, upstream.url).read_text()
    path_file = tmp_path / "open.toml"
    path_file.write_text(path.replace('client_api_key = "${TEST_CLIENT_KEY}"\n', ""))
    code, report = check_json(["-c", str(path_file), "--bind-address", "0.0.0.0"], capsys)
    assert code == EXIT_OK and report["problems"] == []
    assert [w["key"] for w in report["warnings"]] == ["client_api_keys"]


def test_check_json_bad_api_key_and_config_error(
    tmp_path: Path,
    upstream: RawUpstream,
    keys_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_config(tmp_path, upstream.url)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "has space")
    code, report = check_json(["-c", str(path)], capsys)
    assert code == EXIT_CHECK_FAILED and problem_keys(report) == ["upstream_auth.api_key"]
    code, report = check_json(["-c", str(path), "--upstream-auth-type", "azure-ad"], capsys)
    assert code == EXIT_CONFIG_ERROR and problem_keys(report) == ["upstream_auth.type"]
    assert UPSTREAM_KEY not in json.dumps(report)


# ----------------------------------------------------------------------------- the example


@pytest.fixture
def example_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """The example config copied as a user would, and an environment with nothing set but
    a PATH without az (the admin port moved to 0: 9090 may be taken on this machine)."""
    for name in list(os.environ):
        if name.startswith(("CLAUDE_PROXY", "AZURE_", "FAKE_AZ")):
            monkeypatch.delenv(name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("CLAUDE_PROXY__ADMIN__PORT", "0")
    config = tmp_path / "config.toml"
    shutil.copy(EXAMPLE, config)
    yield config, bin_dir


def test_check_on_the_example_config_fails_only_for_az(
    example_env: tuple[Path, Path], upstream: RawUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = example_env
    args = ["-c", str(config), "-p", "0", "--upstream-url", upstream.url]
    code, report = check_json(args, capsys)
    assert code == EXIT_CHECK_FAILED and problem_keys(report) == ["upstream_auth"], report
    assert "Azure CLI" in report["problems"][0]["message"]
    assert report["warnings"] == []


def test_check_on_the_example_config_with_az(
    example_env: tuple[Path, Path],
    upstream: RawUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, bin_dir = example_env
    install_fake_az(bin_dir)
    monkeypatch.setenv("FAKE_AZ_LOG", str(tmp_path / "az.log"))
    main(["check", "-c", str(config), "-p", "0", "--upstream-url", upstream.url])
    out = capsys.readouterr().out
    assert re.search(r"^result: +OK$", out, re.M), out
    assert "connect:      TCP to 127.0.0.1:" in out and "log path:     (stdout) writable" in out


# ----------------------------------------------------------------------------- keys file


def wait_count(proc, pattern: str, n: int, timeout: float = 15) -> None:
    """Wait until ``pattern`` has matched ``n`` lines of the process's output."""
    rx = re.compile(pattern)

    def seen() -> bool:
        return sum(1 for line in proc.lines if rx.search(line)) >= n or proc.p.poll() is not None

    with proc._cond:
        proc._cond.wait_for(seen, timeout)
    assert sum(1 for line in proc.lines if rx.search(line)) >= n, proc.output


KEYS = '[[client_api_keys]]\nname = "{name}"\nkey = "{key}"\n'


def publish(secret_dir: Path, version: int, text: str) -> None:
    """Write ``keys.toml`` as a Kubernetes Secret volume does: a new directory, then one
    atomic swap of the ``..data`` symlink that ``keys.toml`` points through."""
    target = secret_dir / f"..v{version}"
    target.mkdir()
    (target / "keys.toml").write_text(text)
    link = secret_dir / "..data_tmp"
    link.symlink_to(target.name)
    os.replace(link, secret_dir / "..data")
    if not (secret_dir / "keys.toml").is_symlink():
        (secret_dir / "keys.toml").symlink_to("..data/keys.toml")


@pytest.mark.skipif(os.name != "posix", reason="symlinked Secret volumes are a Linux thing")
def test_rotated_keys_file_takes_effect_without_a_restart(
    tmp_path: Path, upstream: RawUpstream, proc_factory
) -> None:
    old_key, new_key = secret("rotating-key-old-000111"), secret("rotating-key-new-222333")
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    publish(secret_dir, 1, KEYS.format(name="team", key=old_key))
    extra = f'client_api_keys_file = "{secret_dir}/keys.toml"\nclient_api_keys_file_interval = 0.05'
    proc = proc_factory(["-c", str(write_config(tmp_path, upstream.url, extra))])
    port = int(proc.wait_line(READY).group(1))
    assert "2 client key(s) [default, team]" in proc.output

    def status(key: str) -> int:
        return exchange(port, request_bytes("POST", "/v1/messages", [("x-api-key", key)])).status

    assert status(old_key) == 200

    publish(secret_dir, 2, KEYS.format(name="team", key=new_key))
    wait_count(proc, "reloaded .*: 2 client key", 1)  # logged once the new keys are in force
    assert status(new_key) == 200 and status(old_key) == 401 and status(CLIENT_KEY) == 200

    publish(secret_dir, 3, "[[client_api_keys]]\nname = 'team'\n")  # no key: refused
    wait_count(proc, "reload rejected, keeping the running config: client_api_keys_file", 1)
    assert status(new_key) == 200

    publish(secret_dir, 4, KEYS.format(name="team2", key=old_key))
    wait_count(proc, "reloaded .*: 2 client key", 2)
    assert status(old_key) == 200 and status(new_key) == 401
    assert proc.output.count("reload rejected") == 1  # once, not at every poll
    assert proc.stop() == 0
    for key in (old_key, new_key, CLIENT_KEY, UPSTREAM_KEY):
        assert key not in proc.output


def write_upstreams_config(tmp_path: Path, first: str, second: str) -> Path:
    """Two [[upstreams]], the second with its own [upstreams.auth]."""
    path = tmp_path / "config.toml"
    path.write_text(
        'port = 0\nclient_api_key = "${TEST_CLIENT_KEY}"\n'
        '[upstream_auth]\ntype = "api_key"\napi_key = "${TEST_UPSTREAM_KEY}"\n'
        f'[[upstreams]]\nname = "ptu"\nurl = "{first}"\n'
        f'[[upstreams]]\nname = "paygo"\nurl = "{second}"\npriority = 2\n'
        '[upstreams.auth]\ntype = "api_key"\napi_key = "${TEST_UPSTREAM_KEY}"\n'
    )
    path.chmod(0o600)
    return path


def test_check_probes_every_upstream(
    tmp_path: Path,
    upstream: RawUpstream,
    held_port: socket.socket,
    keys_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = f"http://127.0.0.1:{held_port.getsockname()[1]}"
    path = write_upstreams_config(tmp_path, upstream.url, dead)
    code, report = check_json(["-c", str(path)], capsys)
    # the first is fine; the second is named by its own key
    assert code == EXIT_CHECK_FAILED and problem_keys(report) == ["upstreams[1].url"]
    assert "cannot connect" in report["problems"][0]["message"]
    code = main(["check", "-c", str(path)])
    out = capsys.readouterr().out
    assert "connect (ptu)" in out and "connect (paygo)" in out
    assert "api key (ptu)" in out and "api key (paygo)" in out


def test_a_process_with_upstreams_fails_over_and_says_so(
    tmp_path: Path, upstream: RawUpstream, held_port: socket.socket, proc_factory
) -> None:
    """The real command: the banner lists the upstreams, a refused connect moves on, and
    /readyz and /metrics tell the story."""
    dead = f"http://127.0.0.1:{held_port.getsockname()[1]}"
    path = write_upstreams_config(tmp_path, dead, upstream.url)
    path.write_text(path.read_text() + "[admin]\nport = 0\n")
    proc = proc_factory(["-c", str(path)])
    match = proc.wait_line(READY.pattern + r".*, admin on http://[\d.]+:(\d+)")
    port, admin = int(match.group(1)), int(match.group(2))
    assert "upstream ptu " in proc.output and "upstream paygo " in proc.output
    resp = exchange(port, request_bytes("POST", "/v1/messages", [("x-api-key", CLIENT_KEY)]))
    assert resp.status == 200 and len(upstream.requests) == 1
    assert exchange(admin, request_bytes("GET", "/readyz", [])).status == 200
    metrics = exchange(admin, request_bytes("GET", "/metrics", [])).body.decode()
    assert 'claude_proxy_failovers_total{from="ptu",reason="connect_refused",to="paygo"} 1.0' in (
        metrics
    )
    assert 'claude_proxy_upstream_requests_total{code="200",upstream="paygo"} 1.0' in metrics
    assert proc.stop() == 0
