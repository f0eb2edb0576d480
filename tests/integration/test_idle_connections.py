"""1,000 idle sessions through the gateway: all of them work, the tap's
memory grows by less than 100 MB (issue 2), and closing them releases
their PostgreSQL backends.

The sessions are asyncpg connections (one event loop, cheap per connection)
opened 50 at a time; each runs one query after all are open, so every one of
them is live at the same moment. 100 MB for 1,000 sessions is 100 KB per
session: room for a session object, its framing buffers and its TLS/gRPC
state, but not for anything proportional to traffic or unbounded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import psutil
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

pytestmark = pytest.mark.integration

SESSIONS = 1000
OPEN_CONCURRENCY = 50
MAX_GROWTH_BYTES = 100 * 1024 * 1024


def _rss(pid: int) -> int:
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return int(total)


def _backends(stack: Any, app_name: str) -> int:
    with psycopg.connect(stack.upstream_dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
        ).fetchone()
    return int(row[0]) if row else 0


def _check_capacity(stack: Any) -> None:
    with psycopg.connect(stack.upstream_dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        ).fetchone()
    free = int(row[0]) if row else 0
    if free < SESSIONS + 5:
        pytest.fail(
            f"the stack's PostgreSQL has room for {free} more sessions, this test needs "
            f"{SESSIONS}: raise max_connections in pgwarden/stack.py"
        )


async def _open(stack: Any, mode: str, app_name: str, sslmode: str) -> asyncpg.Connection:
    params = conninfo_to_dict(stack.gateway_dsn[mode])
    return await asyncpg.connect(
        host=params.get("host"),
        port=int(params.get("port", 5432)),
        user=params.get("user"),
        password=params.get("password"),
        passfile=params.get("passfile"),
        database=params.get("dbname"),
        ssl=sslmode,
        timeout=60,
        server_settings={"application_name": app_name},
        statement_cache_size=0,
    )


# TLS sessions cost the tap more (an SSL object and its buffers each); the
# same bound applies. TLS is terminated by the shared sans-IO core, so one
# driver (inline) is enough for the TLS variant; it keeps the module's time
# (1000 SCRAM logins per run) reasonable.
@pytest.mark.parametrize(
    ("mode", "sslmode"),  # overrides the conftest's `mode` parametrisation
    [
        pytest.param("inline", "disable", id="inline-plain"),
        pytest.param("extproc", "disable", id="extproc-plain"),
        pytest.param("inline", "require", id="inline-tls"),
    ],
)
async def test_thousand_idle_sessions(stack: Any, mode: str, sslmode: str) -> None:
    _check_capacity(stack)
    pid = stack.tap_pids[mode]
    app_name = f"pgw-idle-{mode}-{uuid.uuid4().hex[:6]}"
    baseline = min(_rss(pid) for _ in range(3))
    peak = baseline
    semaphore = asyncio.Semaphore(OPEN_CONCURRENCY)
    conns: list[asyncpg.Connection] = []

    async def open_one() -> None:
        async with semaphore:
            conns.append(await _open(stack, mode, app_name, sslmode))

    try:
        results = await asyncio.gather(*(open_one() for _ in range(SESSIONS)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, (
            f"{len(failures)} of {SESSIONS} sessions failed to open through {mode}; first: {failures[0]!r}"
        )
        peak = max(peak, _rss(pid))
        assert _backends(stack, app_name) == SESSIONS

        async def query(i: int, conn: asyncpg.Connection) -> int:
            async with semaphore:
                return int(await conn.fetchval("SELECT $1::int", i))

        answers = await asyncio.gather(*(query(i, c) for i, c in enumerate(conns)))
        assert answers == list(range(SESSIONS))
        peak = max(peak, _rss(pid))
        growth = peak - baseline
        print(f"{mode}/{sslmode}: tap RSS +{growth / 2**20:.1f} MB for {SESSIONS} sessions")
        assert growth < MAX_GROWTH_BYTES, (
            f"the {mode} tap grew by {growth / 2**20:.1f} MB for {SESSIONS} idle sessions "
            f"({growth / SESSIONS / 1024:.0f} KB each)"
        )
    finally:
        await asyncio.gather(*(c.close(timeout=10) for c in conns), return_exceptions=True)

    # Closing the client side releases every PostgreSQL backend (the tap
    # passes the Terminate on and closes its upstream).
    deadline = time.monotonic() + 30
    while (left := _backends(stack, app_name)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert left == 0, f"{left} PostgreSQL sessions still open after the clients closed"
    assert psutil.pid_exists(pid)
