"""pg8000 (pure Python, native API) through the gateway: simple queries,
parameters (pg8000 sends them with the extended protocol, text format),
COPY, errors and notifications, compared with the same calls made directly."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
from psycopg.conninfo import conninfo_to_dict

pytestmark = pytest.mark.integration


def password_for(params: dict[str, Any]) -> str | None:
    """The password a DSN implies: inline, or from its libpq ``passfile``
    (host:port:database:user:password, ``*`` matching anything)."""
    if params.get("password"):
        return str(params["password"])
    passfile = params.get("passfile")
    if not passfile:
        return None
    wanted = [str(params.get(k, "")) for k in ("host", "port", "dbname", "user")]
    for line in Path(str(passfile)).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        fields = line.split(":", 4)
        if len(fields) == 5 and all(f in ("*", w) for f, w in zip(fields[:4], wanted, strict=True)):
            return fields[4]
    return None


def connect(dsn: str, tls: bool = False) -> pg8000.native.Connection:
    params = conninfo_to_dict(dsn)
    context = None
    if tls:
        # sslmode=require semantics: encrypted, certificate not verified.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return pg8000.native.Connection(
        user=str(params["user"]),
        password=password_for(params),
        host=str(params.get("host", "127.0.0.1")),
        port=int(params.get("port", 5432)),
        database=str(params["dbname"]) if params.get("dbname") else None,
        ssl_context=context,
        timeout=15,
        application_name="pgwarden-pg8000-test",
    )


@pytest.fixture(params=["plain", "tls"])
def conns(request: pytest.FixtureRequest, stack: Any, mode: str) -> Iterator[list[Any]]:
    direct = connect(stack.app_dsn_direct)
    gateway = connect(stack.gateway_dsn[mode], tls=request.param == "tls")
    try:
        yield [direct, gateway]
    finally:
        gateway.close()
        direct.close()


def test_simple_queries_equal_direct(conns: list[pg8000.native.Connection]) -> None:
    results = []
    for conn in conns:
        rows = conn.run(
            "SELECT g, g / 4.0, 'row ' || g, now() > '2000-01-01', NULL::text,"
            " DATE '2024-01-01' + g, ARRAY[g, NULL]"
            " FROM generate_series(1, 100) g"
        )
        columns = [(c["name"], c["type_oid"]) for c in conn.columns or []]
        payments = conn.run("SELECT id, cardholder, amount, merchant FROM payments ORDER BY id")
        results.append((rows, columns, conn.row_count, payments))
    assert results[1] == results[0]
    rows, _, _, payments = results[0]
    assert rows[0] == [
        1,
        decimal.Decimal("0.25000000000000000000"),
        "row 1",
        True,
        None,
        dt.date(2024, 1, 2),
        [1, None],
    ]
    assert len(rows) == 100
    assert payments, "the seeded payments table is empty"


def test_parameters_equal_direct(conns: list[pg8000.native.Connection]) -> None:
    results = []
    for conn in conns:
        results.append(
            conn.run(
                "SELECT :i::int + 1, :s::text, :d::numeric * 2, :ts::timestamptz, :b::bytea,"
                " :n::text IS NULL, :arr::int[]",
                i=41,
                s="ünïcode 'quotes' \"double\"",
                d=decimal.Decimal("1.25"),
                ts=dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.UTC),
                b=b"\x00\xff" * 50,
                n=None,
                arr=[1, 2, 3],
            )
        )
        stmt = conn.prepare("SELECT count(*) FROM generate_series(1, :n) g WHERE g % :m = 0")
        results.append([stmt.run(n=100, m=m) for m in (1, 2, 3, 7)])
        stmt.close()
    assert results[2] == results[0]
    assert results[3] == results[1]
    assert results[0][0][0] == 42
    assert results[1] == [[[100]], [[50]], [[33]], [[14]]]


def test_errors_keep_connection_usable(conns: list[pg8000.native.Connection]) -> None:
    outcomes = []
    for conn in conns:
        seen = []
        for bad in (
            "SELECT 1/0",
            "SELECT * FROM no_such_table_pgwarden",
            "SELEC 1",
            "SELECT 'x'::int",
        ):
            with pytest.raises(pg8000.native.DatabaseError) as info:
                conn.run(bad)
            fields = info.value.args[0]
            seen.append((fields["S"], fields["C"], fields["M"]))
            seen.append(conn.run("SELECT 'still usable'"))
        conn.run("BEGIN")
        conn.run("CREATE TEMP TABLE t8000 (v int)")
        with pytest.raises(pg8000.native.DatabaseError):
            conn.run("INSERT INTO t8000 VALUES (:v)", v="NaN-int")
        with pytest.raises(pg8000.native.DatabaseError) as aborted:
            conn.run("SELECT 1")
        seen.append(aborted.value.args[0]["C"])
        conn.run("ROLLBACK")
        seen.append(conn.run("SELECT 'after rollback'"))
        outcomes.append(seen)
    assert outcomes[1] == outcomes[0]
    assert outcomes[0][0] == ("ERROR", "22012", "division by zero")
    assert "25P02" in outcomes[0]


def test_copy_and_notices(conns: list[pg8000.native.Connection]) -> None:
    results = []
    for conn in conns:
        conn.run("CREATE TEMP TABLE c8000 (id int, v text)")
        conn.run(
            "COPY c8000 FROM STDIN WITH (FORMAT csv)",
            stream=io.StringIO("".join(f"{i},v{i}\n" for i in range(3000))),
        )
        out = io.StringIO()
        conn.run("COPY (SELECT * FROM c8000 ORDER BY id) TO STDOUT WITH (FORMAT csv)", stream=out)
        conn.notices.clear()
        conn.run("DO $$ BEGIN RAISE NOTICE 'pg8000 notice'; END $$")
        notices = [n[b"M"].decode() for n in conn.notices]
        conn.run("LISTEN pgw_pg8000")
        conn.run("NOTIFY pgw_pg8000, 'self'")
        notifies = [(channel, payload) for _pid, channel, payload in conn.notifications]
        conn.notifications.clear()
        results.append((out.getvalue(), notices, notifies))
    assert results[1] == results[0]
    data, notices, notifies = results[0]
    assert data.count("\n") == 3000 and data.startswith("0,v0\n")
    assert notices == ["pg8000 notice"]
    assert notifies == [("pgw_pg8000", "self")]
