"""TokenAuthenticator: the one call a driver makes for NeedAuth."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgwarden.devissuer import DevIssuer, ensure_dev_keys
from policyd.identity import (
    ConnectGrant,
    FailureThrottle,
    ThrottleSettings,
    TokenAuthenticator,
    TokenValidator,
)
from policyd.secrets import load_secrets
from tap.hooks import Identity

PASSWORD = "upstream-only-the-gateway-knows"


@pytest.fixture
def issuer(tmp_path: Path) -> DevIssuer:
    return ensure_dev_keys(tmp_path / "id")


async def decide(identity: Identity, database: str, user: str) -> ConnectGrant:
    if "analysts" in identity.groups and database == "shop":
        return ConnectGrant(role="app_reader", decision_id="d-1")
    if "ghost" in identity.groups:
        return ConnectGrant(role="ghost_role", decision_id="d-2")
    return ConnectGrant(role=None, reason="no group may use this database", decision_id="d-3")


def make(issuer: DevIssuer, sleeps: list[float]) -> TokenAuthenticator:
    store = load_secrets(None, environ={"PGWARDEN_SECRET_APP_READER_PASSWORD": PASSWORD})

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    throttle = FailureThrottle(ThrottleSettings(base_delay=1, max_delay=4, free_failures=1))
    return TokenAuthenticator(
        TokenValidator(issuer.identity_settings()), store, decide, throttle=throttle, sleep=sleep
    )


async def test_success_gives_login_and_identity(issuer: DevIssuer) -> None:
    auth = make(issuer, [])
    result = await auth.authenticate(issuer.mint("ci-bot", ["analysts"]), "10.0.0.1", "shop", "x")
    assert result.ok
    assert result.identity.subject == "ci-bot"
    assert result.login is not None
    assert (result.login.role, result.login.password) == ("app_reader", PASSWORD)
    assert result.decision_id == "d-1"
    assert PASSWORD not in repr(result)


async def test_bad_tokens_are_slowed_down(issuer: DevIssuer) -> None:
    sleeps: list[float] = []
    auth = make(issuer, sleeps)
    expired = issuer.mint("a", extra_claims={"exp": 1000, "iat": 900, "nbf": 900})
    results = [await auth.authenticate(expired, "10.0.0.9:5000", "shop", "a") for _ in range(4)]
    assert all(not r.ok and r.reason == "expired" and r.sqlstate == "28P01" for r in results)
    assert sleeps == [1, 2, 4]
    # Success from the same source clears the slate.
    ok = await auth.authenticate(issuer.mint("a", ["analysts"]), "10.0.0.9", "shop", "a")
    assert ok.ok
    assert auth.throttle.failures("10.0.0.9") == 0


async def test_connect_denied_and_missing_credential(issuer: DevIssuer) -> None:
    auth = make(issuer, [])
    denied = await auth.authenticate(issuer.mint("a", ["sales"]), "h", "shop", "a")
    assert (denied.ok, denied.sqlstate, denied.decision_id) == (False, "28000", "d-3")
    assert denied.reason.startswith("connect_denied")
    assert denied.identity.subject == "a"  # recorded with the failure
    ghost = await auth.authenticate(issuer.mint("a", ["ghost"]), "h", "shop", "a")
    assert (ghost.ok, ghost.sqlstate) == (False, "28000")
    assert "ghost_role" in ghost.reason


async def test_plugs_into_the_tap_runtime(issuer: DevIssuer) -> None:
    from tap.actions import NeedAuth
    from tap.runtime import Runtime

    runtime = Runtime(authenticator=make(issuer, []))
    need = NeedAuth(ticket=1, token=issuer.mint("ci-bot", ["analysts"]), user="ci-bot",
                    database="shop", client_addr="127.0.0.1", tls=True)
    result = await runtime.authenticate(need)
    assert result.ok and result.login is not None and result.login.role == "app_reader"
