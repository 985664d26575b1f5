"""Shared fixtures: one event loop thread per session, loopback servers per test.

Before anything imports aiohttp (which reads SSL_CERT_FILE once, at import), a session CA made
with trustme becomes the only trusted root, and every Azure variable that could steer a
credential elsewhere is cleared; managed identity points at a closed local port unless a test
says otherwise, so nothing can ever reach 169.254.169.254.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import trustme

SESSION_CA = trustme.CA()
_CA_DIR = tempfile.mkdtemp(prefix="claude-proxy-ca-")
atexit.register(shutil.rmtree, _CA_DIR, True)
CA_FILE = os.path.join(_CA_DIR, "ca.pem")
SESSION_CA.cert_pem.write_to_path(CA_FILE)
os.environ["SSL_CERT_FILE"] = CA_FILE
os.environ.pop("SSL_CERT_DIR", None)
for _name in list(os.environ):
    if _name.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")) or _name.startswith(
        "CLAUDE_PROXY"
    ):
        del os.environ[_name]
os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = "http://127.0.0.1:9"

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from claude_proxy.config import Config
from claude_proxy.mock import MockFoundry, start_mock

from .helpers import (
    SECRETS,
    UPSTREAM_KEY,
    Handler,
    LoopThread,
    ProxyHandle,
    RawUpstream,
    default_handler,
    make_config,
    start_proxy,
)


class _Everything(logging.Handler):
    """Sees every record the proxy and azure-identity log during the whole session, and keeps
    those that contain a known secret (a secret exists before anything can log it)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen = 0
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        extra = {k: v for k, v in record.__dict__.items() if k not in _PLAIN_RECORD}
        exc = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        text = f"{record.getMessage()} {extra} {exc}"
        self.seen += 1
        self.leaks += [f"{s[:6]}... in: {text[:300]}" for s in SECRETS if s in text]


_PLAIN_RECORD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}
_EVERYTHING = _Everything()


def pytest_sessionstart(session: pytest.Session) -> None:
    for name in ("claude_proxy", "azure"):
        logger = logging.getLogger(name)
        logger.addHandler(_EVERYTHING)
        logger.setLevel(logging.DEBUG)  # every level is scanned, and access lines flow


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No secret the suite configured or was issued may appear in any log line it caused."""
    leaks = sorted(set(_EVERYTHING.leaks))
    if leaks:
        print("\nSECRETS FOUND IN LOG RECORDS:\n" + "\n".join(leaks[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif _EVERYTHING.seen:
        print(f"\nsecret scan: {_EVERYTHING.seen} log records, {len(SECRETS)} secrets, no leak")


LOOPS = ["asyncio"] if sys.platform == "win32" else ["asyncio", "uvloop"]


@pytest.fixture(scope="session", params=LOOPS)
def lt(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    """The loop the in-process proxy and fakes run on: every test that uses it runs on the
    standard asyncio loop and on uvloop (which production uses where it exists)."""
    thread = LoopThread(request.param)
    yield thread
    thread.stop()


@pytest.fixture
def upstream(lt: LoopThread) -> Iterator[RawUpstream]:
    up = RawUpstream()
    lt.run(up.start())
    yield up
    lt.run(up.stop())


@pytest.fixture
def make_upstream(lt: LoopThread) -> Iterator[Callable[..., RawUpstream]]:
    made: list[RawUpstream] = []

    def make(handler: Handler = default_handler, **kwargs: Any) -> RawUpstream:
        up = RawUpstream(handler, **kwargs)
        lt.run(up.start())
        made.append(up)
        return up

    yield make
    for up in made:
        lt.run(up.stop())


@pytest.fixture
def make_proxy(lt: LoopThread) -> Iterator[Callable[..., ProxyHandle]]:
    started: list[ProxyHandle] = []

    def make(upstream_url: str, config: Config | None = None, **changes: Any) -> ProxyHandle:
        handle = start_proxy(lt, config or make_config(upstream_url, **changes))
        started.append(handle)
        return handle

    yield make
    for handle in started:
        handle.stop(2.0)


@pytest.fixture
def proxy(upstream: RawUpstream, make_proxy: Callable[..., ProxyHandle]) -> ProxyHandle:
    return make_proxy(upstream.url)


@pytest.fixture
def mock(lt: LoopThread) -> Iterator[tuple[MockFoundry, int]]:
    foundry = MockFoundry(api_key=UPSTREAM_KEY, delay=0.0)
    runner, port = lt.run(start_mock(foundry))
    yield foundry, port
    lt.run(runner.cleanup())


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture claude_proxy logs at DEBUG (set before the proxy starts, so access lines flow)."""
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    return caplog
