"""psycopg 3 through the gateway gets what it gets from PostgreSQL directly.

Every test opens one connection straight to PostgreSQL and one through Envoy
and the tap (both modes, client TLS off and on) and compares what a program
would see: values, types, row counts, errors and their SQLSTATEs.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

pytestmark = pytest.mark.integration

# One query touching many types, so text and binary decoding of each column
# is compared. No PANs: masking (a later stage) may legitimately change those.
TYPES_QUERY = """
SELECT g AS int4, g::int8 * 1000000000 AS int8, g::int2 AS int2,
       g / 3.0 AS numeric, (g / 7.0)::float8 AS float8, g % 2 = 0 AS bool,
       'row ' || g AS text, repeat('é', g) AS unicode,
       '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 hour 1 second' AS timestamptz,
       DATE '2024-02-28' + g AS date, make_interval(days => g) AS interval,
       ARRAY[g, g + 1, NULL] AS int_array, ARRAY['a', NULL, 'c''d'] AS text_array,
       jsonb_build_object('g', g, 'list', jsonb_build_array(1, 'two', NULL)) AS jsonb,
       json_build_object('g', g) AS json,
       decode(md5(g::text), 'hex') AS bytea,
       md5(g::text)::uuid AS uuid, NULL::text AS null_text,
       '192.168.0.' || g AS inet_text, point(g, -g) AS point
FROM generate_series(1, 200) g
"""


@pytest.fixture(params=["plain", "tls"])
def sslmode(request: pytest.FixtureRequest) -> str:
    return "require" if request.param == "tls" else "disable"


@pytest.fixture
def gateway(stack: Any, mode: str, sslmode: str) -> Iterator[psycopg.Connection[Any]]:
    dsn = make_conninfo(stack.gateway_dsn[mode], sslmode=sslmode)
    with psycopg.connect(dsn, application_name="pgwarden-psycopg-test") as conn:
        assert bool(conn.pgconn.ssl_in_use) == (sslmode == "require")
        yield conn


@pytest.fixture
def direct(stack: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(stack.app_dsn_direct) as conn:
        yield conn


def _both(direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]) -> list[psycopg.Connection[Any]]:
    return [direct, gateway]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_results_equal_direct(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any], binary: bool
) -> None:
    results = []
    for conn in _both(direct, gateway):
        cur = conn.cursor(binary=binary)
        cur.execute(TYPES_QUERY)
        description = [(c.name, c.type_code) for c in cur.description or []]
        results.append((description, cur.fetchall(), cur.rowcount, cur.statusmessage))
    assert results[1] == results[0]
    _, rows, rowcount, status = results[0]
    assert rowcount == 200 and status == "SELECT 200"
    assert isinstance(rows[0][3], decimal.Decimal)
    assert isinstance(rows[0][8], dt.datetime) and rows[0][8].tzinfo is not None
    assert rows[0][11] == [1, 2, None]
    assert rows[0][13] == {"g": 1, "list": [1, "two", None]}
    assert isinstance(rows[0][15], bytes)


def test_parameters_text_and_binary_equal_direct(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]
) -> None:
    params = (
        42,
        'it\'s "quoted" \\ and ünïcode',
        decimal.Decimal("12345.678901"),
        dt.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=dt.UTC),
        b"\x00\x01\xfe\xff" * 100,
        [1, None, 3],
        None,
        True,
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
    )
    query = (
        "SELECT %s::int, %s::text, %s::numeric, %s::timestamptz, %s::bytea,"
        " %s::int[], %s::text, %s::bool, %s::uuid"
    )
    binary_query = query.replace("%s", "%b")
    outputs = []
    for conn in _both(direct, gateway):
        outputs.append(conn.execute(query, params).fetchone())
        outputs.append(conn.cursor(binary=True).execute(binary_query, params).fetchone())
    assert outputs[0] == (*params[:6], None, *params[7:])
    assert outputs[1] == outputs[0]
    assert outputs[2] == outputs[0]
    assert outputs[3] == outputs[0]


def test_pipeline_mode_equals_direct(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]
) -> None:
    """Many Parse/Bind/Execute before one Sync, an error in the middle of the
    pipeline (later statements in the same sync group are skipped), then
    statements after the next Sync work."""
    results = []
    for conn in _both(direct, gateway):
        conn.autocommit = True
        conn.execute("CREATE TEMP TABLE pipe (id int PRIMARY KEY, v text)")
        seen: list[Any] = []
        with conn.pipeline() as pipeline:
            curs = [
                conn.execute("INSERT INTO pipe VALUES (%s, %s) RETURNING id", (i, f"v{i}")) for i in range(50)
            ]
            count_cur = conn.execute("SELECT count(*), string_agg(v, ',' ORDER BY id) FROM pipe")
            pipeline.sync()
            seen.extend(c.fetchone() for c in curs)
            seen.append(count_cur.fetchone())
        with pytest.raises(errors.UniqueViolation):
            with conn.pipeline() as pipeline:
                conn.execute("INSERT INTO pipe VALUES (1000, 'ok')")
                conn.execute("INSERT INTO pipe VALUES (1, 'duplicate')")
                conn.execute("INSERT INTO pipe VALUES (1001, 'skipped')")
                pipeline.sync()
        with conn.pipeline():
            after = conn.execute("SELECT count(*), max(id) FROM pipe")
        seen.append(after.fetchone())
        results.append(seen)
    assert results[1] == results[0]
    # In autocommit the sync group with the error rolls back entirely.
    assert results[0][-1] == (50, 49)


def test_server_side_cursor_with_itersize(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]
) -> None:
    results = []
    for conn in _both(direct, gateway):
        with conn.transaction(), conn.cursor(name="pgw_named", binary=False) as cur:
            cur.itersize = 333
            cur.execute("SELECT g, md5(g::text), now() = now() FROM generate_series(1, 10000) g ORDER BY g")
            first = cur.fetchmany(10)
            cur.scroll(0)
            rest = list(cur)
            results.append((first, rest))
    assert results[1] == results[0]
    first, rest = results[0]
    assert [r[0] for r in first] == list(range(1, 11))
    assert len(rest) == 9990 and rest[-1][0] == 10000


def test_copy_to_and_from_equal_direct(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]
) -> None:
    results = []
    for conn in _both(direct, gateway):
        conn.execute("CREATE TEMP TABLE copy_in (id int, label text, amount numeric, doc jsonb)")
        rows = [(i, f"label {i}\twith tab", decimal.Decimal(i) / 8, Jsonb({"i": i})) for i in range(5000)]
        rows.append((5000, None, None, None))
        with conn.cursor().copy("COPY copy_in FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        with conn.cursor(binary=True).copy("COPY copy_in FROM STDIN WITH (FORMAT binary)") as copy:
            copy.set_types(["int4", "text", "numeric", "jsonb"])
            copy.write_row((9999, "binary row", decimal.Decimal("1.5"), Jsonb({"b": True})))
        raw = b""
        with conn.cursor().copy(
            "COPY (SELECT * FROM copy_in ORDER BY id) TO STDOUT WITH (FORMAT csv)"
        ) as copy:
            while data := copy.read():
                raw += bytes(data)
        with conn.cursor().copy("COPY (SELECT id, label FROM copy_in ORDER BY id) TO STDOUT") as cp:
            cp.set_types(["int4", "text"])
            parsed = list(cp.rows())
        results.append((raw, parsed))
    assert results[1] == results[0]
    raw, parsed = results[0]
    assert raw.count(b"\n") == 5002
    assert parsed[-1] == (9999, "binary row")
    assert parsed[0] == (0, "label 0\twith tab")


def test_copy_failure_keeps_connection_usable(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]
) -> None:
    """A COPY FROM aborted by the client (CopyFail) and one rejected by the
    server both end with an error; the connection then works normally."""
    outcomes = []
    for conn in _both(direct, gateway):
        conn.autocommit = True
        conn.execute("CREATE TEMP TABLE copy_fail (id int)")
        seen = []
        # psycopg sends CopyFail and re-raises the client's own exception.
        with pytest.raises(RuntimeError, match="client gives up"):
            with conn.cursor().copy("COPY copy_fail FROM STDIN") as copy:
                copy.write_row((1,))
                raise RuntimeError("client gives up mid-COPY")
        seen.append(conn.execute("SELECT 'after CopyFail'").fetchone())
        with pytest.raises(errors.InvalidTextRepresentation) as server_reject:
            with conn.cursor().copy("COPY copy_fail FROM STDIN") as copy:
                copy.write(b"1\nnot a number\n")
        seen.append(server_reject.value.sqlstate)
        seen.append(conn.execute("SELECT count(*) FROM copy_fail").fetchone())
        outcomes.append(seen)
    assert outcomes[1] == outcomes[0] == [("after CopyFail",), "22P02", (0,)]


def test_executemany_and_prepared_statements(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]
) -> None:
    results = []
    for conn in _both(direct, gateway):
        conn.execute("CREATE TEMP TABLE many (id int, v text)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO many VALUES (%s, %s)", [(i, f"v{i}") for i in range(300)])
            cur.executemany(
                "INSERT INTO many VALUES (%s, %s) RETURNING id * 2",
                [(i, "r") for i in range(1000, 1005)],
                returning=True,
            )
            returned = []
            while True:
                returned.append(cur.fetchone())
                if not cur.nextset():
                    break
        prepared = []
        for i in range(10):
            prepared.append(
                conn.execute(
                    "SELECT count(*), %s::int FROM many WHERE id < %s", (i, i * 10), prepare=True
                ).fetchone()
            )
        names = conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql").fetchone()
        results.append((returned, prepared, names))
    assert results[1] == results[0]
    returned, prepared, names = results[0]
    assert returned == [(2000,), (2002,), (2004,), (2006,), (2008,)]
    assert prepared[5] == (50, 5)
    assert names is not None and names[0] >= 1  # really a named server-side statement


def test_errors_keep_connection_usable(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]
) -> None:
    outcomes = []
    for conn in _both(direct, gateway):
        seen: list[Any] = []
        for bad, exc in [
            ("SELECT 1/0", errors.DivisionByZero),
            ("SELECT * FROM no_such_table_pgwarden", errors.UndefinedTable),
            ("SELEC 1", errors.SyntaxError),
        ]:
            with pytest.raises(exc) as info:
                conn.execute(bad)
            diag = info.value.diag
            seen.append((info.value.sqlstate, diag.message_primary, diag.severity))
            conn.rollback()
            seen.append(conn.execute("SELECT 'usable'").fetchone())
        # Extended protocol error with parameters, inside a transaction
        with pytest.raises(errors.InvalidTextRepresentation):
            conn.execute("SELECT %s::int", ("nope",))
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        seen.append(conn.execute("SELECT %s::int + 1", (41,)).fetchone())
        notices: list[str] = []
        conn.add_notice_handler(lambda d, out=notices: out.append(f"{d.severity}: {d.message_primary}"))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 7; END $$")
        seen.append(notices)
        outcomes.append(seen)
    assert outcomes[1] == outcomes[0]
    assert outcomes[0][0] == ("22012", "division by zero", "ERROR")
    assert outcomes[0][-1] == ["NOTICE: hello 7"]


def test_notifications_reach_the_listener(stack: Any, gateway: psycopg.Connection[Any]) -> None:
    gateway.autocommit = True
    gateway.execute("LISTEN pgw_psycopg")
    with psycopg.connect(stack.app_dsn_direct, autocommit=True) as other:
        other.execute("SELECT pg_notify('pgw_psycopg', 'payload ' || g) FROM generate_series(1, 3) g")
    received = []
    for notify in gateway.notifies(timeout=10, stop_after=3):
        received.append((notify.channel, notify.payload))
    assert received == [("pgw_psycopg", f"payload {i}") for i in (1, 2, 3)]


def test_protocol_3_2_request_is_negotiated_down(stack: Any, mode: str, sslmode: str) -> None:
    """A PostgreSQL 18 client asking for protocol 3.2 gets NegotiateProtocolVersion
    from the PostgreSQL 15 server through the tap and carries on with 3.0."""
    if psycopg.pq.version() < 180000:
        pytest.skip("needs libpq 18 for max_protocol_version")
    dsn = make_conninfo(stack.gateway_dsn[mode], sslmode=sslmode, max_protocol_version="3.2")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 'negotiated'").fetchone() == ("negotiated",)
        assert conn.pgconn.protocol_version == 3
        # PostgreSQL 15 answered NegotiateProtocolVersion: the session runs 3.0.
        assert conn.pgconn.full_protocol_version == 30000
        # Cancel keys are the 4-byte kind then; a cancel still works.
        conn.cancel_safe()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_direct_tls_negotiation(stack: Any, mode: str) -> None:
    """PostgreSQL 17+ clients may start TLS at once (sslnegotiation=direct,
    ALPN "postgresql") instead of sending SSLRequest; the tap accepts both."""
    if psycopg.pq.version() < 170000:
        pytest.skip("needs libpq 17 for sslnegotiation=direct")
    dsn = make_conninfo(stack.gateway_dsn[mode], sslmode="require", sslnegotiation="direct")
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 'direct tls'").fetchone() == ("direct tls",)


def test_large_values_in_both_directions(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]
) -> None:
    """Single messages far larger than any socket read: an 8 MB bytea
    parameter (one Bind message up) and an 8 MB text value (one DataRow
    down), reassembled by the tap from many chunks."""
    blob = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    results = []
    for conn in _both(direct, gateway):
        up = conn.execute("SELECT md5(%b)", (blob,)).fetchone()
        down = conn.execute("SELECT repeat('0123456789abcdef', 512 * 1024)").fetchone()
        assert down is not None
        results.append((up, len(down[0]), hashlib.md5(down[0].encode()).hexdigest()))
    assert results[1] == results[0]
    assert results[0][0] == (hashlib.md5(blob).hexdigest(),)
    assert results[0][1] == 8 * 1024 * 1024


def test_parameter_status_changes_reach_the_client(
    direct: psycopg.Connection[Any], gateway: psycopg.Connection[Any]
) -> None:
    """SET TimeZone / DateStyle / application_name make the server send
    ParameterStatus; psycopg relies on it (e.g. for the tzinfo of timestamptz
    values), so the tap must pass it on."""
    results = []
    for conn in _both(direct, gateway):
        conn.autocommit = True
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        ts = conn.execute("SELECT '2024-01-01 00:00:00+00'::timestamptz").fetchone()
        conn.execute("SET DateStyle = 'German, DMY'")
        conn.execute("SET application_name = 'renamed by SET'")
        text = conn.execute("SELECT '2024-01-31'::date::text").fetchone()
        assert ts is not None
        results.append(
            (
                conn.info.parameter_status("TimeZone"),
                conn.info.parameter_status("DateStyle"),
                conn.info.parameter_status("application_name"),
                ts[0].utcoffset(),
                ts[0].astimezone(dt.UTC),
                text,
            )
        )
    assert results[1] == results[0]
    assert results[0][:4] == ("Asia/Tokyo", "German, DMY", "renamed by SET", dt.timedelta(hours=9))
    assert results[0][5] == ("31.01.2024",)



def _terminated_by_postgresql(conn: psycopg.Connection[Any], admin_dsn: str,
                              busy: bool) -> tuple[str | None, str | None]:
    """End ``conn``'s backend with pg_terminate_backend (while idle, or while
    it runs a statement) and return what the client saw: (SQLSTATE, message)."""
    conn.autocommit = True
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    pid = row[0]

    def terminate(when_running: bool) -> None:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            deadline = time.monotonic() + 10
            while when_running and time.monotonic() < deadline:
                state = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                                      (pid,)).fetchone()
                if state and state[0] == "active":
                    break
                time.sleep(0.02)
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    with pytest.raises(psycopg.OperationalError) as info:
        if busy:
            killer = threading.Thread(target=terminate, args=(True,))
            killer.start()
            try:
                conn.execute("SELECT pg_sleep(30)")
            finally:
                killer.join()
        else:
            terminate(False)
            for _ in range(100):  # the FATAL arrives on its own; the next statement reads it
                conn.execute("SELECT 1")
                time.sleep(0.05)
    assert conn.broken or conn.closed
    return info.value.sqlstate, info.value.diag.message_primary


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "running"])
def test_backend_terminated_by_postgresql(
    stack: Any, mode: str, sslmode: str, direct: psycopg.Connection[Any],
    gateway: psycopg.Connection[Any], busy: bool,
) -> None:
    """When PostgreSQL ends a backend (pg_terminate_backend, a restart), its
    FATAL 57P01 reaches the client through the gateway as it does directly,
    whether the session was idle or running a statement; and the gateway
    takes new sessions afterwards."""
    seen = [_terminated_by_postgresql(c, stack.upstream_dsn, busy) for c in _both(direct, gateway)]
    assert seen[1] == seen[0]
    assert seen[0] == ("57P01", "terminating connection due to administrator command")
    with psycopg.connect(make_conninfo(stack.gateway_dsn[mode], sslmode=sslmode)) as fresh:
        assert fresh.execute("SELECT 'after'").fetchone() == ("after",)
