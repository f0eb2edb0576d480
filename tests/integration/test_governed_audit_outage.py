"""The audit store goes down under load and comes back (issue 6, "Store
outage and recovery: stop the audit PostgreSQL mid-load, start it again:
nothing lost, order kept"; PCI DSS 10.2.1, 10.2.1.6, 10.3).

A second governed gateway (policyd with its AuditSink, both taps, Envoy) runs
next to the shared stack's, on the same data PostgreSQL, the same OPA and
the same token issuer, but its audit store is a database on a separate
PostgreSQL 15 started by this module (own data directory, 127.0.0.1, a free
port). Eight pgbench clients run through Envoy and one tap driver; once the
store holds the first records of the run, that PostgreSQL is stopped
(``pg_ctl stop``: ``-m fast`` for inline, ``-m immediate`` — a crash — for
ext_proc), the load keeps going, PostgreSQL is started again and the load
runs to its end. Then, once the tap's spool has drained (bounded wait):

- pgbench saw no error: the gateway kept serving while the store was down
  (the taps fail closed only when their *spool* cannot be written), and
  PostgreSQL executed statements of the run during the outage; a session
  opened during the outage logs in, is served and is recorded in full;
- the audit trail holds exactly the statements PostgreSQL executed for the
  run, each with its result, and every session's records are in the order
  PostgreSQL executed them (the statements of a session, compared one by one
  with that backend's lines in the server log), on a gap-free session chain;
- the tap recorded the outage (``sink_outage``, naming the store, not
  policyd, as what failed) and the recovery (``sink_recovered``) in the
  audit trail (10.2.1.6);
- ``pgwarden audit verify`` passes on the store;
- the tap's /metrics showed the outage while it lasted (store write errors,
  a backlog in events and spool bytes: what docs/metrics.md pages on) and
  shows no backlog once the spool has drained.

PGWARDEN_OUTAGE_LOAD_SECONDS sets the pgbench run (30 s by default), of
which about OUTAGE_SECONDS are spent with the store down.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from agent import config_path, mint
from psycopg.conninfo import make_conninfo

from pgwarden import stack as st
from pgwarden.stack import LocalStack
from policyd.audit.events import format_ts
from policyd.audit.spool import list_segments

pytestmark = pytest.mark.integration

LOAD_SECONDS = int(os.environ.get("PGWARDEN_OUTAGE_LOAD_SECONDS", "30"))
OUTAGE_SECONDS = 8
CLIENTS = 8
DRAIN_WAIT = 180.0
PGWARDEN = str(Path(sys.executable).parent / "pgwarden")
# How the store goes down under each driver: a clean fast shutdown, and a
# crash (no shutdown checkpoint, open connections cut).
STOP_MODE = {"inline": "fast", "extproc": "immediate"}

# Simple protocol, so that the values bound by pgbench are in the SQL text
# both PostgreSQL and the audit trail record: (client, n, id) names one
# execution. `n` counts the client's transactions (pgbench keeps a client's
# variables from one transaction to the next).
SCRIPT = ("\\set id random(1, 3000)\n\\set n :n + 1\n"
          "SELECT amount, merchant, :client_id AS client, :n AS n FROM payments WHERE id = :id;\n")
_CALL = re.compile(r"SELECT amount, merchant, (\d+) AS client, (\d+) AS n FROM payments "
                   r"WHERE id = (\d+)")
_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")

Call = tuple[int, int, int]  # client, n, id
PROBES = (11, 12, 13)


def probe_sql(k: int) -> str:
    return f"SELECT {k} AS probe, amount FROM payments WHERE id = {k}"


# --------------------------------------------------------------------------- the audit PostgreSQL


@dataclass
class AuditPostgres:
    """A PostgreSQL 15 of its own for the audit store, stopped and started by the test."""

    base: Path
    port: int
    user: str | None

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def _run(self, *argv: str) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, user=self.user,
                              group=self.user, extra_groups=[] if self.user else None,
                              timeout=120, check=False)
        assert done.returncode == 0, (argv[:2], done.stdout[-2000:], done.stderr[-2000:])

    def initdb(self) -> None:
        self._run(st.pg_bin("initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")

    def start(self) -> None:
        self._run(st.pg_bin("pg_ctl"), "-D", str(self.datadir), "-w", "-t", "60",
                  "-l", str(self.base / "pg.log"), "-o",
                  f"-c listen_addresses={st.HOST} -c port={self.port} "
                  f"-c unix_socket_directories={self.base} -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(st.pg_bin("pg_ctl"), "-D", str(self.datadir), "-w", "-t", "60", "-m", mode,
                  "stop")

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def url(self, db: str) -> str:
        return f"postgresql://postgres@{st.HOST}:{self.port}/{db}"


@pytest.fixture(scope="module")
def audit_pg() -> Iterator[AuditPostgres]:
    user = st.service_user()  # PostgreSQL refuses to run as root
    base = Path(tempfile.mkdtemp(prefix="pgwarden-outage-pg-"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    server = AuditPostgres(base, st.free_port(), user)
    try:
        server.initdb()
        server.start()
        with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE audit")
        yield server
    finally:
        try:
            if server.running():
                server.stop("fast")
        finally:
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- the gateway


@dataclass
class OutageGateway:
    store_url: str
    key: Path
    checkpoints: Path
    spool_dir: Path
    dsn: dict[str, str]
    tap_listen: dict[str, str]
    metrics: dict[str, str] = field(default_factory=dict)  # the taps' /metrics URLs
    procs: list[st.Proc] = field(default_factory=list)

    def spool(self, mode: str) -> Path:
        """The tap's spool (tap/services.py names it after the listen address)."""
        return self.spool_dir / f"tap-{self.tap_listen[mode].replace(':', '_')}.spool"


@pytest.fixture(scope="module")
def gateway(stack: LocalStack, audit_pg: AuditPostgres,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageGateway]:
    """policyd (AuditSink into the audit PostgreSQL), both governed taps and
    an Envoy in front of them; the stack's OPA, issuer and data PostgreSQL."""
    work = tmp_path_factory.mktemp("outage-gateway")
    config: dict[str, Any] = yaml.safe_load(config_path(stack).read_text())
    policyd_port = st.free_port()
    store_url = audit_pg.url("audit")
    config["tap"]["policyd"]["target"] = f"{st.HOST}:{policyd_port}"
    config["policyd"]["listen"] = f"{st.HOST}:{policyd_port}"
    config["tap"]["audit"].update({
        "url": store_url, "spool_dir": str(work / "spool"),
        "checkpoint_file": str(work / "audit-checkpoints.jsonl"),
        "signing_key_file": str(work / "audit-signing.key"),
        "on_spool_failure": "refuse", "ship_to": "policyd",
    })
    cfg = work / "pgwarden.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))

    gw = OutageGateway(store_url=store_url, key=work / "audit-signing.key",
                       checkpoints=work / "audit-checkpoints.jsonl", spool_dir=work / "spool",
                       dsn={}, tap_listen={})
    try:
        policyd = st.spawn("outage-policyd", [
            sys.executable, "-m", "policyd.cli", "serve", "--listen",
            f"{st.HOST}:{policyd_port}", "--opa-url", stack.extra_env["PGWARDEN_OPA_URL"],
            "--opa-deadline", "2.0", "--policy-dir", str(st.ROOT / "rego"), "--config", str(cfg),
        ], work / "policyd.log")
        gw.procs.append(policyd)
        st.wait_for_port(policyd_port, proc=policyd)
        taps: dict[str, int] = {}
        for mode in st.TAP_MODES:
            taps[mode] = st.free_port()
            gw.tap_listen[mode] = f"{st.HOST}:{taps[mode]}"
            metrics_port = st.free_port()
            gw.metrics[mode] = f"http://{st.HOST}:{metrics_port}/metrics"
            gw.procs.append(st.start_tap(mode, taps[mode], stack.postgres.port, None,
                                         ["--config", str(cfg), "--metrics-addr",
                                          f"{st.HOST}:{metrics_port}"], workdir=work,
                                         name=f"outage-tap-{mode}"))
        values: dict[str, object] = {
            "ADMIN_PORT": st.free_port(), "ENVOY_TCP_PORT": st.free_port(),
            "POSTGRES_PORT": stack.postgres.port, "MAX_CONNECTIONS": st.MAX_CONNECTIONS,
            "GATEWAY_INLINE_PORT": st.free_port(), "GATEWAY_EXTPROC_PORT": st.free_port(),
            "TAP_INLINE_PORT": taps["inline"], "TAP_EXTPROC_PORT": taps["extproc"],
        }
        envoy_cfg = st.compose_envoy(["inline.yaml", "extproc.yaml"], work / "envoy.yaml",
                                     **values)
        listen = {"inline": int(str(values["GATEWAY_INLINE_PORT"])),
                  "extproc": int(str(values["GATEWAY_EXTPROC_PORT"]))}
        gw.procs.append(st.start_envoy(envoy_cfg, workdir=work,
                                       admin_port=int(str(values["ADMIN_PORT"])),
                                       listen_ports=list(listen.values()), name="outage-envoy"))
        for mode, port in listen.items():
            gw.dsn[mode] = make_conninfo("", host="localhost", port=port, dbname="shop",
                                         user="agent", sslmode="verify-full",
                                         sslrootcert=str(stack.certs.ca))
        yield gw
    finally:
        for proc in reversed(gw.procs):
            st.stop(proc)


# --------------------------------------------------------------------------- what happened


def executed_calls(log: str, app: str) -> dict[int, list[Call]]:
    """The run's statements in the data server log, per backend, in order."""
    line = re.compile(rf"^\S+ \S+ \S+ \[(\d+)\] \S*@shop/{re.escape(app)} LOG:  statement: "
                      rf"{_CALL.pattern}", re.MULTILINE)
    out: dict[int, list[Call]] = defaultdict(list)
    for m in line.finditer(log):
        out[int(m.group(1))].append((int(m.group(2)), int(m.group(3)), int(m.group(4))))
    return dict(out)


_SESSION_RECORDS = """
    SELECT 'start' AS kind, seq, session_id, session_seq, NULL::bigint AS statement_seq,
           NULL AS sql, NULL AS tag, ts
      FROM audit_sessions WHERE session_id = ANY(%(sids)s)
    UNION ALL
    SELECT 'statement', seq, session_id, session_seq, statement_seq, sql, NULL, started_at
      FROM audit_statements WHERE session_id = ANY(%(sids)s)
    UNION ALL
    SELECT 'result', seq, session_id, session_seq, statement_seq, NULL, command_tag, finished_at
      FROM audit_statement_results WHERE session_id = ANY(%(sids)s)
    UNION ALL
    SELECT 'end', seq, session_id, session_seq, NULL, NULL, NULL, ts
      FROM audit_session_ends WHERE session_id = ANY(%(sids)s)
    UNION ALL
    SELECT 'auth', seq, session_id, session_seq, NULL, NULL, NULL, ts
      FROM audit_auth_events WHERE session_id = ANY(%(sids)s)
    ORDER BY seq
"""


@dataclass
class Audited:
    records: dict[str, list[tuple[Any, ...]]]  # session -> (kind, seq, sseq, stseq, sql, tag, ts)

    @property
    def results(self) -> int:
        return sum(1 for recs in self.records.values() for r in recs
                   if r[0] == "result" and r[5] == "SELECT 1")

    @property
    def ended(self) -> bool:
        return all(any(r[0] == "end" for r in recs) for recs in self.records.values())


def audited(url: str, app: str) -> Audited:
    with psycopg.connect(url, connect_timeout=10) as conn:
        sids = [r[0] for r in conn.execute(
            "SELECT session_id FROM audit_sessions WHERE application_name = %s", (app,))]
        out: dict[str, list[tuple[Any, ...]]] = {s: [] for s in sids}
        for kind, seq, sid, sseq, stseq, sql, tag, ts in conn.execute(_SESSION_RECORDS,
                                                                       {"sids": sids}):
            out[sid].append((kind, int(seq), int(sseq), stseq, sql, tag, ts))
    return Audited(out)


def spool_last_n(spool: Path) -> int:
    """The number of the last event the tap appended to its spool."""
    segments = list_segments(spool)
    assert segments, f"no spool at {spool}"
    last = 0
    path = spool.with_name(f"{spool.name}.{segments[-1]:08d}") if segments[-1] else spool
    with path.open("rb") as fh:
        for raw in fh:
            if raw.endswith(b"\n"):
                obj = json.loads(raw)
                last = int(obj["base"]) if "base" in obj else int(obj["n"])
    return last


def stored_position(url: str, spool: Path) -> int:
    writer_id = Path(str(spool) + ".id").read_text().strip()
    with psycopg.connect(url, connect_timeout=10) as conn:
        got = conn.execute("SELECT spool_n FROM audit_writer_state WHERE writer_id = %s",
                           (writer_id,)).fetchone()
    return int(got[0]) if got else 0


def gateway_events(url: str, writer_id: str) -> list[tuple[int, str, str, dict[str, Any]]]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT seq, action, ts, detail FROM audit_gateway_events "
            "WHERE component = 'tap' AND detail->>'writer_id' = %s ORDER BY seq",
            (writer_id,)).fetchall()
    return [(int(s), str(a), str(t), d if isinstance(d, dict) else json.loads(d))
            for s, a, t, d in rows]


def audit_series(url: str) -> dict[str, float]:
    """The tap's audit series (component "tap") from its /metrics."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
    out: dict[str, float] = {}
    for name in ("pgwarden_audit_write_errors_total", "pgwarden_audit_queue_depth",
                 "pgwarden_audit_spool_bytes"):
        m = re.search(rf'^{name}\{{component="tap"\}} (\S+)$', body, re.MULTILINE)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def _wait_until(check: Any, timeout: float, what: str, pgbench: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert pgbench.poll() is None, f"pgbench ended before {what}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.5)


def _ts(wall: float) -> str:
    """A wall-clock time in the store's text form (text order is time order)."""
    return format_ts(datetime.fromtimestamp(wall, UTC))


# --------------------------------------------------------------------------- the test


@pytest.mark.timeout(600)
def test_audit_store_outage_under_load_loses_nothing_and_keeps_order(
    stack: LocalStack, gateway: OutageGateway, audit_pg: AuditPostgres, mode: str,
    tmp_path: Path,
) -> None:
    app = f"pgw-outage-{mode}-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "point_read.sql"
    script.write_text(SCRIPT)
    token = mint(stack, f"outage-{mode}", ["fraud-readers"], ttl=900)
    # The token goes to libpq through the environment, not the command line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=token, PGAPPNAME=app)
    spool = gateway.spool(mode)
    writer_id = Path(str(spool) + ".id").read_text().strip()
    before = gateway_events(gateway.store_url, writer_id)
    errors_before = audit_series(gateway.metrics[mode])["pgwarden_audit_write_errors_total"]

    mark = stack.pg_log_mark()
    pgbench = subprocess.Popen(
        ["pgbench", "-n", "-M", "simple", "-f", str(script), "-D", "n=0", "-c", str(CLIENTS),
         "-j", "2", "-T", str(LOAD_SECONDS), gateway.dsn[mode]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # The store takes the run's first records, then goes down mid-load.
        _wait_until(lambda: audited(gateway.store_url, app).results > 0, 60,
                    "the first records of the run reached the store", pgbench)
        stopped_at = time.time()
        audit_pg.stop(STOP_MODE[mode])
        outage_mark = stack.pg_log_mark()
        began = time.monotonic()
        # A new session while the store is down: logged in, served, recorded.
        with psycopg.connect(gateway.dsn[mode], password=token, application_name=f"{app}-new",
                             connect_timeout=30, autocommit=True) as probe:
            for k in PROBES:
                assert probe.execute(probe_sql(k)).fetchone() is not None
        # What an operator sees meanwhile: failed store writes and a backlog.
        series = audit_series(gateway.metrics[mode])
        while not (series["pgwarden_audit_write_errors_total"] > errors_before
                   and series["pgwarden_audit_queue_depth"] > 0
                   and series["pgwarden_audit_spool_bytes"] > 0):
            assert time.monotonic() - began < OUTAGE_SECONDS, series
            time.sleep(0.2)
            series = audit_series(gateway.metrics[mode])
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - began)))
        during = executed_calls(stack.pg_log_since(outage_mark), app)
        assert pgbench.poll() is None, "the load ended before the store came back: raise " \
                                       "PGWARDEN_OUTAGE_LOAD_SECONDS"
        restarted_at = time.time()
        audit_pg.start()
        out, err = pgbench.communicate(timeout=LOAD_SECONDS * 10 + 120)
    finally:
        if pgbench.poll() is None:
            pgbench.kill()
            pgbench.communicate()
        if not audit_pg.running():
            audit_pg.start()

    # The gateway kept serving while the store was down.
    assert pgbench.returncode == 0, err[-2000:].replace(token, "<token>")
    processed = int(_PROCESSED.search(out).group(1))  # type: ignore[union-attr]
    failed = _FAILED.search(out)
    assert processed > 0 and (failed is None or failed.group(1) == "0"), out[-2000:]
    assert sum(len(c) for c in during.values()) > 0, "nothing executed while the store was down"

    executed = executed_calls(stack.pg_log_since(mark), app)
    total = sum(len(c) for c in executed.values())
    assert total == processed, (total, processed)
    assert len(executed) == CLIENTS, sorted(executed)

    # Everything spooled during the outage reaches the store (bounded wait).
    deadline = time.monotonic() + DRAIN_WAIT
    while True:
        got = audited(gateway.store_url, app)
        drained = stored_position(gateway.store_url, spool) >= spool_last_n(spool)
        if (got.results >= total and got.ended and drained) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert drained, (f"the tap's spool did not drain: stored up to "
                     f"{stored_position(gateway.store_url, spool)} of {spool_last_n(spool)}")
    assert got.results == total, f"PostgreSQL executed {total}, the audit trail holds {got.results}"
    # The backlog gauges fall back once everything is stored (read right
    # after a drained spool: the next ship interval stores what came since).
    deadline = time.monotonic() + 30
    while (series := audit_series(gateway.metrics[mode]))["pgwarden_audit_queue_depth"] > 0:
        assert time.monotonic() < deadline, series
        time.sleep(0.5)
    assert series["pgwarden_audit_spool_bytes"] == 0, series

    # Per session: the statements in the order that backend executed them,
    # each followed by its result, on a gap-free session chain.
    by_client: dict[int, list[Call]] = {}
    for pid, calls in executed.items():
        clients = {c[0] for c in calls}
        assert len(clients) == 1, (pid, clients)
        by_client[clients.pop()] = calls
    seen: set[int] = set()
    for sid, recs in got.records.items():
        assert [r[2] for r in recs] == list(range(1, len(recs) + 1)), f"session {sid}: gap"
        kinds = [r[0] for r in recs]
        # the token check (auth success), the session start, ..., its end
        assert kinds[:2] in (["auth", "start"], ["start", "statement"], ["start", "end"]), kinds[:3]
        assert kinds[-1] == "end" and kinds.count("start") == kinds.count("end") == 1, sid
        work = [r for r in recs if r[0] in ("statement", "result")]
        if not work:
            continue  # pgbench's own set-up connection
        calls: list[Call] = []
        for i in range(0, len(work), 2):
            stmt, res = work[i], work[i + 1] if i + 1 < len(work) else None
            assert stmt[0] == "statement" and res is not None and res[0] == "result", (sid, i)
            assert stmt[3] == res[3] == i // 2 + 1, (sid, stmt[3], res[3])
            assert res[5] == "SELECT 1", (sid, res[5])
            m = _CALL.search(stmt[4])
            assert m is not None, stmt[4]
            calls.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
        stamps = [r[6] for r in work]
        assert stamps == sorted(stamps), f"session {sid}: timestamps out of order"
        client = calls[0][0]
        assert client not in seen, f"client {client} in two sessions"
        seen.add(client)
        assert calls == by_client[client], f"session {sid} (client {client}): order differs"
    assert seen == set(by_client)

    # The session opened during the outage: all of it, in order.
    probe = audited(gateway.store_url, f"{app}-new")
    assert len(probe.records) == 1 and probe.ended, probe.records
    (recs,) = probe.records.values()
    assert [r[4] for r in recs if r[0] == "statement"] == [probe_sql(k) for k in PROBES]
    assert [r[5] for r in recs if r[0] == "result"] == ["SELECT 1"] * len(PROBES)
    assert [r[2] for r in recs] == list(range(1, len(recs) + 1))

    # The outage and the recovery are in the trail, in that order, after the
    # store went down and after it came back.
    events = [e for e in gateway_events(gateway.store_url, writer_id) if e not in before]
    actions = [e[1] for e in events]
    assert "sink_outage" in actions and "sink_recovered" in actions, actions
    outage = events[actions.index("sink_outage")]
    recovered = events[actions.index("sink_recovered")]
    assert outage[0] < recovered[0]
    assert outage[2] >= _ts(stopped_at) and recovered[2] >= _ts(restarted_at), (
        outage[2], recovered[2])
    assert recovered[3].get("outage_seconds", 0) > 0, recovered[3]
    # policyd answered, its store did not: the record names the store.
    assert outage[3].get("failed") == recovered[3].get("failed") == "store", outage[3]

    # And the chains verify.
    done = subprocess.run([PGWARDEN, "audit", "verify", "--store", gateway.store_url, "--key",
                           str(gateway.key), "--checkpoints", str(gateway.checkpoints)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**{k: v for k, v in os.environ.items()
                                  if not k.startswith("PGWARDEN_")},
                               "PGWARDEN_OPERATOR": "pytest-outage"})
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-2000:])
    assert done.stdout.startswith("OK"), done.stdout[-2000:]


def test_policyd_unreachable_is_told_apart_from_its_store() -> None:
    """The other cause of a tap's sink outage: nothing answers at policyd's
    address. The writer's record then names policyd, not the store."""
    from policyd.audit.sinks import GrpcSink, SinkUnavailable

    sink = GrpcSink(f"{st.HOST}:{st.free_port()}", timeout=5)
    try:
        with pytest.raises(SinkUnavailable) as err:
            sink.position("nobody")
    finally:
        sink.close()
    assert (err.value.failed, err.value.error) == ("policyd", "UNAVAILABLE")
