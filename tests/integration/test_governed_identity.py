"""Identity through the real governed gateway (issue 4, "How it must be checked").

An agent connects with its OIDC token as the password, over TLS verified
against the stack's CA, through Envoy and either tap driver. It never holds
the database's credentials: the tap logs in upstream as the role the connect
policy maps its groups to. Bad tokens of every kind are refused with 28P01
and a message that says nothing about the token; the precise reason is in
the audit store. Key rotation is followed without a restart, a session does
not outlive its token, plaintext is refused, and groups change what a
statement may do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import jwt
import pg8000.native
import psycopg
import pytest
from agent import MODES, agent_dsn, audit_url, issuer, mint
from cryptography.hazmat.primitives.asymmetric import ed25519
from psycopg.conninfo import conninfo_to_dict

from pgwarden.stack import LocalStack

pytestmark = pytest.mark.integration

CONNECT_TIMEOUT = 30
AUDIT_WAIT = 60.0  # the taps flush audit events asynchronously


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------- helpers


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def connect(stack: LocalStack, mode: str, token: str, **params: Any) -> psycopg.Connection[Any]:
    dsn = agent_dsn(stack, mode, connect_timeout=CONNECT_TIMEOUT, **params)
    return psycopg.connect(dsn, password=token, autocommit=True)


def dsn_parts(stack: LocalStack, mode: str) -> dict[str, Any]:
    return dict(conninfo_to_dict(agent_dsn(stack, mode)))


def client_ssl_context(stack: LocalStack) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(stack.certs.ca))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def _asyncpg_connect(stack: LocalStack, mode: str, token: str,
                           user: str = "agent", ssl_mode: Any = None) -> asyncpg.Connection:
    parts = dsn_parts(stack, mode)
    return await asyncpg.connect(
        host=parts["host"], port=int(parts["port"]), user=user, database=parts["dbname"],
        password=token, ssl=client_ssl_context(stack) if ssl_mode is None else ssl_mode,
        timeout=CONNECT_TIMEOUT,
    )


def audit_db(stack: LocalStack) -> str:
    url = audit_url(stack)
    assert url.startswith("sqlite:///"), url
    return url[len("sqlite:///"):]


def audit_rows(stack: LocalStack, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(audit_db(stack), timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


def wait_audit(stack: LocalStack, sql: str, params: tuple[Any, ...] = (),
               until: Callable[[list[sqlite3.Row]], bool] = bool) -> list[sqlite3.Row]:
    """Poll the audit store (bounded) until ``until(rows)``; return the last rows."""
    deadline = time.monotonic() + AUDIT_WAIT
    rows: list[sqlite3.Row] = []
    while time.monotonic() < deadline:
        try:
            rows = audit_rows(stack, sql, params)
        except sqlite3.OperationalError:  # table not created yet, or busy
            rows = []
        if until(rows):
            return rows
        time.sleep(0.3)
    return rows


def session_ids_for(stack: LocalStack, subject: str, expected: int = 1) -> list[str]:
    rows = wait_audit(stack, "SELECT session_id FROM audit_sessions WHERE subject = ?",
                      (subject,), until=lambda r: len(r) >= expected)
    return [r["session_id"] for r in rows]


# --------------------------------------------------------------------------- clients connect


def test_psycopg_connects_with_token_as_mapped_role(stack: LocalStack, mode: str) -> None:
    token = mint(stack, unique("fraud-bot"), ["fraud-readers"])
    with connect(stack, mode, token) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("fraud_reader",)
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT count(*) FROM payments WHERE id <= 3").fetchone() == (3,)


def test_psql_connects_with_token_in_pgpassword(stack: LocalStack, mode: str) -> None:
    token = mint(stack, unique("fraud-bot"), ["fraud-readers"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=token, PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT), LC_ALL="C.UTF-8")
    dsn = agent_dsn(stack, mode)
    done = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn,
                           "-c", "SELECT current_user"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fraud_reader"
    assert token not in done.stdout + done.stderr


def test_asyncpg_connects_with_token(stack: LocalStack, mode: str) -> None:
    token = mint(stack, unique("fraud-bot"), ["fraud-readers"])

    async def run() -> tuple[str, int]:
        conn = await _asyncpg_connect(stack, mode, token)
        try:
            role = await conn.fetchval("SELECT current_user")
            stmt = await conn.prepare("SELECT count(*) FROM payments WHERE id <= $1")
            n = await stmt.fetchval(5)
            return str(role), int(n)
        finally:
            await conn.close(timeout=10)

    assert asyncio.run(run()) == ("fraud_reader", 5)


def test_pg8000_connects_with_token(stack: LocalStack, mode: str) -> None:
    token = mint(stack, unique("fraud-bot"), ["fraud-readers"])
    parts = dsn_parts(stack, mode)
    conn = pg8000.native.Connection(
        user="agent", host=parts["host"], port=int(parts["port"]), database=parts["dbname"],
        password=token, ssl_context=client_ssl_context(stack), timeout=CONNECT_TIMEOUT,
    )
    try:
        assert conn.run("SELECT current_user") == [["fraud_reader"]]
    finally:
        conn.close()


def test_agent_dsn_holds_no_database_password(stack: LocalStack, mode: str) -> None:
    dsn = agent_dsn(stack, mode)
    parts = conninfo_to_dict(dsn)
    assert "password" not in parts and "passfile" not in parts
    assert parts["sslmode"] == "verify-full"
    for role, secret in stack.secrets.passwords.items():
        assert secret not in dsn, f"the agent DSN carries {role}'s database password"


def test_payments_writer_maps_to_its_own_role(stack: LocalStack, mode: str) -> None:
    token = mint(stack, unique("writer-bot"), ["payments-writers"])
    with connect(stack, mode, token) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("payments_writer",)


# --------------------------------------------------------------------------- bad tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _claims(stack: LocalStack, sub: str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer(stack).issuer, "sub": sub, "aud": "pgwarden", "iat": now, "nbf": now,
        "exp": now + 600, "jti": uuid.uuid4().hex, "groups": ["fraud-readers"], "kind": "agent",
    }
    claims.update(over)
    return claims


def _expired(stack: LocalStack, sub: str) -> str:
    now = int(time.time())
    return issuer(stack).sign(_claims(stack, sub, iat=now - 7200, nbf=now - 7200,
                                      exp=now - 3600))


def _not_yet_valid(stack: LocalStack, sub: str) -> str:
    now = int(time.time())
    return issuer(stack).sign(_claims(stack, sub, nbf=now + 3600, exp=now + 7200))


def _wrong_issuer(stack: LocalStack, sub: str) -> str:
    return issuer(stack).sign(_claims(stack, sub, iss="https://evil-issuer.example"))


def _wrong_audience(stack: LocalStack, sub: str) -> str:
    return issuer(stack).sign(_claims(stack, sub, aud="some-other-service"))


def _tampered_payload(stack: LocalStack, sub: str) -> str:
    header, payload, sig = mint(stack, sub, ["fraud-readers"]).split(".")
    claims = json.loads(_unb64(payload))
    claims["groups"] = ["dba"]  # escalate, keep the original signature
    return ".".join([header, _b64(json.dumps(claims).encode()), sig])


def _tampered_signature(stack: LocalStack, sub: str) -> str:
    header, payload, sig = mint(stack, sub, ["fraud-readers"]).split(".")
    raw = bytearray(_unb64(sig))
    raw[0] ^= 0x01
    return ".".join([header, payload, _b64(bytes(raw))])


def _unsigned(stack: LocalStack, sub: str) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": issuer(stack).current_kid}
    return ".".join([_b64(json.dumps(header).encode()),
                     _b64(json.dumps(_claims(stack, sub)).encode()), ""])


def _unknown_key(stack: LocalStack, sub: str) -> str:
    stranger = ed25519.Ed25519PrivateKey.generate()
    return jwt.encode(_claims(stack, sub), stranger, algorithm="EdDSA",
                      headers={"kid": "no-such-key-" + uuid.uuid4().hex[:8], "typ": "JWT"})


def _hmac_key_confusion(stack: LocalStack, sub: str) -> str:
    """HS256 signed with the issuer's *public* key as the shared secret: the
    classic key-confusion forgery anyone holding the JWKS could make."""
    jwk = issuer(stack).public_jwks()["keys"][-1]
    header = {"alg": "HS256", "typ": "JWT", "kid": jwk["kid"]}
    return jwt.api_jws.encode(json.dumps(_claims(stack, sub)).encode(), jwk["x"].encode(),
                              algorithm="HS256", headers=header)


def _missing_exp(stack: LocalStack, sub: str) -> str:
    claims = _claims(stack, sub)
    del claims["exp"]
    return issuer(stack).sign(claims)


def _garbage(_stack: LocalStack, _sub: str) -> str:
    return "this-is-not-a-token-" + uuid.uuid4().hex


BAD_TOKENS: dict[str, tuple[Callable[[LocalStack, str], str], str]] = {
    "expired": (_expired, "expired"),
    "not_yet_valid": (_not_yet_valid, "not_yet_valid"),
    "wrong_issuer": (_wrong_issuer, "wrong_issuer"),
    "wrong_audience": (_wrong_audience, "wrong_audience"),
    "tampered_payload": (_tampered_payload, "bad_signature"),
    "tampered_signature": (_tampered_signature, "bad_signature"),
    "unsigned_alg_none": (_unsigned, "unsigned"),
    "unknown_kid": (_unknown_key, "unknown_key"),
    "garbage": (_garbage, "malformed"),
    "hmac_key_confusion": (_hmac_key_confusion, "disallowed_alg"),
    "missing_exp": (_missing_exp, "missing_claim"),
}

# Words that would tell an attacker why the token failed.
_REVEALING = ("expired", "signature", "issuer", "audience", "kid", "not yet", "nbf", "alg",
              "malformed", "jwks", "claim", "unknown key")


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_token_refused_with_28p01_and_reason_recorded(stack: LocalStack, mode: str,
                                                          case: str) -> None:
    make, reason = BAD_TOKENS[case]
    # A valid login first: it clears the per-source failure slow-down, and
    # shows that the gateway accepts good tokens next to the bad one.
    with connect(stack, mode, mint(stack, unique("good-bot"), ["fraud-readers"])) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("fraud_reader",)

    sub = unique("bad-bot")
    token = make(stack, sub)
    user = unique("agent")  # the startup user name finds the audit record

    async def attempt() -> BaseException:
        try:
            conn = await _asyncpg_connect(stack, mode, token, user=user)
        except BaseException as exc:
            return exc
        await conn.close()
        raise AssertionError(f"{case}: a bad token was accepted")

    exc = asyncio.run(attempt())
    assert isinstance(exc, asyncpg.PostgresError), repr(exc)
    assert exc.sqlstate == "28P01", (case, exc.sqlstate, str(exc))
    text = str(exc)
    for part in [p for p in token.split(".") if len(p) >= 8] + [sub]:
        assert part not in text, f"{case}: the error repeats part of the token"
    lowered = text.lower()
    for word in _REVEALING:
        assert word not in lowered, f"{case}: the error hints at the cause ({word!r}): {text}"

    # psycopg sees the same generic refusal.
    with pytest.raises(psycopg.OperationalError) as info:
        connect(stack, mode, token, user=user)
    assert "authentication failed" in str(info.value)
    assert token not in str(info.value)

    rows = wait_audit(stack, "SELECT outcome, reason FROM audit_auth_events WHERE user = ?",
                      (user,), until=lambda r: len(r) >= 2)
    assert rows, f"{case}: no auth event recorded for the refused login"
    assert {(r["outcome"], r["reason"]) for r in rows} == {("failure", reason)}, \
        [dict(r) for r in rows]
    stored = audit_rows(stack, "SELECT * FROM audit_auth_events WHERE user = ?", (user,))
    assert token not in json.dumps([dict(r) for r in stored])


def test_valid_login_is_recorded_as_success(stack: LocalStack, mode: str) -> None:
    sub = unique("audited-bot")
    user = unique("u-ok")
    with connect(stack, mode, mint(stack, sub, ["fraud-readers"]), user=user) as conn:
        conn.execute("SELECT 1")
    rows = wait_audit(stack, "SELECT outcome, subject FROM audit_auth_events WHERE user = ?",
                      (user,))
    assert [(r["outcome"], r["subject"]) for r in rows] == [("success", sub)]


# --------------------------------------------------------------------------- rotation


def test_key_rotation_is_followed_without_restart(stack: LocalStack, mode: str) -> None:
    before = mint(stack, unique("pre-rotation"), ["fraud-readers"])
    old_kid = issuer(stack).current_kid
    new_kid = issuer(stack).rotate()
    assert new_kid != old_kid
    fresh = mint(stack, unique("post-rotation"), ["fraud-readers"])
    assert json.loads(_unb64(fresh.split(".")[0]))["kid"] == new_kid
    with connect(stack, mode, fresh) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("fraud_reader",)
    # A token signed before the rotation stays valid through the grace period.
    with connect(stack, mode, before) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("fraud_reader",)


# --------------------------------------------------------------------------- expiry, TLS


def test_session_outliving_token_is_ended(stack: LocalStack, mode: str) -> None:
    sub = unique("short-lived")
    token = mint(stack, sub, ["fraud-readers"], ttl=4)
    exp = json.loads(_unb64(token.split(".")[1]))["exp"]
    conn = connect(stack, mode, token)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        while time.time() < exp + 1:
            time.sleep(0.5)
        error: BaseException | None = None
        deadline = time.monotonic() + 90  # leeway, if any, is small
        while time.monotonic() < deadline:
            try:
                conn.execute("SELECT 1")
            except psycopg.Error as exc:
                error = exc
                break
            time.sleep(1)
        assert error is not None, "the session went on after its token expired"
        assert isinstance(error, psycopg.OperationalError), repr(error)
        assert "expired" in str(error), str(error)
        assert conn.closed
    finally:
        conn.close()
    sid = session_ids_for(stack, sub)[0]
    ends = wait_audit(stack, "SELECT reason FROM audit_session_ends WHERE session_id = ?",
                      (sid,))
    assert [r["reason"] for r in ends] == ["token_expired"]


def test_plaintext_is_refused(stack: LocalStack, mode: str) -> None:
    token = mint(stack, unique("plain-bot"), ["fraud-readers"])
    with pytest.raises(psycopg.OperationalError) as info:
        connect(stack, mode, token, sslmode="disable")
    assert "TLS" in str(info.value) or "ssl" in str(info.value).lower()

    async def attempt() -> BaseException:
        try:
            conn = await _asyncpg_connect(stack, mode, token, ssl_mode=False)
        except BaseException as exc:
            return exc
        await conn.close()
        raise AssertionError("a plaintext connection was accepted")

    exc = asyncio.run(attempt())
    assert isinstance(exc, asyncpg.PostgresError), repr(exc)
    assert exc.sqlstate == "28000", (exc.sqlstate, str(exc))


# --------------------------------------------------------------------------- groups


@pytest.fixture
def merchant_tag(stack: LocalStack) -> Iterator[str]:
    tag = unique("pgwarden-identity-test")
    yield tag
    with psycopg.connect(stack.upstream_dsn, dbname="shop", autocommit=True) as admin:
        admin.execute("DELETE FROM payments WHERE merchant = %s", (tag,))


def _payments_with(stack: LocalStack, tag: str) -> int:
    with psycopg.connect(stack.upstream_dsn, dbname="shop") as admin:
        row = admin.execute("SELECT count(*) FROM payments WHERE merchant = %s",
                            (tag,)).fetchone()
    assert row is not None
    return int(row[0])


def test_groups_change_the_outcome(stack: LocalStack, mode: str, merchant_tag: str) -> None:
    insert = ("INSERT INTO payments (card_number, cardholder, amount, merchant) "
              f"VALUES ('tok_not_a_pan', 'Group Test', 12.34, '{merchant_tag}')")
    reader = mint(stack, unique("fraud-bot"), ["fraud-readers"])
    with connect(stack, mode, reader) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(insert)
        assert info.value.sqlstate == "42501"
        assert conn.execute("SELECT 1").fetchone() == (1,)  # still usable
    assert _payments_with(stack, merchant_tag) == 0

    writer = mint(stack, unique("writer-bot"), ["payments-writers"])
    with connect(stack, mode, writer) as conn:
        cur = conn.execute(insert)
        assert cur.rowcount == 1
    assert _payments_with(stack, merchant_tag) == 1


# --------------------------------------------------------------------------- who decides the role


def test_client_cannot_choose_its_role(stack: LocalStack, mode: str) -> None:
    """The startup user name and ``options`` are the client's wish, not its
    role: the gateway logs in as the role the policy maps the groups to."""
    token = mint(stack, unique("fraud-bot"), ["fraud-readers"])
    with connect(stack, mode, token, user="dba_role",
                 options="-c role=dba_role -c search_path=pg_temp,public") as conn:
        assert conn.execute("SELECT current_user, session_user").fetchone() == \
            ("fraud_reader", "fraud_reader")
        row = conn.execute("SELECT current_setting('search_path')").fetchone()
        assert row is not None and "pg_temp" not in row[0]


@pytest.mark.parametrize(("groups", "dbname"), [
    (["approvers"], "shop"),
    ([], "shop"),
    (["fraud-readers"], "postgres"),
], ids=["approvers-may-not-query", "no-groups", "database-not-granted"])
def test_connect_decision_refuses_with_28000(stack: LocalStack, mode: str,
                                             groups: list[str], dbname: str) -> None:
    token = mint(stack, unique("no-entry"), groups)
    parts = dsn_parts(stack, mode)

    async def attempt() -> BaseException:
        try:
            conn = await asyncpg.connect(
                host=parts["host"], port=int(parts["port"]), user="agent", database=dbname,
                password=token, ssl=client_ssl_context(stack), timeout=CONNECT_TIMEOUT)
        except BaseException as exc:
            return exc
        await conn.close()
        raise AssertionError(f"{groups} connected to {dbname}")

    exc = asyncio.run(attempt())
    assert isinstance(exc, asyncpg.PostgresError), repr(exc)
    assert exc.sqlstate == "28000", (exc.sqlstate, str(exc))
