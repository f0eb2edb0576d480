"""The audit store on a real PostgreSQL 15 started for these tests (initdb in a
temporary directory, 127.0.0.1, a free port): tamper detection, a store
outage and recovery mid-stream, and replay/export."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from policyd.audit.chain import CheckpointLog, load_or_create_key, verify
from policyd.audit.cli import audit_app, replay_app
from policyd.audit.events import ApprovalEvent, Event, SessionEndEvent, SessionStartEvent, StatementEvent
from policyd.audit.models import GENESIS, record_tables
from policyd.audit.store import AuditStore
from policyd.audit.writer import AuditWriter

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalPostgres:
    datadir: Path
    port: int
    user: str | None

    def _run(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, user=self.user,
                       group=self.user, extra_groups=[] if self.user else None)

    def start(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-w", "-t", "60",
                  "-l", str(self.datadir.parent / "pg.log"), "-o",
                  f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                  f"-c unix_socket_directories={self.datadir.parent} -c fsync=off",
                  "start")

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-w", "-m", "fast", "stop")

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="module")
def pg() -> Iterator[LocalPostgres]:
    user = "postgres" if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
    base = Path(tempfile.mkdtemp(prefix="pgwarden-audit-pg-"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    server = LocalPostgres(base / "data", _free_port(), user)
    server._run(str(PG_BIN / "initdb"), "-D", str(server.datadir), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def session(sid: str, n: int = 3) -> list[Event]:
    events: list[Event] = [SessionStartEvent(session_id=sid, subject="agent-7", groups=["ci"])]
    events += [StatementEvent(session_id=sid, statement_seq=i, sql=f"SELECT {i}",
                              verdict="deny" if i == 2 else "allow", command_tag="SELECT 1",
                              rows_returned=1) for i in range(1, n + 1)]
    events.append(SessionEndEvent(session_id=sid, reason="client_disconnect"))
    return events


def write(tmp: Path, url: str, events: list[Event], **kw: object) -> AuditWriter:
    w = AuditWriter(url, tmp / "spool.jsonl", signing_key=tmp / "key",
                    checkpoint_file=tmp / "cp.jsonl", retry_max_seconds=0.3,
                    **kw)  # type: ignore[arg-type]
    w.start()
    assert w.submit(events)
    return w


def problems(tmp: Path, st: AuditStore) -> list[tuple[str, str, int]]:
    key = load_or_create_key(tmp / "key", create=False)
    report = verify(st, CheckpointLog(tmp / "cp.jsonl"), key.public_key())
    return [(p.kind, p.table, p.seq) for p in report.problems]


@pytest.mark.parametrize("tamper", ["none", "edit", "delete", "insert", "reorder"])
def test_tampering_is_detected_and_named(pg: LocalPostgres, tmp_path: Path, tamper: str) -> None:
    url = pg.create_db(f"audit_{tamper}")
    assert write(tmp_path, url, session("a") + session("b"), batch_size=4).close()
    with AuditStore(url) as st:
        assert st.dialect == "postgresql"
        with st.engine.begin() as c:
            deny = int(c.execute(text(
                "SELECT seq FROM audit_statements WHERE verdict = 'deny' ORDER BY seq LIMIT 1"
            )).scalar_one())
            if tamper == "edit":
                c.execute(text("UPDATE audit_statements SET sql = 'SELECT 42' WHERE seq = :s"),
                          {"s": deny})
            elif tamper == "delete":
                c.execute(text("DELETE FROM audit_statements WHERE seq = :s"), {"s": deny})
            elif tamper == "insert":
                forged = ApprovalEvent(session_id="a", approval_id="x", action="approved",
                                       approver="mallory").model_dump(mode="json")
                forged.pop("type")
                forged.update(seq=deny, session_seq=3, session_prev_hash=GENESIS,
                              session_hash=GENESIS, prev_hash=GENESIS, hash=GENESIS)
                c.execute(record_tables()["audit_approvals"].insert(), [forged])
            elif tamper == "reorder":
                c.execute(text("UPDATE audit_statements SET seq = -seq WHERE seq IN (:a, :b)"),
                          {"a": deny - 1, "b": deny})
                c.execute(text("UPDATE audit_statements SET seq = CASE WHEN seq = :na THEN :b "
                               "ELSE :a END WHERE seq < 0"),
                          {"na": -(deny - 1), "a": deny - 1, "b": deny})
        found = problems(tmp_path, st)
    expected = {
        "none": [],
        "edit": [("changed", "audit_statements", deny)],
        "delete": [("deleted", "audit_statements", deny + 1)],
        "insert": [("inserted", "audit_approvals", deny)],
    }
    if tamper == "reorder":
        assert ("reordered", "audit_statements", deny - 1) in found
        assert ("reordered", "audit_statements", deny) in found
    else:
        assert found == expected[tamper]


def test_store_outage_mid_stream_loses_nothing_and_keeps_order(
    pg: LocalPostgres, tmp_path: Path
) -> None:
    url = pg.create_db("audit_outage")
    w = write(tmp_path, url, [], batch_size=50)
    total = 60
    stopped = threading.Event()
    restarted = threading.Event()
    accepted: list[bool] = []

    def produce() -> None:
        for k in range(total):
            evs: list[Event] = [StatementEvent(session_id="load", statement_seq=k * 10 + i,
                                               sql="SELECT 1", verdict="allow")
                                for i in range(1, 11)]
            accepted.append(w.submit(evs))
            if k == total // 3:
                pg.stop()
                stopped.set()
            if k == 2 * total // 3:
                pg.start()
                restarted.set()

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(timeout=120)
    assert stopped.is_set() and restarted.is_set()
    assert all(accepted)  # the data path never waited for, nor failed on, the store
    assert w.flush(timeout=60)
    assert w.close()
    assert w.stats.outages >= 1
    with AuditStore(url) as st:
        with st.engine.connect() as c:
            seqs = [r[0] for r in c.execute(text(
                "SELECT statement_seq FROM audit_statements ORDER BY seq"))]
            actions = [r[0] for r in c.execute(text(
                "SELECT action FROM audit_gateway_events ORDER BY seq"))]
        assert seqs == list(range(1, total * 10 + 1))
        assert actions[0] == "start" and actions[-1] == "stop"
        assert "sink_outage" in actions
        assert actions.index("sink_outage") < actions.index("sink_recovered")
        assert problems(tmp_path, st) == []


def test_replay_and_export_read_postgres(pg: LocalPostgres, tmp_path: Path) -> None:
    url = pg.create_db("audit_replay")
    assert write(tmp_path, url, session("r1")).close()
    runner = CliRunner()
    out = runner.invoke(replay_app, ["r1", "--store", url])
    assert out.exit_code == 0, out.output
    assert "#2 (simple) DENY" in out.output and "subject=agent-7" in out.output
    out = runner.invoke(audit_app, ["export", "--store", url])
    assert out.exit_code == 0 and out.output.count('"type": "statement"') == 3
    env = {"PGWARDEN_AUDIT_KEY": str(tmp_path / "key"),
           "PGWARDEN_AUDIT_CHECKPOINTS": str(tmp_path / "cp.jsonl")}
    out = runner.invoke(audit_app, ["verify", "--store", url], env=env)
    assert out.exit_code == 0, out.output


def test_two_writers_extend_one_chain(pg: LocalPostgres, tmp_path: Path) -> None:
    """Two producers (two tap replicas) share the store: their batches take
    turns on the chain head and the chain still verifies."""
    url = pg.create_db("audit_replicas")
    writers = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        writers.append(AuditWriter(url, d / "spool.jsonl", signing_key=tmp_path / "key",
                                   checkpoint_file=tmp_path / "cp.jsonl", batch_size=25).start())

    def produce(w: AuditWriter, sid: str) -> None:
        for k in range(20):
            assert w.submit([StatementEvent(session_id=sid, statement_seq=k * 10 + i,
                                            sql="SELECT 1", verdict="allow")
                             for i in range(1, 11)])

    threads = [threading.Thread(target=produce, args=(w, f"s-{i}"))
               for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(w.close() for w in writers)
    with AuditStore(url) as st:
        with st.engine.connect() as c:
            per_session = dict(c.execute(text(
                "SELECT session_id, count(*) FROM audit_statements GROUP BY session_id")).all())
        assert per_session == {"s-0": 200, "s-1": 200}
        assert problems(tmp_path, st) == []


def test_batches_that_move_many_session_heads_verify(pg: LocalPostgres, tmp_path: Path) -> None:
    """Sessions taking turns: each batch moves the heads of sessions the
    store already knows in one executemany (PostgreSQL: one pipeline, not a
    round trip per session)."""
    url = pg.create_db("audit_many_heads")
    sids = [f"m{k}" for k in range(7)]
    events: list[Event] = [StatementEvent(session_id=sid, statement_seq=i, sql=f"SELECT {i}",
                                          verdict="allow")
                           for i in range(1, 7) for sid in sids]
    w = write(tmp_path, url, events, batch_size=5)
    assert w.close()
    with AuditStore(url) as st:
        assert problems(tmp_path, st) == []
        with st.engine.connect() as c:
            heads = dict(c.execute(text(
                "SELECT session_id, session_seq FROM audit_session_heads")).all())
    # (session '' chains the writer's own gateway start and stop records)
    assert {k: v for k, v in heads.items() if k} == {sid: 6 for sid in sids}
