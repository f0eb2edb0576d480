"""asyncpg through the gateway: binary protocol, prepared statements, COPY,
transactions and errors, compared with the same calls made directly.

asyncpg speaks only the extended protocol with binary results and sends
Parse/Describe/Bind/Execute/Sync in one write, so it exercises the tap's
pipelined framing in both directions.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from psycopg.conninfo import conninfo_to_dict

# Fixtures run on the session loop (pyproject), so the tests must too.
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


def connect_kwargs(dsn: str, ssl: str | None = None) -> dict[str, Any]:
    """asyncpg keyword arguments from a libpq DSN (URL or key=value)."""
    params = conninfo_to_dict(dsn)
    kwargs: dict[str, Any] = {
        "host": params.get("host", "127.0.0.1"),
        "port": int(params.get("port", 5432)),
        "user": params.get("user"),
        "password": params.get("password"),
        "passfile": params.get("passfile"),  # the stack's DSNs carry no password
        "database": params.get("dbname"),
        "ssl": ssl or params.get("sslmode") or "disable",
        "timeout": 15,
    }
    return kwargs


@pytest.fixture(params=["plain", "tls"])
def sslmode(request: pytest.FixtureRequest) -> str:
    return "require" if request.param == "tls" else "disable"


@pytest.fixture
async def conns(stack: Any, mode: str, sslmode: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """[direct, gateway] connections."""
    direct = await asyncpg.connect(**connect_kwargs(stack.app_dsn_direct))
    gateway = await asyncpg.connect(**connect_kwargs(stack.gateway_dsn[mode], ssl=sslmode))
    try:
        assert (gateway.get_server_pid() != 0) and gateway.get_settings().server_version
        yield [direct, gateway]
    finally:
        await gateway.close(timeout=5)
        await direct.close(timeout=5)


TYPES_QUERY = """
SELECT g AS i4, g::int8 << 40 AS i8, g::int2 AS i2, (g / 3.0)::numeric(20, 10) AS num,
       g::float8 / 7 AS f8, g % 2 = 0 AS b, 'text ' || g || ' ✓' AS t,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 day 1 microsecond' AS ts,
       date '2000-02-28' + g AS d, make_interval(hours => g) AS iv,
       jsonb_build_object('g', g, 'arr', jsonb_build_array(g, null)) AS jb,
       json_build_object('g', g)::json AS js,
       ARRAY[g, -g, NULL] AS ia, ARRAY[['a', 'b'], ['c', NULL]] AS ta,
       decode(repeat(md5(g::text), g % 5 + 1), 'hex') AS ba,
       md5(g::text)::uuid AS u, NULL::int AS n, '10.0.0.1'::inet AS ip,
       'infinity'::timestamptz AS inf, numeric '1e-20' AS tiny
FROM generate_series(1, 300) g
"""


async def test_binary_fetch_of_many_types_equals_direct(conns: list[asyncpg.Connection]) -> None:
    results = [[tuple(r) for r in await c.fetch(TYPES_QUERY)] for c in conns]
    assert results[1] == results[0]
    first = results[0][0]
    assert first[0] == 1 and first[1] == 1 << 40
    assert isinstance(first[3], decimal.Decimal)
    assert first[7] == dt.datetime(2024, 1, 2, 0, 0, 0, 1, tzinfo=dt.UTC)
    assert json.loads(first[10]) == {"g": 1, "arr": [1, None]}
    assert first[12] == [1, -1, None]
    assert isinstance(first[14], bytes) and len(first[14]) == 32
    assert isinstance(first[15], uuid.UUID)
    assert len(results[0]) == 300


async def test_parameters_round_trip_in_binary(conns: list[asyncpg.Connection]) -> None:
    args = (
        2**62,
        decimal.Decimal("-98765.4321"),
        "ünïcode ' \" \\ \x01",
        b"\x00" * 1000 + b"\xff",
        dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
        [1, 2, None],
        None,
        json.dumps({"nested": {"k": [1, 2]}}),
    )
    query = (
        "SELECT $1::int8, $2::numeric, $3::text, $4::bytea, $5::timestamptz, $6::int[], $7::text, $8::jsonb"
    )
    results = [tuple(await c.fetchrow(query, *args) or ()) for c in conns]
    assert results[1] == results[0]
    assert results[0][:7] == args[:7]


async def test_prepared_statements(conns: list[asyncpg.Connection]) -> None:
    results = []
    for conn in conns:
        stmt = await conn.prepare("SELECT g, $1::text || g FROM generate_series(1, $2::int) g")
        described = [(a.name, a.type.name) for a in stmt.get_attributes()]
        params = [t.name for t in stmt.get_parameters()]
        runs = [await stmt.fetch(f"p{i}-", i * 10) for i in range(5)]
        value = await stmt.fetchval("x", 3, column=1)
        # A cursor over a prepared statement inside a transaction: Execute
        # with a row limit, PortalSuspended, more Executes.
        async with conn.transaction():
            cur = await stmt.cursor("c", 1000)
            chunk1 = await cur.fetch(7)
            chunk2 = await cur.fetch(5)
            iterated = [r async for r in stmt.cursor("i", 2500, prefetch=100)]
        results.append(
            (
                described,
                params,
                [[tuple(r) for r in run] for run in runs],
                value,
                [tuple(r) for r in chunk1 + chunk2],
                len(iterated),
            )
        )
    assert results[1] == results[0]
    assert results[0][0] == [("g", "int4"), ("?column?", "text")]
    assert results[0][3] == "x1"
    assert results[0][4][-1] == (12, "c12")
    assert results[0][5] == 2500


async def test_copy_records_to_table_and_copy_from_query(conns: list[asyncpg.Connection]) -> None:
    results = []
    for conn in conns:
        await conn.execute(
            "CREATE TEMP TABLE copied (id int, name text, amount numeric(12, 2),"
            " at timestamptz, tags text[], raw bytea)"
        )
        records = [
            (
                i,
                f"name {i}" if i % 10 else None,
                decimal.Decimal(i) / 4,
                dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i),
                [f"t{i}", "x"],
                bytes([i % 256]) * (i % 7),
            )
            for i in range(20_000)
        ]
        status = await conn.copy_records_to_table("copied", records=records)
        stats = await conn.fetchrow(
            "SELECT count(*), sum(id), count(name), sum(amount), max(at), sum(length(raw)) FROM copied"
        )
        sink = bytearray()

        async def collect(chunk: bytes, sink: bytearray = sink) -> None:
            sink.extend(chunk)

        out_status = await conn.copy_from_query(
            "SELECT id, name, amount, tags FROM copied WHERE id < $1 ORDER BY id",
            5000,
            output=collect,
            format="csv",
        )
        results.append((status, tuple(stats or ()), out_status, bytes(sink)))
    assert results[1] == results[0]
    status, stats, out_status, data = results[0]
    assert status == "COPY 20000"
    assert stats[0] == 20_000 and stats[1] == sum(range(20_000))
    assert out_status == "COPY 5000"
    assert data.count(b"\n") == 5000


async def test_transactions_and_errors(conns: list[asyncpg.Connection]) -> None:
    results = []
    for conn in conns:
        seen: list[Any] = []
        await conn.execute("CREATE TEMP TABLE tx (v int PRIMARY KEY)")
        async with conn.transaction():
            await conn.execute("INSERT INTO tx VALUES (1)")
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO tx VALUES (2)")
                await conn.execute("INSERT INTO tx VALUES (1)")
        except asyncpg.UniqueViolationError as exc:
            seen.append((exc.sqlstate, exc.constraint_name))
        async with conn.transaction():
            await conn.execute("INSERT INTO tx VALUES (3)")
            try:
                async with conn.transaction():  # savepoint
                    await conn.execute("INSERT INTO tx VALUES (4)")
                    await conn.fetchval("SELECT 1 / 0")
            except asyncpg.DivisionByZeroError as exc:
                seen.append(exc.sqlstate)
        seen.append([tuple(r) for r in await conn.fetch("SELECT v FROM tx ORDER BY v")])
        for bad, exc_type in [
            ("SELECT * FROM no_such_table_pgwarden", asyncpg.UndefinedTableError),
            ("SELEC 1", asyncpg.PostgresSyntaxError),
        ]:
            with pytest.raises(exc_type) as info:
                await conn.fetch(bad)
            seen.append((info.value.sqlstate, info.value.message))
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            await conn.fetchval("SELECT $1::text::int", "not an int")
        messages: list[str] = []
        conn.add_log_listener(lambda _c, m, out=messages: out.append(f"{m.severity}: {m.message}"))
        await conn.execute("DO $$ BEGIN RAISE NOTICE 'notice %', 1; END $$")
        seen.append(messages)
        seen.append(await conn.fetchval("SELECT 'usable after errors'"))
        results.append(seen)
    assert results[1] == results[0]
    assert results[0][0] == ("23505", "tx_pkey")
    assert results[0][2] == [(1,), (3,)]
    assert results[0][-1] == "usable after errors"
    assert results[0][-2] == ["NOTICE: notice 1"]


async def test_executemany_and_pipelined_statements(conns: list[asyncpg.Connection]) -> None:
    results = []
    for conn in conns:
        await conn.execute("CREATE TEMP TABLE em (id int, v text)")
        await conn.executemany("INSERT INTO em VALUES ($1, $2)", [(i, str(i)) for i in range(2000)])
        results.append(await conn.fetchval("SELECT sum(id) + count(v) FROM em"))
    assert results[1] == results[0] == sum(range(2000)) + 2000
