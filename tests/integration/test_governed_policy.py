"""Policy enforcement through the real governed gateway (issue 3, "How it must
be checked").

Every refusal is checked the way a user and an auditor would: the client gets
SQLSTATE 42501, the connection stays usable, and PostgreSQL's own log
(log_statement=all) never shows the refused text. The tap sends a marker
(``pgwarden_refused_<nonce>``) in the refused statement's place; that marker
may appear in the log, the statement may not.

Most refusals are tried as ``dba``, the group allowed everything but the
always-blocked list, so a refusal there is the block list at work and not
the default deny. Tricks that only matter for a restricted group (search_path,
CTEs with DML, user functions) are tried as ``fraud-readers``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from agent import MODES, agent_dsn, mint, policyd_target
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from pgwarden.stack import ROOT, LocalStack

pytestmark = pytest.mark.integration

CONNECT_TIMEOUT = 30
LOG_WAIT = 20.0
GROUP = {"dba": ["dba"], "reader": ["fraud-readers"], "writer": ["payments-writers"]}


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------- helpers


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def token_for(stack: LocalStack, who: str) -> str:
    return mint(stack, unique(f"policy-{who}"), GROUP[who])


def connect(stack: LocalStack, mode: str, who: str, **params: Any) -> psycopg.Connection[Any]:
    dsn = agent_dsn(stack, mode, connect_timeout=CONNECT_TIMEOUT, **params)
    return psycopg.connect(dsn, password=token_for(stack, who), autocommit=True)


def probe(stack: LocalStack, conn: psycopg.Connection[Any], mark: int) -> str:
    """Run an allowed statement with a unique text and wait until PostgreSQL's
    log shows it: proof that the log covers the window we inspect (an absent
    statement means something only if a present one shows up)."""
    # Letters only: a long digit run can pass the Luhn check by chance and be
    # masked as a PAN (rightly).
    tag = uuid.uuid4().hex.translate(str.maketrans("0123456789", "ghijklmnop"))
    text = f"SELECT 'probe-{tag}' AS probe"
    assert conn.execute(text).fetchone() == (f"probe-{tag}",)
    deadline = time.monotonic() + LOG_WAIT
    while time.monotonic() < deadline:
        log = stack.pg_log_since(mark)
        if text in log:
            return log
        time.sleep(0.2)
    raise AssertionError("PostgreSQL's log does not show an allowed statement: cannot prove "
                         "anything about refused ones")


def assert_never_reached(stack: LocalStack, conn: psycopg.Connection[Any], mark: int,
                         *texts: str) -> None:
    log = probe(stack, conn, mark)
    for text in texts:
        assert text not in log, f"PostgreSQL saw a refused statement: {text!r}"


def assert_refused(exc: BaseException) -> None:
    assert isinstance(exc, psycopg.errors.InsufficientPrivilege), repr(exc)
    assert exc.sqlstate == "42501"


@pytest.fixture
def merchant_tag(stack: LocalStack) -> Iterator[str]:
    """A merchant name that marks rows a test tries to insert (cleaned up)."""
    tag = unique("pgwarden-policy-test")
    yield tag
    with psycopg.connect(stack.upstream_dsn, dbname="shop", autocommit=True) as admin:
        admin.execute("DELETE FROM payments WHERE merchant = %s", (tag,))


def payments_with(stack: LocalStack, tag: str) -> int:
    with psycopg.connect(stack.upstream_dsn, dbname="shop") as admin:
        row = admin.execute("SELECT count(*) FROM payments WHERE merchant = %s",
                            (tag,)).fetchone()
    assert row is not None
    return int(row[0])


def insert_sql(tag: str) -> str:
    return ("INSERT INTO payments (card_number, cardholder, amount, merchant) "
            f"VALUES ('tok_not_a_pan', 'Policy Test', 1.00, '{tag}')")


# --------------------------------------------------------------------------- allowed


ALLOWED = [
    ("reader", "SELECT id, amount FROM payments WHERE id <= 5 ORDER BY id", 5),
    ("reader", "SELECT count(*) FROM payments WHERE amount < 100", 1),
    ("reader", "SELECT id, card_number FROM payments ORDER BY id LIMIT 3", 3),
    ("writer", "SELECT 1", 1),
    ("dba", "SELECT id, name FROM customers ORDER BY id LIMIT 2", 2),
]


@pytest.mark.parametrize(("who", "sql", "rows"), ALLOWED, ids=[f"{w}-{i}" for i, (w, _, _)
                                                                 in enumerate(ALLOWED)])
def test_allowed_statements_work(stack: LocalStack, mode: str, who: str, sql: str,
                                 rows: int) -> None:
    mark = stack.pg_log_mark()
    with connect(stack, mode, who) as conn:
        assert len(conn.execute(sql).fetchall()) == rows
        log = probe(stack, conn, mark)
    assert sql in log


def test_allowed_write_for_payments_writers(stack: LocalStack, mode: str,
                                            merchant_tag: str) -> None:
    with connect(stack, mode, "writer") as conn:
        assert conn.execute(insert_sql(merchant_tag)).rowcount == 1
    assert payments_with(stack, merchant_tag) == 1


# --------------------------------------------------------------------------- always blocked


ALWAYS_BLOCKED = [
    "DROP DATABASE shop",
    "DROP DATABASE IF EXISTS pgwarden_scratch",
    "ALTER ROLE fraud_reader SUPERUSER",
    "ALTER USER app WITH PASSWORD 'not-a-real-password'",
    "CREATE ROLE pgwarden_evil LOGIN",
    "CREATE USER pgwarden_evil2",
    "DROP ROLE payments_writer",
    "DROP USER IF EXISTS app",
    "GRANT ALL ON payments TO fraud_reader",
    "GRANT dba_role TO fraud_reader",
    "REVOKE SELECT ON payments FROM fraud_reader",
    "COPY payments TO PROGRAM 'cat > /tmp/pgwarden-stolen'",
    "COPY (SELECT 1) TO PROGRAM 'id'",
    "COPY payments FROM PROGRAM 'echo 1'",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_read_binary_file('/etc/passwd')",
    "SELECT pg_ls_dir('.')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_export(12345, '/tmp/pgwarden-lo')",
    "ALTER SYSTEM SET log_statement = 'none'",
    "ALTER SYSTEM RESET ALL",
    "CREATE FUNCTION pgwarden_py() RETURNS int LANGUAGE plpython3u AS $$ return 1 $$",
    "CREATE OR REPLACE FUNCTION pgwarden_c() RETURNS int LANGUAGE c AS 'libc', 'getpid'",
    "DO $$ BEGIN PERFORM 1; END $$",
    "DO LANGUAGE plpgsql $$ BEGIN EXECUTE 'DROP DATABASE shop'; END $$",
]


@pytest.mark.parametrize("sql", ALWAYS_BLOCKED)
def test_always_blocked_never_reaches_postgres(stack: LocalStack, mode: str, sql: str) -> None:
    mark = stack.pg_log_mark()
    with connect(stack, mode, "dba") as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(sql)
        assert_refused(info.value)
        message = str(info.value)
        assert "blocked" in message, message
        # The refusal names the decision an auditor can look up.
        assert "decision " in (info.value.diag.message_detail or ""), info.value.diag.message_detail
        # The connection stays usable.
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        assert_never_reached(stack, conn, mark, sql)


# --------------------------------------------------------------------------- transactions


def test_refusal_inside_transaction_fails_it_on_both_sides(stack: LocalStack, mode: str,
                                                           merchant_tag: str) -> None:
    refused = "SELECT pg_read_file('/etc/passwd')"
    mark = stack.pg_log_mark()
    with connect(stack, mode, "dba") as conn:
        conn.execute("BEGIN")
        conn.execute(insert_sql(merchant_tag))
        with pytest.raises(psycopg.Error) as info:
            conn.execute(refused)
        assert_refused(info.value)
        assert conn.info.transaction_status == TransactionStatus.INERROR
        # The server agrees: its transaction is aborted too.
        with pytest.raises(psycopg.errors.InFailedSqlTransaction) as failed:
            conn.execute("SELECT 1")
        assert failed.value.sqlstate == "25P02"
        conn.execute("ROLLBACK")
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.execute("SELECT 2").fetchone() == (2,)
        assert_never_reached(stack, conn, mark, refused)
    assert payments_with(stack, merchant_tag) == 0


def test_commit_after_refusal_rolls_back(stack: LocalStack, mode: str,
                                         merchant_tag: str) -> None:
    with connect(stack, mode, "dba") as conn:
        conn.execute("BEGIN")
        conn.execute(insert_sql(merchant_tag))
        with pytest.raises(psycopg.Error) as info:
            conn.execute("GRANT ALL ON payments TO fraud_reader")
        assert_refused(info.value)
        cur = conn.execute("COMMIT")
        assert cur.statusmessage == "ROLLBACK"
        assert conn.info.transaction_status == TransactionStatus.IDLE
    assert payments_with(stack, merchant_tag) == 0


def test_multi_statement_query_with_one_refused_runs_none(stack: LocalStack, mode: str,
                                                          merchant_tag: str) -> None:
    insert = insert_sql(merchant_tag)
    multi = f"{insert}; SELECT pg_ls_dir('.'); SELECT 1"
    mark = stack.pg_log_mark()
    with connect(stack, mode, "dba") as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(multi)  # no parameters: one simple-protocol Query message
        assert_refused(info.value)
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert_never_reached(stack, conn, mark, insert, "pg_ls_dir")
    assert payments_with(stack, merchant_tag) == 0


# --------------------------------------------------------------------------- extended protocol


def test_extended_protocol_refusal_psycopg_prepared(stack: LocalStack, mode: str) -> None:
    mark = stack.pg_log_mark()
    with connect(stack, mode, "dba") as conn:
        for _ in range(2):  # twice: a refused Parse must leave no half-prepared state
            with pytest.raises(psycopg.Error) as info:
                conn.execute("SELECT pg_read_file(%s)", ("/etc/passwd",), prepare=True)
            assert_refused(info.value)
        assert conn.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone() == (42,)
        assert conn.execute("SELECT %s::int + 1", (1,), prepare=True).fetchone() == (2,)
        assert_never_reached(stack, conn, mark, "pg_read_file")


def _raw_pans(stack: LocalStack, ids: tuple[int, ...]) -> list[str]:
    with psycopg.connect(stack.upstream_dsn, dbname="shop") as su:
        rows = su.execute("SELECT card_number FROM payments WHERE id = ANY(%s)",
                          (list(ids),)).fetchall()
    assert len(rows) == len(ids)
    return [r[0] for r in rows]


def test_protocol_bind_to_a_sql_prepared_statement_is_decided(stack: LocalStack,
                                                              mode: str) -> None:
    """SQL-level PREPARE and protocol-level Bind share one namespace of
    statement names: a client can PREPARE a text in a simple Query and then
    run it with Bind/Execute (here libpq's PQexecPrepared), with parameter
    values the policy never saw at PREPARE time. Such a Bind is decided like
    SQL ``EXECUTE name`` in a later message: opaque to the policy, so refused
    (42501), and PostgreSQL never executes it. (Before, it ran undecided and
    its rows came back unmasked: a raw PAN to a fraud-reader.)"""
    tag = uuid.uuid4().hex.translate(str.maketrans("0123456789", "ghijklmnop"))
    name = f"pgw_sqlprep_{tag}"
    pans = _raw_pans(stack, (1,))
    mark = stack.pg_log_mark()
    with connect(stack, mode, "reader") as conn:
        conn.execute(f"PREPARE {name} AS SELECT id, card_number, '{tag}' AS tag "
                     "FROM payments WHERE id = $1")
        result = conn.pgconn.exec_prepared(name.encode(), [b"1"])
        shown = [result.get_value(r, c) for r in range(result.ntuples)
                 for c in range(result.nfields)]
        assert not any(p.encode() in (v or b"") for p in pans for v in shown), "a raw PAN"
        assert result.status == psycopg.pq.ExecStatus.FATAL_ERROR, result.status
        assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42501"
        assert conn.pgconn.transaction_status == TransactionStatus.IDLE
        # The session carries on; SQL EXECUTE of it is refused the same way.
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f"EXECUTE {name}(1)")
        assert_refused(info.value)
        log = probe(stack, conn, mark)
    assert f"execute {name}" not in log, "PostgreSQL executed the SQL-prepared statement"


def test_a_protocol_statement_replaced_in_sql_is_decided_again(stack: LocalStack,
                                                                mode: str) -> None:
    """psycopg prepares a statement at the protocol level (``_pg3_0``); the
    agent then replaces it in SQL (DEALLOCATE, PREPARE under the same name)
    with another text. psycopg's next execution Binds the name it cached:
    the tap must not run the new text under the old text's decision."""
    tag = uuid.uuid4().hex.translate(str.maketrans("0123456789", "ghijklmnop"))
    mark = stack.pg_log_mark()
    with connect(stack, mode, "reader") as conn:
        query = "SELECT %s::int + 1 AS n"
        for _ in range(2):
            assert conn.execute(query, (41,), prepare=True).fetchone() == (42,)
        name = conn.execute("SELECT name FROM pg_prepared_statements "
                            "WHERE NOT from_sql").fetchone()
        assert name is not None
        conn.execute(f"DEALLOCATE {name[0]}; PREPARE {name[0]} AS "
                     f"SELECT id, '{tag}' AS tag FROM payments WHERE id = $1")
        with pytest.raises(psycopg.Error) as info:
            conn.execute(query, (1,), prepare=True).fetchall()
        assert_refused(info.value)
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
        log = probe(stack, conn, mark)
    assert not [line for line in log.splitlines() if "execute" in line and tag in line
                and "PREPARE" in line.split("execute", 1)[1][:80]], "the replaced text ran"


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_protocol_execute_of_a_cursor_declared_in_sql_is_masked(stack: LocalStack,
                                                                 mode: str, binary: bool) -> None:
    """A cursor from SQL DECLARE is a portal: a protocol Execute naming it
    reads its rows without any FETCH text. The tap decides it as the FETCH it
    is and masks the rows; the cursor's card numbers never come back raw,
    also from a BINARY cursor holding them as int8. (PostgreSQL 15 answers
    a protocol Execute of a BINARY cursor in text: the binary option applies
    to FETCH. The tap would mask binary values by the types its Describe of
    the portal reports: tests/unit/test_sql_level_names.py.)"""
    from test_protocol_errors import Wire, error_fields, message

    ids = (1, 2, 3)
    pans = _raw_pans(stack, ids)
    parts = conninfo_to_dict(agent_dsn(stack, mode))
    w = Wire(str(parts["host"]), int(str(parts["port"])))
    try:
        w.start_tls()
        w.login("agent", token_for(stack, "reader"), "shop", unique("pgw-declare"))
        declare = ("DECLARE pgw_c BINARY CURSOR FOR SELECT id, card_number::int8 "
                   if binary else "DECLARE pgw_c CURSOR FOR SELECT id, card_number ")
        for sql in ("BEGIN", declare + "FROM payments WHERE id IN (1, 2, 3) ORDER BY id"):
            replies = w.query(sql)
            assert not [error_fields(b) for k, b in replies if k == b"E"], sql
        w.send(message(b"E", b"pgw_c\0" + struct.pack("!i", 0)) + message(b"S", b""))
        replies = []
        while (m := w.read_message()) is not None:
            replies.append(m)
            if m[0] == b"Z":
                break
        assert not [error_fields(b) for k, b in replies if k == b"E"], replies
        rows = [b for k, b in replies if k == b"D"]
        assert len(rows) == len(ids), replies
        everything = b"".join(b for _, b in replies)
        for pan in pans:
            assert pan.encode() not in everything, "a raw PAN through Execute of a cursor"
            assert int(pan).to_bytes(8, "big") not in everything, "a raw binary PAN"
            assert pan[-4:].encode() in everything  # masked, last four kept
        assert [k for k, _ in w.query("COMMIT")][-1] == b"Z"
    finally:
        w.close()


def _asyncpg_kwargs(stack: LocalStack, mode: str, token: str) -> dict[str, Any]:
    import ssl

    parts = conninfo_to_dict(agent_dsn(stack, mode))
    ctx = ssl.create_default_context(cafile=str(stack.certs.ca))
    return {"host": parts["host"], "port": int(parts["port"]), "user": "agent",
            "database": parts["dbname"], "password": token, "ssl": ctx,
            "timeout": CONNECT_TIMEOUT}


def test_extended_protocol_refusal_asyncpg(stack: LocalStack, mode: str) -> None:
    token = token_for(stack, "dba")
    mark = stack.pg_log_mark()

    async def run() -> None:
        conn = await asyncpg.connect(**_asyncpg_kwargs(stack, mode, token))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.prepare("SELECT pg_ls_dir($1)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("SELECT lo_import($1)", "/etc/passwd")
            async with conn.transaction():
                assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
            stmt = await conn.prepare("SELECT count(*) FROM payments WHERE id <= $1")
            assert await stmt.fetchval(3) == 3
        finally:
            await conn.close(timeout=10)

    asyncio.run(run())
    with connect(stack, mode, "dba") as conn:
        assert_never_reached(stack, conn, mark, "pg_ls_dir", "lo_import")


def test_pipelined_batch_skips_to_sync(stack: LocalStack, mode: str, merchant_tag: str) -> None:
    insert = insert_sql(merchant_tag)
    mark = stack.pg_log_mark()
    with connect(stack, mode, "dba") as conn:
        with pytest.raises(psycopg.Error) as info:
            with conn.pipeline():
                conn.execute("SELECT %s::int", (1,))
                conn.execute("SELECT pg_read_file(%s)", ("/etc/passwd",))
                conn.execute(insert)
                conn.execute("SELECT %s::int", (3,))
        assert_refused(info.value)
        assert conn.info.transaction_status == TransactionStatus.IDLE
        # After the Sync the connection works, pipelined or not.
        with conn.pipeline():
            cur = conn.execute("SELECT %s::int", (7,))
        assert cur.fetchone() == (7,)
        assert_never_reached(stack, conn, mark, "pg_read_file", merchant_tag)
    assert payments_with(stack, merchant_tag) == 0


# --------------------------------------------------------------------------- evasion corpus


@dataclass(frozen=True)
class Evasion:
    name: str
    who: str
    sql: str
    never: tuple[str, ...] = ()  # fragments PostgreSQL must not see besides the whole text


EVASIONS = [
    # comments and layout
    Evasion("block-comment", "dba", "/* harmless */ DROP /* really */ DATABASE shop"),
    Evasion("line-comment", "dba", "-- just a comment\nDROP DATABASE shop"),
    Evasion("nested-comment", "dba", "/* a /* nested */ comment */ ALTER ROLE app SUPERUSER"),
    Evasion("whitespace", "dba", "ALTER\n\tSYSTEM\n  SET\twork_mem = '1MB'"),
    # case and quoting games
    Evasion("mixed-case", "dba", "dRoP dAtAbAsE shop"),
    Evasion("quoted-database", "dba", 'DROP DATABASE "shop"'),
    Evasion("upper-function", "dba", "SELECT PG_READ_FILE('/etc/passwd')"),
    Evasion("quoted-function", "dba", "SELECT \"pg_read_file\"('/etc/passwd')"),
    Evasion("quoted-role", "dba", 'ALTER ROLE "fraud_reader" WITH "superuser"'),
    Evasion("copy-program-lower", "dba", "copy (select 1) to program 'id'"),
    Evasion("copy-server-file", "dba", "COPY payments TO '/tmp/pgwarden-copy'"),
    # schema-qualified and search_path tricks
    Evasion("qualified-read-file", "dba", "SELECT pg_catalog.pg_read_file('/etc/passwd')"),
    Evasion("quoted-qualified", "dba", 'SELECT "pg_catalog"."pg_ls_dir"(\'.\')'),
    Evasion("function-in-from", "dba", "SELECT * FROM pg_read_file('/etc/passwd') AS f"),
    Evasion("function-in-subquery", "dba",
            "SELECT (SELECT pg_ls_dir('.') LIMIT 1) AS x"),
    Evasion("binary-file", "dba", "SELECT pg_read_binary_file('/etc/passwd', 0, 10)"),
    Evasion("lo-import-oid", "dba", "SELECT lo_import('/etc/passwd', 424242)"),
    Evasion("search-path-shadow", "reader", "SET search_path = public, pg_catalog"),
    Evasion("search-path-then-read", "reader",
            "SET search_path TO public, pg_catalog; SELECT pg_read_file('/etc/passwd')"),
    Evasion("set-config-search-path", "reader",
            "SELECT set_config('search_path', 'public, pg_catalog', false)"),
    Evasion("set-role", "reader", "SET ROLE dba_role"),
    Evasion("set-role-dba", "dba", "SET ROLE postgres"),
    Evasion("session-authorization", "dba", "SET SESSION AUTHORIZATION postgres"),
    Evasion("set-config-role", "reader", "SELECT set_config('role', 'dba_role', false)"),
    # multi-statement
    Evasion("multi-trailing", "dba", "SELECT 1; DROP DATABASE shop"),
    Evasion("multi-leading", "dba", "CREATE ROLE pgwarden_sneaky; SELECT 1"),
    Evasion("multi-grant", "dba", "SELECT 1;GRANT dba_role TO fraud_reader;SELECT 2"),
    # CTEs with DML
    Evasion("cte-delete", "reader",
            "WITH gone AS (DELETE FROM payments WHERE id = 1 RETURNING id) SELECT * FROM gone"),
    Evasion("cte-update", "reader",
            "WITH x AS (UPDATE payments SET amount = 0 WHERE id = 2 RETURNING id) "
            "SELECT count(*) FROM x"),
    Evasion("cte-insert", "reader",
            "WITH x AS (INSERT INTO payments (card_number, cardholder, amount, merchant) "
            "VALUES ('t', 't', 1, 'evasion') RETURNING id) SELECT id FROM x"),
    Evasion("select-into", "reader",
            "SELECT id INTO pgwarden_copy FROM payments WHERE id < 10"),
    # SQL-level PREPARE / EXECUTE
    Evasion("prepare-forbidden", "dba", "PREPARE pw_read(text) AS SELECT pg_read_file($1)"),
    Evasion("prepare-execute", "dba",
            "PREPARE pw_ls(text) AS SELECT pg_ls_dir($1); EXECUTE pw_ls('.')"),
    Evasion("execute-unknown", "dba", "EXECUTE pgwarden_prepared_elsewhere('x')"),
    Evasion("reader-prepare-write", "reader",
            "PREPARE pw_del AS DELETE FROM payments WHERE id = 1"),
    # functions wrapping forbidden actions / dynamic SQL
    Evasion("sql-function-wrapper", "dba",
            "CREATE FUNCTION pgwarden_wrap(p text) RETURNS text LANGUAGE sql "
            "AS $$ SELECT pg_read_file(p) $$"),
    Evasion("plpgsql-function-wrapper", "dba",
            "CREATE FUNCTION pgwarden_wrap2() RETURNS void LANGUAGE plpgsql "
            "AS $$ BEGIN EXECUTE 'ALTER ROLE app SUPERUSER'; END $$"),
    Evasion("user-function-call", "reader", "SELECT public.pgwarden_wrapped_read('/etc/passwd')"),
    # Unqualified, a user function resolves after pg_catalog: the analysis
    # reports pg_catalog, and only the list of built-in names tells them
    # apart (before the eighth session these ran for fraud-readers).
    Evasion("user-function-unqualified", "reader", "SELECT pgwarden_wrapped_read('/etc/passwd')"),
    Evasion("user-function-upper-case", "reader", "SELECT PGWARDEN_WRAPPED_READ('/etc/passwd')"),
    Evasion("user-function-in-from", "reader",
            "SELECT * FROM pgwarden_wrapped_read('/etc/passwd') AS f"),
    Evasion("query-to-xml", "dba",
            "SELECT query_to_xml('SELECT pg_read_file(''/etc/passwd'')', true, true, '')"),
    Evasion("do-dynamic", "dba",
            "DO $body$ BEGIN EXECUTE 'GR' || 'ANT dba_role TO fraud_reader'; END $body$"),
    Evasion("call-procedure", "reader", "CALL public.pgwarden_missing_proc()"),
    # unicode escapes
    Evasion("unicode-function", "dba", 'SELECT U&"pg_read\\005ffile"(\'/etc/passwd\')'),
    Evasion("unicode-qualified", "dba",
            'SELECT U&"pg\\005fcatalog".U&"pg\\005fls\\005fdir"(\'.\')'),
    Evasion("unicode-uescape", "dba",
            "SELECT U&\"pg!005fread!005ffile\" UESCAPE '!' ('/etc/passwd')"),
    Evasion("unicode-role", "dba", 'ALTER ROLE U&"\\0061pp" SUPERUSER'),
    # forbidden calls hidden in other statement shapes
    Evasion("explain-analyze-delete", "reader", "EXPLAIN ANALYZE DELETE FROM payments WHERE id = 1"),
    Evasion("explain-analyze-read-file", "dba",
            "EXPLAIN ANALYZE SELECT pg_read_file('/etc/passwd')"),
    Evasion("copy-query-read-file", "dba", "COPY (SELECT pg_read_file('/etc/passwd')) TO STDOUT"),
    Evasion("ctas-read-file", "dba",
            "CREATE TABLE pgwarden_loot AS SELECT pg_read_file('/etc/passwd') AS f"),
    Evasion("values-ls-dir", "dba", "VALUES (pg_ls_dir('.'))"),
    Evasion("lo-roundtrip", "dba",
            "SELECT lo_export(lo_import('/etc/passwd'), '/tmp/pgwarden-lo2')"),
    Evasion("lateral-ls-dir", "dba", "SELECT f FROM (VALUES (1)) v, LATERAL pg_ls_dir('.') AS f"),
    Evasion("cast-read-file", "dba", "SELECT CAST(pg_read_file('/etc/passwd') AS text)"),
    Evasion("recursive-cte-read-file", "dba",
            "WITH RECURSIVE r(x) AS (SELECT pg_read_file('/etc/passwd') UNION SELECT x FROM r) "
            "SELECT * FROM r LIMIT 1"),
    Evasion("cursor-ls-dir", "dba",
            "BEGIN; DECLARE pw_c CURSOR FOR SELECT pg_ls_dir('.'); COMMIT"),
    Evasion("copy-from-server-file", "dba", "COPY payments FROM '/etc/passwd'"),
    Evasion("drop-database-force", "dba", "DROP DATABASE IF EXISTS shop WITH (FORCE)"),
    Evasion("plperlu", "dba",
            "CREATE FUNCTION pgwarden_pl() RETURNS int LANGUAGE plperlu AS 'return 1'"),
    Evasion("do-upper-language", "dba", "DO LANGUAGE PLPGSQL $$ BEGIN NULL; END $$"),
    Evasion("load-library", "dba", "LOAD 'auto_explain'"),
    # synonyms of role and grant statements
    Evasion("create-group", "dba", "CREATE GROUP pgwarden_grp"),
    Evasion("alter-group-add-user", "dba", "ALTER GROUP dba_role ADD USER fraud_reader"),
    Evasion("alter-default-privileges", "dba",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO fraud_reader"),
    Evasion("set-role-equals", "dba", "SET role = 'postgres'"),
    Evasion("set-local-role", "dba", "BEGIN; SET LOCAL ROLE postgres; COMMIT"),
    Evasion("set-config-role-dba", "dba", "SELECT set_config('role', 'postgres', false)"),
    Evasion("set-config-session-auth", "dba",
            "SELECT pg_catalog.set_config('session_authorization', 'postgres', false)"),
    # writes and DDL a reader may not run, whatever the spelling
    Evasion("reader-merge", "reader",
            "MERGE INTO payments p USING (SELECT 1 AS id) s ON p.id = s.id "
            "WHEN MATCHED THEN DELETE"),
    Evasion("reader-truncate", "reader", "TRUNCATE payments"),
    Evasion("reader-truncate-only", "reader", "TRUNCATE ONLY public.payments RESTART IDENTITY"),
    # sensitive authentication data (CVV) is never read (PCI DSS 3.3.1)
    Evasion("cvv-column", "dba", "SELECT cvv FROM customers WHERE id = 1"),
    Evasion("cvv-star", "dba", "SELECT * FROM customers WHERE id = 1"),
    Evasion("cvv-quoted", "dba", 'SELECT "cvv" FROM public."customers" WHERE id = 1'),
    Evasion("cvv-unicode", "dba", 'SELECT U&"\\0063vv" FROM customers WHERE id = 1'),
    Evasion("cvv-whole-row", "dba", "SELECT c FROM customers c WHERE c.id = 1"),
    Evasion("cvv-row-to-json", "dba", "SELECT row_to_json(c) FROM customers c WHERE c.id = 1"),
    Evasion("cvv-composite-field", "dba", "SELECT (c).cvv FROM customers c WHERE c.id = 1"),
    Evasion("cvv-subquery", "dba",
            "SELECT s.v FROM (SELECT cvv AS v FROM customers WHERE id = 1) s"),
    Evasion("cvv-cte", "dba", "WITH c AS (SELECT * FROM customers) SELECT cvv FROM c WHERE id = 1"),
    Evasion("cvv-aggregate", "dba", "SELECT string_agg(cvv, ',') FROM customers WHERE id < 3"),
    Evasion("cvv-copy", "dba", "COPY customers (cvv) TO STDOUT"),
    Evasion("cvv-copy-all", "dba", "COPY customers TO STDOUT"),
]


@pytest.fixture(scope="module")
def wrapper_function(stack: LocalStack) -> Iterator[None]:
    """A user function that wraps a forbidden one, made by the superuser, so
    the reader's call of it is a real wrapper (refused as an unknown function)."""
    with psycopg.connect(stack.upstream_dsn, dbname="shop", autocommit=True) as admin:
        admin.execute("SET log_statement = 'none'")
        admin.execute("CREATE OR REPLACE FUNCTION public.pgwarden_wrapped_read(p text) "
                      "RETURNS text LANGUAGE sql AS $$ SELECT pg_read_file(p) $$")
        admin.execute("GRANT EXECUTE ON FUNCTION public.pgwarden_wrapped_read(text) "
                      "TO fraud_reader")
    yield
    with psycopg.connect(stack.upstream_dsn, dbname="shop", autocommit=True) as admin:
        admin.execute("DROP FUNCTION IF EXISTS public.pgwarden_wrapped_read(text)")


@pytest.mark.parametrize("case", EVASIONS, ids=[e.name for e in EVASIONS])
def test_evasion_refused_and_never_reaches_postgres(stack: LocalStack, mode: str, case: Evasion,
                                                    wrapper_function: None) -> None:
    mark = stack.pg_log_mark()
    with connect(stack, mode, case.who) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(case.sql)
        assert_refused(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert_never_reached(stack, conn, mark, case.sql, *case.never)


@pytest.mark.parametrize("case", [e for e in EVASIONS if ";" not in e.sql and
                                  not e.sql.startswith(("PREPARE", "EXECUTE", "SET", "CALL"))],
                         ids=lambda e: e.name)
def test_evasion_in_parse_message_refused(stack: LocalStack, mode: str, case: Evasion,
                                          wrapper_function: None) -> None:
    """The same text as an extended-protocol Parse (psycopg prepare=True)."""
    mark = stack.pg_log_mark()
    with connect(stack, mode, case.who) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(case.sql.replace("%", "%%"), (), prepare=True)
        assert_refused(info.value)
        assert conn.execute("SELECT %s::int", (5,), prepare=True).fetchone() == (5,)
        assert_never_reached(stack, conn, mark, case.sql, *case.never)


# --------------------------------------------------------------------------- approval hold


def _rules() -> dict[str, Any]:
    data = json.loads((ROOT / "rego" / "pgwarden_data" / "rules.json").read_text())
    return dict(data["rules"])


def _approvals(stack: LocalStack, token: str) -> list[dict[str, Any]]:
    env = dict(os.environ, PGWARDEN_TOKEN=token)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pgwarden"), "approvals", "list", "--json",
         "--policyd", policyd_target(stack)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["approvals"])


def _wait_approval(stack: LocalStack, token: str, subject: str,
                   status: str) -> dict[str, Any] | None:
    deadline = time.monotonic() + 30
    seen: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        mine = [a for a in _approvals(stack, token) if a["subject"] == subject]
        if mine:
            seen = mine[0]
            if seen["status"] == status:
                return seen
        time.sleep(0.5)
    return seen


def test_large_amount_read_is_held_and_cancel_ends_it(stack: LocalStack, mode: str) -> None:
    hold = float(_rules()["approval"]["hold_seconds"])
    assert hold > 5, "the hold is too short to cancel during it"
    held_sql = "SELECT * FROM payments WHERE amount > 10000"
    subject = unique("fraud-hold")
    approver = mint(stack, unique("approver"), ["approvers"])
    mark = stack.pg_log_mark()
    conn = psycopg.connect(agent_dsn(stack, mode, connect_timeout=CONNECT_TIMEOUT),
                           password=mint(stack, subject, ["fraud-readers"]), autocommit=True)
    try:
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["rows"] = conn.execute(held_sql).fetchall()
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        # The statement waits for a human: a pending request names it.
        pending = _wait_approval(stack, approver, subject, "pending")
        assert pending is not None and pending["status"] == "pending", pending
        assert "amount" in pending["statement"] and "10000" in pending["statement"]
        time.sleep(2)
        assert worker.is_alive(), f"the held statement ended before any approval: {outcome}"
        conn.cancel_safe(timeout=10)
        worker.join(30)  # bounded: a cancel must not wait for the hold to run out
        assert not worker.is_alive(), "a cancel during the hold did not end the statement"
        assert "rows" not in outcome, "a held statement ran without an approval"
        assert isinstance(outcome.get("error"), psycopg.Error), outcome
        after = _wait_approval(stack, approver, subject, "cancelled")
        assert after is not None and after["status"] == "cancelled", after
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert_never_reached(stack, conn, mark, held_sql)
    finally:
        conn.close()


# Ways of writing "payments above the approval threshold" (or an unbounded read
# of a cardholder table): each must be held for a human, never run at once.
HELD_VARIANTS = [
    ("exponent", "SELECT * FROM payments WHERE amount > 1e4", None),
    ("flipped", "SELECT * FROM payments WHERE 10000 < amount", None),
    ("decimal", "SELECT * FROM payments WHERE amount >= 10000.01", None),
    ("between", "SELECT * FROM payments WHERE amount BETWEEN 10001 AND 60000", None),
    ("negated", "SELECT * FROM payments WHERE NOT (amount <= 10000)", None),
    ("cast", "SELECT * FROM payments WHERE amount::numeric > 10000", None),
    ("alias", "SELECT p.* FROM payments p WHERE p.amount > 10000", None),
    ("qualified", "SELECT * FROM public.payments WHERE amount > 10000", None),
    ("equality", "SELECT * FROM payments WHERE amount = 50000", None),
    ("in-list", "SELECT * FROM payments WHERE amount IN (50000.00, 20000)", None),
    ("expression", "SELECT * FROM payments WHERE amount + 0 > 10000", None),
    ("arithmetic", "SELECT * FROM payments WHERE amount > 5000 * 2", None),
    ("string", "SELECT * FROM payments WHERE amount > '10000'", None),
    ("scalar-subquery", "SELECT * FROM payments WHERE amount > (SELECT 10000)", None),
    ("with-limit", "SELECT * FROM payments WHERE amount > 10000 LIMIT 5", None),
    ("high-cap", "SELECT * FROM payments WHERE amount > 10000 AND amount < 1000000", None),
    ("subquery", "SELECT * FROM (SELECT * FROM payments) p WHERE p.amount > 10000", None),
    ("cte", "WITH p AS (SELECT * FROM payments) SELECT * FROM p WHERE amount > 10000", None),
    ("function", "SELECT id FROM payments WHERE greatest(amount, 0) > 10000", None),
    ("parameter", "SELECT * FROM payments WHERE amount > %s", (10000,)),
    ("unbounded", "SELECT * FROM payments", None),
]


@pytest.mark.parametrize(("sql", "params"), [(s, p) for _, s, p in HELD_VARIANTS],
                         ids=[n for n, _, _ in HELD_VARIANTS])
def test_large_amount_variants_are_held(stack: LocalStack, mode: str, sql: str,
                                        params: tuple[Any, ...] | None) -> None:
    subject = unique("fraud-variant")
    approver = mint(stack, unique("approver"), ["approvers"])
    conn = psycopg.connect(agent_dsn(stack, mode, connect_timeout=CONNECT_TIMEOUT),
                           password=mint(stack, subject, ["fraud-readers"]), autocommit=True)
    try:
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["rows"] = conn.execute(sql, params).fetchall()
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pending: dict[str, Any] | None = None
        deadline = time.monotonic() + 30
        while worker.is_alive() and time.monotonic() < deadline:
            mine = [a for a in _approvals(stack, approver) if a["subject"] == subject]
            if mine:
                pending = mine[0]
                break
            time.sleep(0.5)
        if not worker.is_alive():
            got = "rows" if "rows" in outcome else repr(outcome.get("error"))
            raise AssertionError(f"not held for approval: the statement ended at once ({got})")
        assert pending is not None and pending["status"] == "pending", pending
        conn.cancel_safe(timeout=10)
        worker.join(30)
        assert not worker.is_alive(), "a cancel during the hold did not end the statement"
        assert "rows" not in outcome, "a held statement ran without an approval"
    finally:
        conn.close()


# --------------------------------------------------------------------------- session settings


# With standard_conforming_strings off, the server reads a backslash in '...'
# as an escape; the gateway's parser must not read the same text differently.
# The server then sees: SELECT <literal "' || ">, pg_ls_dir(chr(46)) AS x --'
# whereas a parser assuming the setting on sees one harmless string.
SCS_SMUGGLE = "SELECT '\\' || ', pg_ls_dir(chr(46)) AS x --'"
SCS_SMUGGLE_READER = ("SELECT '\\' || ', (SELECT string_agg(card_number, chr(44)) "
                      "FROM payments) AS x --'")


@pytest.mark.parametrize(("who", "smuggled"), [("dba", SCS_SMUGGLE),
                                               ("reader", SCS_SMUGGLE_READER)],
                         ids=["dba-file-access", "reader-unbounded-read"])
def test_string_escape_setting_cannot_smuggle_a_statement(stack: LocalStack, mode: str,
                                                          who: str, smuggled: str) -> None:
    mark = stack.pg_log_mark()
    with connect(stack, mode, who) as conn:
        refused = 0
        ended = False
        try:
            conn.execute("SET standard_conforming_strings = off")
        except psycopg.errors.InsufficientPrivilege:
            refused += 1
        except psycopg.errors.FeatureNotSupported:
            # Fail closed: once the server reads literals differently from the
            # gateway's analysis, the gateway ends the session (FATAL 0A000);
            # nothing else can be sent on it.
            ended = True
        if not ended:
            try:
                row = conn.execute(smuggled).fetchone()
            except psycopg.errors.InsufficientPrivilege:
                refused += 1
            else:
                raise AssertionError("the smuggled statement ran and returned a row of "
                                     f"{len(row or ())} columns")
            assert refused >= 1
        else:
            assert conn.closed or conn.broken, "the session went on after the unsafe setting"
    with connect(stack, mode, who) as probe_conn:
        assert_never_reached(stack, probe_conn, mark, smuggled)


# In GBK, 0xbf 0x5c is one character; a parser that reads the bytes as UTF-8
# sees an invalid byte and then a backslash that escapes the closing quote, so
# for it the rest of the text is inside the string. The server (GBK) ends the
# string after that character and runs what follows.
GBK_CHAR = b"\xbf\x5c".decode("gbk")
GBK_TAIL = {
    "dba": " , pg_ls_dir(chr(46)) AS x --'",
    "reader": " , (SELECT string_agg(card_number, chr(44)) FROM payments) AS x --'",
}


@pytest.mark.parametrize("how", ["startup", "set"])
@pytest.mark.parametrize("who", ["dba", "reader"])
def test_client_encoding_cannot_smuggle_a_statement(stack: LocalStack, mode: str, who: str,
                                                    how: str) -> None:
    smuggled = f"SELECT E'{GBK_CHAR}'{GBK_TAIL[who]}"
    mark = stack.pg_log_mark()
    params = {"client_encoding": "GBK"} if how == "startup" else {}
    try:
        conn = connect(stack, mode, who, **params)
    except psycopg.OperationalError:
        return  # refusing a client encoding the gateway cannot read is fail-closed
    ended = False
    with conn:
        try:
            if how == "set":
                conn.execute("SET client_encoding = 'GBK'")
            assert conn.info.encoding == "gbk"
            row = conn.execute(smuggled).fetchone()
        except psycopg.errors.InsufficientPrivilege:
            pass
        except psycopg.errors.FeatureNotSupported:
            # Fail closed: the gateway ends a session whose client encoding it
            # cannot read as PostgreSQL does (FATAL 0A000).
            ended = True
        else:
            raise AssertionError("the smuggled statement ran and returned a row of "
                                 f"{len(row or ())} columns")
        if ended:
            assert conn.closed or conn.broken, "the session went on after the unsafe setting"
        else:
            conn.execute("RESET client_encoding")
    with connect(stack, mode, who) as probe_conn:
        assert_never_reached(stack, probe_conn, mark, GBK_TAIL[who][3:-4])


# --------------------------------------------------------------------------- FunctionCall


def _read_message(tls: Any) -> tuple[bytes, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = tls.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the gateway closed the connection")
            buf += chunk
        return buf

    head = exactly(5)
    (length,) = struct.unpack("!i", head[1:])
    return head[:1], exactly(length - 4)


def _until_ready(tls: Any) -> list[tuple[bytes, bytes]]:
    seen = []
    while True:
        kind, body = _read_message(tls)
        seen.append((kind, body))
        if kind == b"Z":
            return seen


def _error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1].decode()] = part[1:].decode(errors="replace")
    return fields


def _raw_login(stack: LocalStack, mode: str, token: str, app: str) -> Any:
    """A hand-written client: psycopg and asyncpg cannot send a FunctionCall."""
    parts = conninfo_to_dict(agent_dsn(stack, mode))
    sock = socket.create_connection((parts["host"], int(parts["port"])), timeout=30)
    sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
    assert sock.recv(1) == b"S"
    ctx = ssl.create_default_context(cafile=str(stack.certs.ca))
    tls = ctx.wrap_socket(sock, server_hostname=parts["host"])
    params = b"".join(k + b"\0" + v + b"\0" for k, v in (
        (b"user", b"agent"), (b"database", b"shop"), (b"application_name", app.encode())))
    body = struct.pack("!i", 196608) + params + b"\0"
    tls.sendall(struct.pack("!i", len(body) + 4) + body)
    kind, auth = _read_message(tls)
    assert kind == b"R" and struct.unpack("!i", auth[:4])[0] == 3, (kind, auth)  # cleartext
    secret = token.encode() + b"\0"
    tls.sendall(b"p" + struct.pack("!i", len(secret) + 4) + secret)
    kinds = [k for k, _ in _until_ready(tls)]
    assert b"E" not in kinds, kinds
    return tls


def _function_call(oid: int, arg: bytes) -> bytes:
    body = (struct.pack("!i", oid) + struct.pack("!hh", 1, 0) + struct.pack("!h", 1)
            + struct.pack("!i", len(arg)) + arg + struct.pack("!h", 0))
    return b"F" + struct.pack("!i", len(body) + 4) + body


def _simple_query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


@pytest.mark.parametrize("who", ["dba", "reader"])
def test_function_call_message_is_decided_too(stack: LocalStack, mode: str, who: str) -> None:
    """The fastpath FunctionCall names a function by OID: lo_import of a server
    file must be refused like the SQL call is, and never reach the server."""
    with psycopg.connect(stack.upstream_dsn, dbname="shop") as admin:
        row = admin.execute("SELECT 'pg_catalog.lo_import(text)'::regprocedure::oid::int").fetchone()
    assert row is not None
    oid = int(row[0])
    app = unique("raw-fn")
    mark = stack.pg_log_mark()
    tls = _raw_login(stack, mode, token_for(stack, who), app)
    try:
        tls.sendall(_function_call(oid, b"/etc/passwd"))
        reply = _until_ready(tls)
        errors = [_error_fields(b) for k, b in reply if k == b"E"]
        assert errors and errors[0].get("C") == "42501", (reply, errors)
        assert reply[-1] == (b"Z", b"I")
        tls.sendall(_simple_query("SELECT 6 * 7"))
        reply = _until_ready(tls)
        assert any(k == b"D" and b"42" in b for k, b in reply), reply
        tls.sendall(b"X" + struct.pack("!i", 4))
    finally:
        tls.close()
    log = stack.pg_log_since(mark)
    mine = [line for line in log.splitlines() if f"/{app} " in line]
    assert any("SELECT 6 * 7" in line for line in mine), "the log does not cover the session"
    assert not any("fastpath" in line or "lo_import" in line for line in mine), mine


# --------------------------------------------------------------------------- FunctionCall


def _psql(stack: LocalStack, mode: str, who: str, command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": token_for(stack, who),
           "PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT)}
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", agent_dsn(stack, mode),
                           "-c", command], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_function_calls_are_decided_by_the_function_they_name(stack: LocalStack, mode: str,
                                                             tmp_path: Path) -> None:
    """libpq's large-object API (psql's \\lo_import and \\lo_export) calls
    lo_creat, lo_open, lowrite, loread... with the FunctionCall message, which
    names a function by OID only. The tap names it from its catalog and the
    policy decides as for the same call in SQL: dba may, fraud-readers may not
    (their pack allows no large-object functions), and a refused call never
    reaches PostgreSQL (which logs fastpath calls with log_statement=all)."""
    content = ("large object through the gateway, " * 200).encode()
    source, copy = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(content)

    mark = stack.pg_log_mark()
    refused = _psql(stack, mode, "reader", f"\\lo_import {source}")
    assert refused.returncode != 0
    assert "not permitted" in refused.stderr and "lo_import" not in refused.stdout
    with connect(stack, mode, "dba") as conn:
        log = probe(stack, conn, mark)
    assert "fastpath function call" not in log, "a refused FunctionCall reached PostgreSQL"

    mark = stack.pg_log_mark()
    done = _psql(stack, mode, "dba", f"\\lo_import {source}")
    assert done.returncode == 0, done.stderr[-300:]
    oid = int(done.stdout.split()[-1])
    try:
        exported = _psql(stack, mode, "dba", f"\\lo_export {oid} {copy}")
        assert exported.returncode == 0, exported.stderr[-300:]
        assert copy.read_bytes() == content
    finally:
        _psql(stack, mode, "dba", f"\\lo_unlink {oid}")
    with connect(stack, mode, "dba") as conn:
        log = probe(stack, conn, mark)
    assert 'fastpath function call: "lowrite"' in log  # the calls went as FunctionCall
    assert 'fastpath function call: "loread"' in log
