"""The local stack that every other integration test, `make up`, `make demo`
and the benchmark stand on: reachable on every path, seeded as documented,
TLS verifiable, secrets kept out of logs, `up`/`down` idempotent."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgwarden import stack as stackmod
from pgwarden.stack import BRANDS, TAP_MODES, LocalStack, luhn_valid

BRAND_PATTERNS = {
    "visa": r"4\d{15}",
    "mastercard": r"(5[1-5]\d{14}|(222[1-9]|22[3-9]\d|2[3-6]\d\d|27[01]\d|2720)\d{12})",
    "amex": r"3[47]\d{13}",
    "discover": r"(6011\d{12}|65\d{14})",
    "jcb": r"35(2[89]|[3-8]\d)\d{12}",
    "diners": r"36\d{12}",
    "unionpay": r"62\d{14,17}",
}


def test_luhn_helpers_agree_with_known_test_numbers() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("378282246310005")
    assert luhn_valid("5555555555554444")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("not a number")


def test_every_path_reaches_postgres_as_app(stack: LocalStack) -> None:
    paths = {"direct": stack.app_dsn_direct, "envoy_tcp": stack.envoy_tcp_dsn,
             **{f"gateway_{m}": d for m, d in stack.gateway_dsn.items()}}
    assert set(paths) == {"direct", "envoy_tcp", "gateway_inline", "gateway_extproc"}
    ports = {int(conninfo_to_dict(d)["port"]) for d in paths.values()}
    assert len(ports) == 4, "each path must be its own listener"
    for name, dsn in paths.items():
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            row = conn.execute("SELECT current_user, current_database(), count(*) "
                               "FROM payments").fetchone()
        assert row == ("app", "shop", 3000), name


def test_seeded_cards_are_luhn_valid_and_cover_every_brand(stack: LocalStack) -> None:
    with psycopg.connect(stack.app_dsn_direct) as conn:
        cards = [r[0] for r in conn.execute(
            "SELECT card_number FROM payments UNION ALL SELECT card_number FROM customers")]
        cvvs = conn.execute("SELECT card_number, cvv FROM customers").fetchall()
        lo, hi, big = conn.execute(
            "SELECT min(amount), max(amount), count(*) FILTER (WHERE amount > 10000) "
            "FROM payments").fetchone() or (None, None, None)
    assert all(luhn_valid(c) for c in cards)
    for brand, pattern in BRAND_PATTERNS.items():
        assert brand in BRANDS
        assert any(re.fullmatch(pattern, c) for c in cards), f"no {brand} card seeded"
    assert all(len(cvv) == (4 if pan[:2] in ("34", "37") else 3) for pan, cvv in cvvs)
    assert (float(lo), float(hi)) == (1.0, 50000.0)
    assert big and big > 10, "the demo needs payments above the approval threshold"


def test_demo_roles_have_their_grants(stack: LocalStack) -> None:
    fraud = make_conninfo(stack.app_dsn_direct, user="fraud_reader")
    with psycopg.connect(fraud) as conn:
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (3000,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT cvv FROM customers")
    with psycopg.connect(stack.upstream_dsn) as conn:
        ext = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'shop'").fetchone()
    assert ext == (1,)


@pytest.mark.parametrize("mode", ["inline", "extproc"])
def test_gateway_tls_verifies_against_the_test_ca(
    stack: LocalStack, mode: str, tmp_path: Path
) -> None:
    with psycopg.connect(stack.gateway_tls_dsn[mode], connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    other_ca = stackmod.ensure_certs(tmp_path / "other").ca
    wrong = make_conninfo(stack.gateway_tls_dsn[mode], sslrootcert=str(other_ca))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(wrong, connect_timeout=10)


def test_server_log_shows_what_reached_postgres(stack: LocalStack) -> None:
    mark = stack.pg_log_mark()
    with psycopg.connect(stack.gateway_dsn["inline"]) as conn:
        conn.execute("SELECT 'pgwarden-log-probe-42'")
    assert "pgwarden-log-probe-42" in stack.pg_log_since(mark)
    assert "pgwarden-log-probe-42" not in stack.pg_log_since(stack.pg_log_mark())


def test_no_password_in_any_log_or_env_file(stack: LocalStack) -> None:
    for dsn in [stack.app_dsn_direct, *stack.gateway_dsn.values()]:
        with psycopg.connect(dsn) as conn:
            conn.execute("SELECT 1")
    logs = sorted(stack.workdir.glob("*.log"))
    assert {p.name for p in logs} >= {"postgresql.log", "envoy.log", "tap-inline.log",
                                      "tap-extproc.log"}
    texts = [p.read_text(errors="replace") for p in logs]
    texts += [stack.upstream_dsn, stack.app_dsn_direct, *stack.gateway_dsn.values()]
    texts.append(repr(stack))  # a failing assertion may print the fixture
    for password in stack.passwords.values():
        assert all(password not in text for text in texts)
    assert stack.secrets.pgpass.stat().st_mode & 0o077 == 0
    assert stack.secrets.file.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("mode", TAP_MODES)
def test_gateway_fails_closed_without_its_tap_and_recovers(stack: LocalStack, mode: str) -> None:
    """No tap, no database: Envoy must not fall back to a direct path
    (failure_mode_allow: false for ext_proc; no other route for inline)."""
    mark = stack.pg_log_mark()
    stack.stop_tap(mode)
    try:
        with pytest.raises(psycopg.OperationalError):
            with psycopg.connect(stack.gateway_dsn[mode], connect_timeout=10) as conn:
                conn.execute("SELECT 'pgwarden-must-not-pass'")
    finally:
        stack.restart_tap(mode)
    assert "pgwarden-must-not-pass" not in stack.pg_log_since(mark)
    with psycopg.connect(stack.gateway_dsn[mode], connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("mode", TAP_MODES)
def test_an_open_session_fails_closed_when_its_tap_is_killed(stack: LocalStack, mode: str) -> None:
    """kill -9 of the tap under an open session: the client's next statement
    fails and never reaches PostgreSQL by another way (Envoy ends the
    connection: the ext_proc stream errors with failure_mode_allow false; the
    inline tap owned the upstream connection)."""
    conn = psycopg.connect(stack.gateway_dsn[mode], connect_timeout=10, autocommit=True)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        mark = stack.pg_log_mark()
        os.kill(stack.tap_pids[mode], signal.SIGKILL)
        with pytest.raises(psycopg.OperationalError):
            # The first attempt may still be written before Envoy notices
            # the closed stream; no attempt may come back with a result.
            for _ in range(20):
                conn.execute("SELECT 'pgwarden-after-kill'")
                time.sleep(0.25)
        assert "pgwarden-after-kill" not in stack.pg_log_since(mark)
    finally:
        conn.close()
        stack.restart_tap(mode)
    with psycopg.connect(stack.gateway_dsn[mode], connect_timeout=10) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_up_is_idempotent_and_down_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    try:
        env, started = stackmod.up(workdir)
        assert started
        state = stackmod.read_state(workdir)
        assert state is not None
        pids = [p["pid"] for p in state["procs"]]
        assert {p["name"] for p in state["procs"]} >= {"postgres", "tap-inline", "tap-extproc",
                                                       "envoy"}
        env_file = (workdir / "env").read_text()
        for key in ("PGWARDEN_GATEWAY_DSN", "PGWARDEN_GATEWAY_EXTPROC_DSN",
                    "PGWARDEN_ENVOY_TCP_DSN", "PGWARDEN_UPSTREAM_DSN"):
            assert f"export {key}=" in env_file
        with psycopg.connect(env["PGWARDEN_GATEWAY_EXTPROC_DSN"]) as conn:
            assert conn.execute("SELECT count(*) FROM payments").fetchone() == (3000,)

        again, started_again = stackmod.up(workdir)
        assert not started_again
        assert again == env
    finally:
        stopped = stackmod.down(workdir)
        pg_home = (workdir / "pg").resolve()
        if pg_home.parent.name.startswith("pgwarden-"):
            shutil.rmtree(pg_home.parent, ignore_errors=True)
    assert set(stopped) >= {"postgres", "envoy"}
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    assert stackmod.read_state(workdir) is None
