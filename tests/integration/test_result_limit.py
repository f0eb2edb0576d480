"""tap.max_result_bytes through Envoy and a real PostgreSQL, both drivers.

The tap is restarted with ``--max-result-bytes`` for these tests (and back
without it afterwards). A result under the limit arrives whole; one over it
ends the session with SQLSTATE 54000 after the rows that fit, and the query
stops running in PostgreSQL: closing the server connection is what ends it,
in ext_proc mode too (Envoy closes both sides on the tap's CLOSE).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import make_conninfo

pytestmark = pytest.mark.integration

LIMIT = 1024 * 1024
BIG = "SELECT g, repeat('x', 50) FROM generate_series(1, 200000000) g  -- pgwarden-limit-probe"


@pytest.fixture
def limited(stack: Any, mode: str) -> Iterator[str]:
    stack.restart_tap(mode, ["--max-result-bytes", str(LIMIT)])
    try:
        yield make_conninfo(stack.gateway_dsn[mode], sslmode="disable")
    finally:
        stack.restart_tap(mode)


def _running(stack: Any) -> list[str]:
    with psycopg.connect(stack.upstream_dsn, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT query FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            ("%pgwarden-limit-probe%",)).fetchall()
    return [r[0] for r in rows]


def test_a_result_under_the_limit_arrives_whole(limited: str) -> None:
    with psycopg.connect(limited, autocommit=True) as conn:
        got = conn.execute("SELECT g, repeat('x', 50) FROM generate_series(1, 5000) g").fetchall()
        assert len(got) == 5000 and got[-1] == (5000, "x" * 50)
        # many results under the limit, one after another: the limit is per execution
        for _ in range(3):
            assert len(conn.execute(
                "SELECT g, repeat('x', 50) FROM generate_series(1, 10000) g").fetchall()) == 10000


def test_a_result_over_the_limit_ends_the_session_and_the_query(stack: Any, limited: str) -> None:
    received = 0
    with psycopg.connect(limited, autocommit=True) as conn:
        with pytest.raises(errors.ProgramLimitExceeded) as info, conn.cursor() as cur:
            for _ in cur.stream(BIG, size=1000):
                received += 1
        assert "max_result_bytes" in str(info.value)
        assert conn.broken or conn.closed
    row = 1 + 4 + 2 + 4 + 6 + 4 + 50  # a DataRow of (g, 50 x's), g of ~6 digits
    assert 0 < received <= LIMIT // (row - 4)
    # PostgreSQL stops: the server connection was closed under the query.
    deadline = time.monotonic() + 10
    while _running(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(stack) == []
    # Other and later sessions are unaffected.
    with psycopg.connect(limited, autocommit=True) as conn:
        assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)


def test_copy_out_over_the_limit_is_cut(limited: str) -> None:
    received = 0
    with psycopg.connect(limited, autocommit=True) as conn:
        with pytest.raises(errors.ProgramLimitExceeded), conn.cursor().copy(
                "COPY (SELECT g, repeat('y', 50) FROM generate_series(1, 100000) g) TO STDOUT"
        ) as copy:
            while data := copy.read():
                received += len(data)
    assert 0 < received <= LIMIT


def test_the_cut_reaches_a_tls_client(stack: Any, mode: str, limited: str) -> None:
    dsn = stack.gateway_tls_dsn[mode]  # the tap terminates TLS; the FATAL goes out encrypted
    received = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        with pytest.raises(errors.ProgramLimitExceeded), conn.cursor() as cur:
            for _ in cur.stream(BIG, size=1000):
                received += 1
    assert received > 0


@pytest.fixture
def policy_limit(stack: Any) -> Iterator[int]:
    """fraud-readers' max_result_bytes (rego/pgwarden_data/groups.json) lowered
    through OPA's data API for one test, and put back afterwards. Decisions
    are taken from OPA's current data at once; the statements below have
    texts of their own, so no decision cached before applies to them."""
    import json
    import urllib.request

    url = (stack.extra_env["PGWARDEN_OPA_URL"]
           + "/v1/data/pgwarden_data/groups/fraud-readers/max_result_bytes")

    def put(value: int) -> None:
        req = urllib.request.Request(url, data=json.dumps(value).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status in (200, 204)

    with urllib.request.urlopen(url, timeout=10) as resp:
        original = json.loads(resp.read())["result"]
    put(LIMIT)
    try:
        yield LIMIT
    finally:
        put(original)


def test_a_limit_the_policy_sets_ends_an_agent_session(stack: Any, mode: str,
                                                       policy_limit: int) -> None:
    """An agent of fraud-readers through the governed tap: the decision's
    max_result_bytes (smaller than the gateway's own) cuts the result."""
    from agent import agent_dsn, mint

    token = mint(stack, f"limit-agent-{mode}", ["fraud-readers"])
    received = 0
    with psycopg.connect(agent_dsn(stack, mode), password=token, autocommit=True) as conn:
        with pytest.raises(errors.ProgramLimitExceeded) as info, conn.cursor() as cur:
            for _ in cur.stream(f"{BIG} {mode}-policy", size=1000):
                received += 1
        assert "policy decision" in str(info.value) and str(policy_limit) in str(info.value)
    assert 0 < received <= policy_limit // 60
    # a result under the limit, for the same agent, arrives whole
    with psycopg.connect(agent_dsn(stack, mode), password=token, autocommit=True) as conn:
        got = conn.execute(f"SELECT g FROM generate_series(1, 1000) g  -- {mode}-small").fetchall()
        assert len(got) == 1000
