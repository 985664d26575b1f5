"""An upstream 401 to our Entra ID token: one fresh token per rejected one, backed off.

``TokenAuth`` is driven directly, as the relay drives it (``credential_now``, ``credential_wait``,
``rejected``), with a real azure-identity ``ClientSecretCredential`` against the local fake
token endpoint; nothing of either is mocked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from claude_proxy.config import UpstreamAuthConfig
from claude_proxy.credentials import TokenAuth, make_auth
from claude_proxy.headers import UpstreamCredential

from ..conftest import SESSION_CA
from ..entra_fakes import FakeEntra, server_ssl, start_app
from ..helpers import SECRETS, LoopThread, secret, wait_until

TENANT = "72f988bf-0000-0000-0000-000000000000"
CLIENT_ID = "0ac1d1e5-0000-0000-0000-000000000000"
SECRET = secret("rejection-client-secret-value")


class SameTokenEntra(FakeEntra):
    """A token source with a cache of its own: every answer is the same token (as ``az`` does
    until shortly before expiry)."""

    def _issue(self) -> tuple[str, int]:
        _, lifetime = super()._issue()
        self.issued[-1] = self.issued[0]
        return self.issued[0], lifetime


def _start(lt: LoopThread, fake: FakeEntra, **tuning: Any) -> tuple[TokenAuth, Any]:
    runner, port = lt.run(start_app(fake.app(), server_ssl(SESSION_CA)))
    config = UpstreamAuthConfig(
        type="azure_ad",
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        client_secret=SECRET,
        authority_host=f"https://127.0.0.1:{port}",
        token_timeout=5.0,
    )
    auth = make_auth(config, **tuning)
    assert isinstance(auth, TokenAuth)
    lt.run(auth.start())
    assert lt.run(auth.wait_ready())
    return auth, runner


@pytest.fixture
def made(lt: LoopThread) -> Iterator[list[tuple[TokenAuth, Any]]]:
    started: list[tuple[TokenAuth, Any]] = []
    yield started
    for auth, runner in started:
        lt.run(auth.close())
        lt.run(runner.cleanup())


def start(lt: LoopThread, made: list[Any], fake: FakeEntra, **tuning: Any) -> TokenAuth:
    auth, runner = _start(lt, fake, **tuning)
    made.append((auth, runner))
    return auth


def now(lt: LoopThread, auth: TokenAuth) -> UpstreamCredential | None:
    return lt.call(auth.credential_now)


def wait(lt: LoopThread, auth: TokenAuth) -> UpstreamCredential:
    return lt.run(auth.credential_wait())


def reject(lt: LoopThread, auth: TokenAuth, credential: UpstreamCredential, times: int = 1) -> None:
    def many() -> None:
        for _ in range(times):
            auth.rejected(credential)

    lt.call(many)


def value(credential: UpstreamCredential | None) -> str:
    assert credential is not None
    return credential.value.decode()


def state_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage().split(":")[0]
        for r in caplog.records
        if r.name == "claude_proxy.credentials" and " -> " in r.getMessage()
    ]


# ----------------------------------------------------------------- the tests


def test_many_401s_for_one_token_make_one_acquisition(lt: LoopThread, made: list[Any]) -> None:
    fake = FakeEntra(delay=0.2)  # slow: every rejection and waiter arrives while it works
    auth = start(lt, made, fake)
    first = wait(lt, auth)
    assert fake.count == 1

    async def burst() -> list[UpstreamCredential]:
        for _ in range(100):
            auth.rejected(first)  # a hundred requests in flight with it all answered 401
        assert auth.credential_now() is None  # the rejected token is not handed out while
        return await asyncio.gather(*(auth.credential_wait() for _ in range(100)))  # one comes

    got = lt.run(burst())
    assert fake.count == 2
    assert {value(c) for c in got} == {fake.issued[1]}
    reject(lt, auth, first, times=10)  # late 401s for the replaced token change nothing
    assert value(now(lt, auth)) == fake.issued[1]
    assert fake.count == 2


def test_fresh_token_rejected_again_is_backed_off(
    lt: LoopThread, made: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="claude_proxy.credentials")
    fake = FakeEntra()
    auth = start(lt, made, fake, backoff_max=0.2)
    first = wait(lt, auth)
    reject(lt, auth, first)
    second = wait(lt, auth)
    assert value(second) == fake.issued[1]
    # The upstream rejects the fresh token too: no acquisition at once; the token is still
    # served, so the upstream's own 401 (which says why) reaches the client.
    reject(lt, auth, second, times=20)
    assert value(now(lt, auth)) == fake.issued[1]
    assert not auth.status()["acquiring"]
    assert fake.count == 2
    assert auth.status()["state"] == "refused"
    assert auth.status()["rejections"] == 2
    assert auth.status()["backoff"] == 0.2  # min(1 s doubling, the cap)
    assert not auth.ready()
    fake.wait_count(3)  # after the back-off, one more fresh token
    wait_until(lambda: now(lt, auth) is not None and value(now(lt, auth)) == fake.issued[2])
    assert fake.count == 3
    assert state_lines(caplog) == [
        "upstream credential starting -> ok",
        "upstream credential ok -> rejected",
        "upstream credential rejected -> ok",
        "upstream credential ok -> refused",
    ]
    # no 401 for the third token for a while: the streak is forgotten, said once
    wait_until(lambda: auth.status()["state"] == "ok", timeout=10)
    assert "rejections" not in auth.status()
    assert state_lines(caplog)[-1] == "upstream credential refused -> ok"
    assert auth.ready()


def test_source_returning_the_rejected_token_serves_it(
    lt: LoopThread, made: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="claude_proxy.credentials")
    fake = SameTokenEntra()
    auth = start(lt, made, fake, backoff_max=30.0)
    first = wait(lt, auth)
    reject(lt, auth, first)
    again = wait(lt, auth)  # the fresh acquisition brought back the same token: served
    assert again.value == first.value and fake.count == 2
    # later 401s for that token: it is known rejected, its replacement is backed off
    for _ in range(20):
        reject(lt, auth, again)
        assert value(wait(lt, auth)) == value(first)
    assert fake.count == 2
    assert not auth.status()["acquiring"]
    assert auth.status()["state"] == "refused"
    assert state_lines(caplog)[-1] == "upstream credential rejected -> refused"


def test_token_source_down_after_a_401_is_not_asked_per_request(
    lt: LoopThread, made: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="claude_proxy.credentials")
    fake = FakeEntra()
    auth = start(lt, made, fake, backoff_max=30.0)
    first = wait(lt, auth)
    fake.mode = "error"
    reject(lt, auth, first)
    assert value(wait(lt, auth)) == value(first)  # the only token there is: the upstream decides
    assert fake.count == 2
    for _ in range(20):
        assert value(wait(lt, auth)) == value(first)
        reject(lt, auth, first)
    assert fake.count == 2  # the refresher retries with its back-off, not each request
    assert auth.status()["state"] == "degraded"
    fake.mode = "ok"


def test_no_token_value_in_status_or_logs(lt: LoopThread, made: list[Any]) -> None:
    fake = FakeEntra()
    auth = start(lt, made, fake)
    first = wait(lt, auth)
    reject(lt, auth, first)
    wait(lt, auth)
    assert all(token in SECRETS for token in fake.issued)
    text = repr(auth) + repr(auth.status())
    assert not any(token in text for token in fake.issued)
