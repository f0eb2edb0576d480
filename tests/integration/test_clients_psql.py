"""psql through the gateway prints exactly what it prints against PostgreSQL.

Each script in ``sql/`` runs twice with the same psql binary and the same
fixed output settings: once straight to PostgreSQL (``stack.app_dsn_direct``)
and once through Envoy and the tap (``stack.gateway_dsn[mode]``), with client
TLS off and on. stdout and stderr are compared separately (psql buffers them
differently, so their interleaving in one pipe is not meaningful).

The only normalisations: backend PIDs in "Asynchronous notification ...
received from server process with PID n" lines, because every connection has
its own backend process, and the OIDs psql prints for large objects, because
each import allocates a new one. Nothing else may differ.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

pytestmark = pytest.mark.integration

SQL_DIR = Path(__file__).parent / "sql"
PSQL_TIMEOUT = 60

_NOTIFY_PID = re.compile(r"(received from server process with PID )\d+")
_LO_OID = re.compile(r"^(lo_import |lo_unlink )\d+$", re.MULTILINE)


@pytest.fixture(params=["plain", "tls"])
def sslmode(request: pytest.FixtureRequest) -> str:
    return "require" if request.param == "tls" else "disable"


def _psql_env(app_name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGAPPNAME=app_name,
        PGTZ="UTC",
        PGDATESTYLE="ISO, MDY",
        PGCLIENTENCODING="UTF8",
        PGCONNECT_TIMEOUT="10",
        LC_ALL="C.UTF-8",
        LANG="C.UTF-8",
    )
    return env


def run_psql(
    dsn: str,
    script: str,
    cwd: Path,
    app_name: str = "pgwarden-psql-test",
    sslmode: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one script with a fixed output format and return the finished process."""
    if sslmode is not None:
        dsn = make_conninfo(dsn, sslmode=sslmode)
    cmd = [
        "psql",
        "-X",  # no ~/.psqlrc
        "-a",  # echo the script so a diff shows where it went wrong
        "-v",
        "ON_ERROR_STOP=0",
        "-P",
        "pager=off",
        "-A",
        "-F",
        "|",
        "-f",
        str(SQL_DIR / script),
        "-d",
        dsn,
    ]
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=_psql_env(app_name),
        capture_output=True,
        text=True,
        timeout=PSQL_TIMEOUT,
        check=False,
    )


def normalise(text: str) -> str:
    text = _NOTIFY_PID.sub(r"\1<pid>", text)
    # A new large object gets the next free OID: two runs never share it.
    return _LO_OID.sub(r"\1<oid>", text)


def assert_same_output(
    direct: subprocess.CompletedProcess[str], gateway: subprocess.CompletedProcess[str]
) -> None:
    assert gateway.returncode == direct.returncode == 0, (
        f"psql exit codes: direct {direct.returncode}, gateway {gateway.returncode}\n"
        f"gateway stderr:\n{gateway.stderr[-3000:]}"
    )
    assert normalise(gateway.stdout) == normalise(direct.stdout)
    assert normalise(gateway.stderr) == normalise(direct.stderr)


# What PostgreSQL logs when a client vanishes without Terminate or sends a
# broken startup: none of it may appear after sessions that ended normally.
UNCLEAN_DISCONNECT = (
    "unexpected EOF on client connection",
    "could not receive data from client",
    "incomplete startup packet",
    "invalid length of startup packet",
    "unexpected EOF within message length word",
)


def assert_clean_server_log(stack: Any, mark: int) -> None:
    log = stack.pg_log_since(mark)
    found = [line for line in log.splitlines() if any(n in line for n in UNCLEAN_DISCONNECT)]
    assert not found, "PostgreSQL saw unclean disconnects:\n" + "\n".join(found[:5])


def test_basic_script_output_equals_direct(stack: Any, mode: str, sslmode: str, tmp_path: Path) -> None:
    (tmp_path / "direct").mkdir()
    (tmp_path / "gateway").mkdir()
    direct = run_psql(stack.app_dsn_direct, "basic.sql", tmp_path / "direct")
    mark = stack.pg_log_mark()
    gateway = run_psql(stack.gateway_dsn[mode], "basic.sql", tmp_path / "gateway", sslmode=sslmode)
    # The script really exercised what it claims to (so equal-but-empty
    # output from two broken runs cannot pass).
    assert "ERROR:  22012: division by zero" in direct.stderr
    assert 'ERROR:  42P01: relation "no_such_table_pgwarden" does not exist' in direct.stderr
    assert "NOTICE:  00000: notice number 42" in direct.stderr
    assert "WARNING:  01000: a warning with detail" in direct.stderr
    assert "current transaction is aborted" in direct.stderr
    assert "after undefined table" in direct.stdout
    assert "after multi-statement error" in direct.stdout
    assert "answer is 42" in direct.stdout
    assert "end of script" in direct.stdout
    assert_same_output(direct, gateway)
    # psql's Terminate reached PostgreSQL: the tap closed the session cleanly.
    assert_clean_server_log(stack, mark)


def test_basic_script_over_tls_really_uses_tls(stack: Any, mode: str) -> None:
    """sslmode=require through the gateway gives an encrypted session (the tap
    terminates it) and the server sees a normal session behind it."""
    dsn = make_conninfo(stack.gateway_dsn[mode], sslmode="require")
    result = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", "SELECT current_user", "-c", r"\conninfo", "-d", dsn],
        env=_psql_env("pgwarden-psql-tls"),
        capture_output=True,
        text=True,
        timeout=PSQL_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "SSL connection (protocol: TLS" in result.stdout


def test_copy_script_output_and_files_equal_direct(
    stack: Any, mode: str, sslmode: str, tmp_path: Path
) -> None:
    (tmp_path / "direct").mkdir()
    (tmp_path / "gateway").mkdir()
    direct = run_psql(stack.app_dsn_direct, "copy.sql", tmp_path / "direct")
    mark = stack.pg_log_mark()
    gateway = run_psql(stack.gateway_dsn[mode], "copy.sql", tmp_path / "gateway", sslmode=sslmode)
    assert "COPY 20000" in direct.stdout
    assert "quoted, with comma" in direct.stdout
    assert 'invalid input syntax for type integer: "not_a_number"' in direct.stderr
    assert_same_output(direct, gateway)
    assert_clean_server_log(stack, mark)
    for name in ("payments.csv", "series.csv", "binary.dat"):
        direct_file = (tmp_path / "direct" / name).read_bytes()
        gateway_file = (tmp_path / "gateway" / name).read_bytes()
        assert direct_file, f"{name} is empty"
        assert gateway_file == direct_file, f"{name} differs through the gateway"
    assert len((tmp_path / "gateway" / "series.csv").read_bytes().splitlines()) == 20000


def _run_listen_script(
    stack: Any, dsn: str, cwd: Path, sslmode: str | None
) -> subprocess.CompletedProcess[str]:
    """Run listen.sql, and NOTIFY from a direct connection while it waits."""
    app_name = f"pgwarden-listen-{uuid.uuid4().hex[:8]}"
    # The application role may not create tables in public: set up as admin.
    with psycopg.connect(make_conninfo(stack.upstream_dsn, dbname="shop"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS pgwarden_notify_flag (set_at timestamptz)")
        conn.execute("TRUNCATE pgwarden_notify_flag")
        conn.execute("GRANT SELECT, INSERT ON pgwarden_notify_flag TO app")

    result: dict[str, subprocess.CompletedProcess[str]] = {}

    def target() -> None:
        result["psql"] = run_psql(dsn, "listen.sql", cwd, app_name=app_name, sslmode=sslmode)

    thread = threading.Thread(target=target)
    thread.start()
    try:
        with psycopg.connect(stack.app_dsn_direct, autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and thread.is_alive():
                waiting = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND state = 'active' AND query LIKE 'DO %%'",
                    (app_name,),
                ).fetchone()
                if waiting and waiting[0]:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("psql never reached the DO block waiting for the notification")
            with conn.transaction():
                conn.execute("NOTIFY pgwarden_chan, 'hello from a direct connection'")
                conn.execute("INSERT INTO pgwarden_notify_flag VALUES (now())")
    finally:
        thread.join(PSQL_TIMEOUT + 5)
    return result["psql"]


def test_listen_notify_output_equals_direct(stack: Any, mode: str, sslmode: str, tmp_path: Path) -> None:
    direct = _run_listen_script(stack, stack.app_dsn_direct, tmp_path, None)
    gateway = _run_listen_script(stack, stack.gateway_dsn[mode], tmp_path, sslmode)
    expected = (
        'Asynchronous notification "pgwarden_chan" with payload '
        '"hello from a direct connection" received from server process with PID'
    )
    assert expected in direct.stdout
    assert "from the same session" in direct.stdout
    assert "payload with 'quotes' and äöü" in direct.stdout
    assert 'payload "not delivered' not in direct.stdout
    assert_same_output(direct, gateway)


def test_large_objects_use_function_call(stack: Any, mode: str, sslmode: str, tmp_path: Path) -> None:
    """\\lo_import/\\lo_export go through FunctionCall messages; the exported
    file is byte for byte the imported one."""
    payload = bytes(range(256)) * 4096 + b"tail"  # ~1 MB, several lo_write calls
    outputs = []
    for name, dsn, mode_ssl in (
        ("direct", stack.app_dsn_direct, None),
        ("gateway", stack.gateway_dsn[mode], sslmode),
    ):
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / "blob.in").write_bytes(payload)
        outputs.append(run_psql(dsn, "largeobject.sql", workdir, sslmode=mode_ssl))
        assert (workdir / "blob.out").read_bytes() == payload, f"{name}: export differs"
    direct, gateway = outputs
    assert "lo_import " in direct.stdout and "end of script" in direct.stdout
    assert str(len(payload)) in direct.stdout
    assert_same_output(direct, gateway)
