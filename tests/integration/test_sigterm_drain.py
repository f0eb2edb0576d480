"""SIGTERM during a pgbench run loses no audit event and leaves no client
hanging (issue 8).

For each tap driver, a governed tap of its own (same configuration as the
stack's governed taps: token auth, policy, masking, audit shipped to the
stack's policyd) runs behind an Envoy of its own, so the test can signal it
without disturbing the shared session stack. Eight pgbench clients run a
prepared point read through it. Mid-run, a superuser takes an ACCESS
EXCLUSIVE lock on ``payments``, so every client has a statement in flight
inside PostgreSQL, and the tap gets SIGTERM. Then, as the drain is specified
(tap/drivers/inline.py, tap/drivers/ext_proc.py):

- while it drains, the tap is not ready (``/readyz`` 503; for ext_proc also
  gRPC health NOT_SERVING) and a new client is refused before it reaches
  PostgreSQL;
- an idle session is ended with FATAL 57P01 (admin_shutdown);
- once the lock is released, the statements in flight complete, every
  pgbench client is ended by the gateway's FATAL 57P01 and pgbench exits by
  itself (a generous subprocess timeout fails the test instead of hanging);
- the tap exits by itself with code 0 within its drain bound;
- the tap flushes its audit spool to policyd before it exits, so right after
  the exit, with no waiting, the audit store holds a statement result for
  every statement PostgreSQL executed for the run (log_statement=all,
  matched by application_name as in test_governed_audit_load.py), and every
  session of the run ends with reason ``shutdown``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from agent import audit_url, config_path, mint
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.conninfo import make_conninfo
from test_governed_audit_load import SCRIPT, _executed

from pgwarden import stack as st
from pgwarden.stack import LocalStack

pytestmark = pytest.mark.integration

CLIENTS = 8
PGBENCH_SECONDS = 120  # far longer than the test: the clients must be ended by the drain
PGBENCH_TIMEOUT = 90.0  # pgbench must have exited by then, or it hung
TAP_DRAIN_SECONDS = 10.0  # both drivers' bound for statements in flight
TAP_EXIT_TIMEOUT = TAP_DRAIN_SECONDS + 30.0 + 20.0  # drain + audit flush bound + margin
SHUTDOWN_MESSAGE = "the gateway is shutting down"
PGWARDEN = str(Path(sys.executable).parent / "pgwarden")
_ABORTED_BY_SHUTDOWN = re.compile(rf"client (\d+) script \d+ aborted in command \d+ query \d+: "
                                  rf"FATAL:  {SHUTDOWN_MESSAGE}")


@dataclass
class Gateway:
    mode: str
    tap: st.Proc
    envoy: st.Proc
    port: int  # Envoy's listener for this tap
    tap_port: int
    health_port: int  # the tap's /metrics, /healthz, /readyz


def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def gateway(stack: LocalStack, mode: str, tmp_path: Path) -> Iterator[Gateway]:
    """A governed tap of this test only (it gets signalled), behind its own Envoy."""
    tap_port, health_port = st.free_port(), st.free_port()
    tap = st.start_tap(mode, tap_port, stack.postgres.port, None,
                       ["--config", str(config_path(stack)),
                        "--metrics-addr", f"{st.HOST}:{health_port}"],
                       workdir=tmp_path, name=f"drain-tap-{mode}")
    envoy: st.Proc | None = None
    try:
        values: dict[str, object] = {
            "ADMIN_PORT": st.free_port(), "POSTGRES_PORT": stack.postgres.port,
            "MAX_CONNECTIONS": st.MAX_CONNECTIONS, "GATEWAY_INLINE_PORT": st.free_port(),
            "GATEWAY_EXTPROC_PORT": st.free_port(), "TAP_INLINE_PORT": tap_port,
            "TAP_EXTPROC_PORT": tap_port,
        }
        listen = int(str(values["GATEWAY_INLINE_PORT" if mode == "inline" else
                                "GATEWAY_EXTPROC_PORT"]))
        config = st.compose_envoy([f"{mode}.yaml"], tmp_path / "envoy-drain.yaml", **values)
        envoy = stack.servers.envoy(config, workdir=tmp_path,
                                    admin_port=int(str(values["ADMIN_PORT"])),
                                    listen_ports=[listen], name=f"drain-envoy-{mode}")
        yield Gateway(mode, tap, envoy, listen, tap_port, health_port)
    finally:
        if envoy is not None:
            st.stop(envoy)
        st.stop(tap)


def dsn(stack: LocalStack, port: int, app: str, token: str) -> str:
    return make_conninfo("", host="localhost", port=port, dbname="shop", user="agent",
                         sslmode="verify-full", sslrootcert=str(stack.certs.ca),
                         application_name=app, password=token, connect_timeout=10)


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://{st.HOST}:{port}/readyz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def grpc_health(port: int) -> int:
    with grpc.insecure_channel(f"{st.HOST}:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2)
        return int(reply.status)


def lock_waiters(stack: LocalStack, app: str) -> int:
    with psycopg.connect(stack.postgres.admin_dsn("shop"), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                           "AND wait_event_type = 'Lock'", (app,)).fetchone()
    return int(row[0]) if row else 0


def audit_records(stack: LocalStack) -> list[dict[str, Any]]:
    out = subprocess.run([PGWARDEN, "audit", "export", "--format", "jsonl", "--store",
                          audit_url(stack)], capture_output=True, text=True, timeout=300,
                         check=True, env={**os.environ, **stack.extra_env}).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def redact(text: str, *secrets: str) -> str:
    for s in secrets:
        text = text.replace(s, "<token>")
    return text


@pytest.mark.timeout(300)
def test_sigterm_mid_run_drains_without_losing_audit_or_hanging_clients(
        stack: LocalStack, mode: str, gateway: Gateway, tmp_path: Path) -> None:
    app = f"pgw-drain-{mode}-{uuid.uuid4().hex[:8]}"
    token = mint(stack, f"drain-{mode}", ["fraud-readers"], ttl=900)
    late_token = mint(stack, f"drain-late-{mode}", ["fraud-readers"], ttl=900)
    script = tmp_path / "point_read.sql"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    mark = stack.pg_log_mark()

    assert readyz(gateway.health_port) == 200
    if mode == "extproc":
        assert grpc_health(gateway.tap_port) == health_pb2.HealthCheckResponse.SERVING

    # An idle session next to the busy ones: the drain must end it with 57P01 too.
    idle = psycopg.connect(dsn(stack, gateway.port, f"{app}-idle", token), autocommit=True)
    idle.execute("SELECT amount FROM payments WHERE id = 1").fetchall()

    bench = subprocess.Popen(["pgbench", "-n", "-M", "prepared", "-f", str(script), "-c",
                              str(CLIENTS), "-j", "2", "-T", str(PGBENCH_SECONDS),
                              dsn(stack, gateway.port, app, token)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    locker: psycopg.Connection[Any] | None = None
    try:
        # The run is under way: statements through the gateway reach PostgreSQL.
        until(lambda: _executed(stack.pg_log_since(mark), app) >= 200,
              "pgbench statements to reach PostgreSQL", timeout=60)
        assert bench.poll() is None, redact(bench.stderr.read() if bench.stderr else "", token)

        # Every client gets a statement stuck in flight inside PostgreSQL.
        locker = psycopg.connect(stack.postgres.admin_dsn("shop"))
        locker.execute("LOCK TABLE payments IN ACCESS EXCLUSIVE MODE")
        until(lambda: lock_waiters(stack, app) == CLIENTS, "every client to wait on the lock")

        gateway.tap.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

        # Draining: not ready, and a new client does not get through.
        until(lambda: readyz(gateway.health_port) == 503, "/readyz to answer 503", timeout=5)
        if mode == "extproc":
            assert grpc_health(gateway.tap_port) == health_pb2.HealthCheckResponse.NOT_SERVING
        late_app = f"{app}-late"
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(dsn(stack, gateway.port, late_app, late_token)).close()
        refused_text = redact(str(refused.value), token, late_token)

        # The idle session is ended with admin_shutdown.
        with pytest.raises(psycopg.OperationalError) as ended:
            idle.execute("SELECT amount FROM payments WHERE id = 2").fetchall()
        assert ended.value.sqlstate == "57P01", redact(str(ended.value), token)
        assert gateway.tap.alive(), "the tap must wait for the statements in flight"

        locker.rollback()  # the statements in flight complete now
        locker.close()
        locker = None

        try:
            _, err = bench.communicate(timeout=PGBENCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            bench.kill()
            bench.communicate()
            pytest.fail(f"pgbench still running {PGBENCH_TIMEOUT:.0f}s after the lock was "
                        "released: clients hang on a draining tap")
        err = redact(err, token)
        try:
            code = gateway.tap.popen.wait(timeout=TAP_EXIT_TIMEOUT)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the tap did not exit within {TAP_EXIT_TIMEOUT:.0f}s of SIGTERM\n"
                        f"{gateway.tap.log_tail()}")
    finally:
        if locker is not None:
            locker.close()
        idle.close()
        if bench.poll() is None:
            bench.kill()
            bench.communicate()

    assert code == 0, gateway.tap.log_tail()
    # Each pgbench client was ended by the gateway's FATAL, none by a bare reset.
    ended_by_fatal = {int(n) for n in _ABORTED_BY_SHUTDOWN.findall(err)}
    assert ended_by_fatal == set(range(CLIENTS)), err[-3000:]
    assert bench.returncode == 2, (bench.returncode, err[-3000:])  # 2: clients aborted

    log = stack.pg_log_since(mark)
    assert late_app not in log, refused_text  # the refused client never reached PostgreSQL
    executed = _executed(log, app)
    assert executed > 0

    # No waiting: the tap shipped its spool before exiting.
    records = audit_records(stack)
    sessions = {r["session_id"] for r in records
                if r.get("type") == "session_start" and r.get("application_name") == app}
    assert len(sessions) >= CLIENTS  # pgbench's own first connection is one more
    audited = sum(1 for r in records if r.get("type") == "statement_result"
                  and r.get("session_id") in sessions and r.get("command_tag") == "SELECT 1")
    assert audited == executed, f"PostgreSQL executed {executed}, the audit trail holds {audited}"
    ends = {r["session_id"]: r["reason"] for r in records
            if r.get("type") == "session_end" and r.get("session_id") in sessions}
    assert set(ends) == sessions, "every session of the run has its end recorded"
    assert list(ends.values()).count("shutdown") == CLIENTS, ends
