"""pgbench through the gateway: initialisation (COPY of 100,000 rows) and
short runs of the built-in scripts with the simple, extended and prepared
query protocols, in both tap modes, with client TLS off and on.

These are functional checks (every transaction succeeds and its writes land),
not benchmarks: speed is measured by ``make bench``.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

pytestmark = pytest.mark.integration

TRANSACTIONS_PER_CLIENT = 50
CLIENTS = 2


def _pgbench(args: list[str], dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    # pgbench expands a conninfo string given as the database name.
    return subprocess.run(
        ["pgbench", *args, dsn],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def bench_databases(stack: Any) -> Iterator[dict[str, str]]:
    """One scratch database per tap mode, owned by the application role and
    initialised by ``pgbench -i`` *through the gateway* (so COPY FROM STDIN
    of pgbench_accounts goes through the tap)."""
    app_user = conninfo_to_dict(stack.app_dsn_direct)["user"]
    created: dict[str, str] = {}
    with psycopg.connect(stack.upstream_dsn, autocommit=True) as admin:
        for mode in ("inline", "extproc"):
            name = f"pgw_bench_{mode}_{uuid.uuid4().hex[:6]}"
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(str(app_user))
                )
            )
            created[mode] = name
    try:
        yield created
    finally:
        with psycopg.connect(stack.upstream_dsn, autocommit=True) as admin:
            for name in created.values():
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def bench_dsn(stack: Any, mode: str, bench_databases: dict[str, str]) -> str:
    dsn = make_conninfo(stack.gateway_dsn[mode], dbname=bench_databases[mode])
    with psycopg.connect(make_conninfo(stack.app_dsn_direct, dbname=bench_databases[mode])) as c:
        initialised = c.execute(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'pgbench_accounts'"
        ).fetchone()
    if not initialised or not initialised[0]:
        init = _pgbench(["-i", "-q", "-s", "1"], dsn)
        assert init.returncode == 0, f"pgbench -i through the gateway failed:\n{init.stderr}"
        assert "done in" in init.stderr
    return dsn


def _processed(output: str) -> tuple[int, int]:
    done = re.search(r"number of transactions actually processed: (\d+)/(\d+)", output)
    assert done, f"no transaction count in pgbench output:\n{output}"
    return int(done.group(1)), int(done.group(2))


def _failed(output: str) -> int:
    failed = re.search(r"number of failed transactions: (\d+)", output)
    return int(failed.group(1)) if failed else 0


def test_init_loaded_every_row(stack: Any, mode: str, bench_dsn: str) -> None:
    dbname = conninfo_to_dict(bench_dsn)["dbname"]
    with psycopg.connect(make_conninfo(stack.app_dsn_direct, dbname=dbname)) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pgbench_accounts),"
            " (SELECT count(*) FROM pgbench_branches),"
            " (SELECT count(*) FROM pgbench_tellers)"
        ).fetchone()
    assert row == (100_000, 1, 10)


# Every protocol mode with TLS off and on, spread over the runs rather than
# crossed with them, to keep the module within seconds per run.
@pytest.mark.parametrize(
    ("options", "tls"),
    [
        pytest.param([], "plain", id="tpcb-simple-plain"),
        pytest.param([], "tls", id="tpcb-simple-tls"),
        pytest.param(["-S"], "plain", id="select-only-simple-plain"),
        pytest.param(["-S"], "tls", id="select-only-simple-tls"),
        pytest.param(["-M", "extended"], "plain", id="tpcb-extended-plain"),
        pytest.param(["-S", "-M", "extended"], "tls", id="select-only-extended-tls"),
        pytest.param(["-M", "prepared"], "tls", id="tpcb-prepared-tls"),
        pytest.param(["-S", "-M", "prepared"], "plain", id="select-only-prepared-plain"),
        # A new connection (startup, SCRAM, Terminate) for every transaction.
        pytest.param(["-S", "-C"], "tls", id="select-only-reconnect-tls"),
        pytest.param(["-S", "-C", "-M", "extended"], "plain", id="select-only-reconnect-plain"),
        # Eight sessions at once on two threads: sessions interleave in the tap.
        pytest.param(["-S", "-M", "prepared", "-c", "8", "-j", "2"], "plain", id="select-only-8-clients"),
        pytest.param(["-M", "extended", "-c", "8", "-j", "2"], "tls", id="tpcb-8-clients-tls"),
    ],
)
def test_pgbench_run_completes_every_transaction(
    stack: Any, mode: str, bench_dsn: str, options: list[str], tls: str
) -> None:
    dsn = make_conninfo(bench_dsn, sslmode="require" if tls == "tls" else "disable")
    direct_dsn = make_conninfo(stack.app_dsn_direct, dbname=conninfo_to_dict(bench_dsn)["dbname"])
    with psycopg.connect(direct_dsn) as conn:
        history_before = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()

    clients = int(options[options.index("-c") + 1]) if "-c" in options else CLIENTS
    if "-c" not in options:
        options = [*options, "-c", str(CLIENTS), "-j", "1"]
    mark = stack.pg_log_mark()
    run = _pgbench([*options, "-n", "-t", str(TRANSACTIONS_PER_CLIENT)], dsn)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"pgbench failed through the {mode} gateway:\n{output}"
    expected = clients * TRANSACTIONS_PER_CLIENT
    assert _processed(output) == (expected, expected)
    assert _failed(output) == 0
    assert "error" not in run.stderr.lower(), run.stderr

    with psycopg.connect(direct_dsn) as conn:
        history_after = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()
    assert history_before is not None and history_after is not None
    written = history_after[0] - history_before[0]
    # TPC-B writes one history row per transaction; select-only writes nothing.
    assert written == (0 if "-S" in options else expected)
    # Every pgbench session ended with Terminate passed on by the tap.
    log = stack.pg_log_since(mark)
    assert "unexpected EOF on client connection" not in log
    assert "could not receive data from client" not in log
