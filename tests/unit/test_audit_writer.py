"""The writer: spool first, batches, outage and recovery in order, exactly
once after a crash, fail closed when the spool cannot be written, and no
PAN, token or password in the store, the spool or the checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from shipping import ship_until_idle
from sqlalchemy import text

from policyd.audit.events import Event, GatewayEvent, StatementEvent
from policyd.audit.store import AuditStore
from policyd.audit.writer import AuditWriter

REPO = Path(__file__).resolve().parents[2]
PANS = ["4111111111111111", "5555555555554444", "378282246310005"]
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhZ2VudC03In0.c2lnbmF0dXJlLWJ5dGVz"
PASSWORD = "Tr0ub4dor&3-hunter2"


def stmts(sid: str, n: int, start: int = 1) -> list[Event]:
    return [
        StatementEvent(session_id=sid, statement_seq=i, sql=f"SELECT {i}", verdict="allow")
        for i in range(start, start + n)
    ]


def writer(tmp: Path, url: str, **kw: object) -> AuditWriter:
    return AuditWriter(url, tmp / "spool.jsonl", signing_key=tmp / "key",
                       checkpoint_file=tmp / "cp.jsonl", retry_max_seconds=0.2,
                       **kw)  # type: ignore[arg-type]


def statement_order(url: str) -> list[tuple[str, int]]:
    with AuditStore(url) as st, st.engine.connect() as c:
        return [(r[0], r[1]) for r in c.execute(
            text("SELECT session_id, statement_seq FROM audit_statements ORDER BY seq"))]


def test_batches_many_events_per_transaction(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    w = writer(tmp_path, url, batch_size=500).start()
    for k in range(20):
        assert w.submit(stmts("s", 100, start=k * 100 + 1))
    assert w.close()
    assert w.stats.stored == 2002
    assert w.stats.batches <= 2002 / 50  # never one transaction per event
    assert statement_order(url) == [("s", i) for i in range(1, 2001)]


def test_outage_and_recovery_keep_order_and_lose_nothing(tmp_path: Path) -> None:
    """The store directory is blocked by a plain file: the store cannot be
    opened, events wait in the spool; once unblocked everything arrives in
    order, bracketed by sink_outage/sink_recovered records."""
    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    url = f"sqlite:///{blocker / 'a.db'}"
    w = writer(tmp_path, url, batch_size=7).start()
    for k in range(10):
        assert w.submit(stmts("s", 10, start=k * 10 + 1))
    assert not w.flush(timeout=1.0)
    assert w.in_outage
    blocker.unlink()
    assert w.flush(timeout=30)
    assert w.close()
    assert statement_order(url) == [("s", i) for i in range(1, 101)]
    with AuditStore(url) as st, st.engine.connect() as c:
        actions = [r[0] for r in c.execute(
            text("SELECT action FROM audit_gateway_events ORDER BY seq"))]
    assert actions == ["start", "sink_outage", "sink_recovered", "stop"]


def test_backlog_and_store_errors_are_exposed_while_the_store_is_down(tmp_path: Path) -> None:
    """docs/metrics.md pages on the spool not draining: the gauges must show
    the backlog while the store is down and fall to zero once it is stored;
    each failed attempt counts as a store write error."""
    from prometheus_client import REGISTRY

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"component": "unit-writer"}) or 0.0

    errors0 = sample("pgwarden_audit_write_errors_total")
    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    url = f"sqlite:///{blocker / 'a.db'}"
    w = writer(tmp_path, url, batch_size=7, component="unit-writer").start()
    for k in range(10):
        assert w.submit(stmts("s", 10, start=k * 10 + 1))
    assert not w.flush(timeout=1.0)
    # the writer's start record, the 100 statements and its sink_outage
    # record wait in the spool
    assert sample("pgwarden_audit_queue_depth") == 102
    on_disk = sum(f.stat().st_size for f in tmp_path.glob("spool.jsonl*")
                  if not f.name.endswith((".lock", ".id")))
    assert 0 < sample("pgwarden_audit_spool_bytes") <= on_disk
    assert sample("pgwarden_audit_write_errors_total") > errors0
    blocker.unlink()
    assert w.flush(timeout=30)
    assert sample("pgwarden_audit_queue_depth") == 0
    assert sample("pgwarden_audit_spool_bytes") == 0
    assert w.close()
    assert sample("pgwarden_audit_queue_depth") == 0


def test_spool_replay_after_kill_9_is_exactly_once(tmp_path: Path) -> None:
    """A producer killed with SIGKILL right after submit() returned loses
    nothing: the next writer on the same spool stores every event once."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from policyd.audit.events import StatementEvent
        from policyd.audit.writer import AuditWriter
        t = Path({str(tmp_path)!r})
        w = AuditWriter({url!r}, t / "spool.jsonl", signing_key=t / "key",
                        checkpoint_file=t / "cp.jsonl", batch_size=50)
        w.start()
        for k in range(40):
            evs = [StatementEvent(session_id="k", statement_seq=k * 25 + i, sql="SELECT 1",
                                  verdict="allow") for i in range(1, 26)]
            assert w.submit(evs)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=False)
    assert proc.returncode == -signal.SIGKILL
    w = writer(tmp_path, url).start()
    assert w.close()
    assert statement_order(url) == [("k", i) for i in range(1, 1001)]


def test_spool_failure_fails_closed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    w = writer(tmp_path, url, max_spool_bytes=4000).start()
    results = [w.submit(stmts("s", 5, start=k * 5 + 1)) for k in range(30)]
    assert results[0] is True and results[-1] is False
    assert w.stats.refused > 0
    w.close()


def test_spool_failure_fail_open_keeps_events_in_memory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    w = writer(tmp_path, url, max_spool_bytes=4000, fail_closed=False).start()
    assert all(w.submit(stmts("s", 5, start=k * 5 + 1)) for k in range(30))
    assert w.flush(timeout=30)
    w.close()
    assert statement_order(url) == [("s", i) for i in range(1, 151)]


def test_stored_spool_segments_are_deleted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    w = writer(tmp_path, url, segment_bytes=2000).start()
    for k in range(10):
        assert w.submit(stmts("s", 5, start=k * 5 + 1))
    assert w.flush()
    assert w.submit(stmts("s", 1, start=51))  # the shipper deletes behind itself
    assert w.flush()
    w.close()
    segments = sorted(tmp_path.glob("spool.jsonl.0*"))
    assert 1 <= len(segments) <= 2
    assert json.loads(segments[-1].read_text().splitlines()[0])["base"] > 0
    assert statement_order(url) == [("s", i) for i in range(1, 52)]


def test_no_pan_token_or_password_reaches_store_spool_or_checkpoints(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    secret_events: list[Event] = [
        StatementEvent(session_id="x", statement_seq=1, verdict="allow",
                       sql=f"SELECT * FROM cards WHERE pan = '{PANS[0]}'",
                       recorded_rows=[[PANS[1], None]]),
        StatementEvent(session_id="x", statement_seq=2, verdict="deny",
                       sql=f"ALTER ROLE app WITH PASSWORD '{PASSWORD}'",
                       reasons=["role change"]),
        StatementEvent(session_id="x", statement_seq=3, verdict="allow",
                       sql="SELECT * FROM cards WHERE pan = $1 AND note = $2",
                       params=[PANS[2], f"Bearer {JWT}"], path="extended"),
        StatementEvent(session_id="x", statement_seq=4, verdict="allow",
                       sql="ALTER USER app PASSWORD $1", params=[PASSWORD], path="extended"),
        StatementEvent(session_id="x", statement_seq=5, verdict="allow",
                       sql=f"SELECT dblink_connect('host=db password={PASSWORD}')",
                       analysis={"error": f'syntax error at or near "{PANS[1]}"'},
                       error_sqlstate="22P02",
                       error_message=f'invalid input syntax: "{PANS[0]}" token {JWT}'),
        GatewayEvent(action="policy_reload", detail={"note": f"saw {PANS[1]}"}),
    ]
    # Spool only, store unreachable: the spool is scanned before anything is stored.
    blocker = tmp_path / "blocked"
    blocker.write_text("")
    w0 = writer(tmp_path, f"sqlite:///{blocker / 'a.db'}")
    assert w0.submit(secret_events)
    spool_text = b"".join(p.read_bytes() for p in tmp_path.glob("spool.jsonl.*"))
    assert b"statement" in spool_text
    w0.spool.close()
    w = writer(tmp_path, url).start()
    assert w.submit(secret_events)
    assert w.close()
    w_blob = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
                      and p.name != "blocked")
    for blob in (spool_text, w_blob):
        for secret in [*PANS, JWT, PASSWORD, "hunter2"]:
            assert secret.encode() not in blob, secret
    with AuditStore(url) as st:
        rows = [r.row for r in st.iter_records() if r.table == "audit_statements"]
    assert rows[0]["sql"].endswith("1111'")  # last four kept
    assert rows[1]["sql"] == "ALTER ROLE app WITH PASSWORD '<redacted>'"
    assert rows[3]["params"] == ["<redacted>"]
    assert rows[0]["recorded_rows"][0][1] is None


def test_store_reopened_by_a_new_writer_continues_the_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    for run in range(3):
        w = writer(tmp_path, url).start()
        assert w.submit(stmts(f"r{run}", 10))
        assert w.close()
    with AuditStore(url) as st:
        assert st.head()[0] == 36
    assert os.path.getsize(tmp_path / "cp.jsonl") > 0


def test_one_writer_per_spool(tmp_path: Path) -> None:
    from policyd.audit.spool import SpoolError

    url = f"sqlite:///{tmp_path / 'a.db'}"
    w = writer(tmp_path, url).start()
    try:
        try:
            writer(tmp_path, url)
        except SpoolError as exc:
            assert "in use by another process" in str(exc)
        else:
            raise AssertionError("a second writer opened the same spool")
    finally:
        w.close()


def test_separate_shipper_process_stores_exactly_once_across_kill_9(tmp_path: Path) -> None:
    """The producer only spools (ship=False); `pgwarden audit ship` stores in
    its own process. Killing the shipper with SIGKILL and starting another
    stores each event once, in order."""
    import time

    url = f"sqlite:///{tmp_path / 'a.db'}"
    producer = AuditWriter(url, tmp_path / "spool.jsonl", ship=False, segment_bytes=4000,
                           signing_key=tmp_path / "key", checkpoint_file=tmp_path / "cp.jsonl")
    producer.start()
    argv = [sys.executable, "-c", "from policyd.audit.cli import audit_app; audit_app()",
            "ship", "--spool", str(tmp_path / "spool.jsonl"), "--store", url,
            "--key", str(tmp_path / "key"), "--checkpoints", str(tmp_path / "cp.jsonl"),
            "--batch-size", "20"]

    def stored() -> int:
        try:
            with AuditStore(url) as st, st.engine.connect() as c:
                return int(c.execute(text("SELECT count(*) FROM audit_statements")).scalar_one())
        except Exception:
            return 0

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while stored() < n and time.monotonic() < deadline:
            time.sleep(0.1)

    first = subprocess.Popen(argv, cwd=REPO)
    for k in range(10):
        assert producer.submit(stmts("p", 10, start=k * 10 + 1))
    wait_for(30)
    first.kill()  # SIGKILL, possibly mid-batch
    first.wait()
    for k in range(10, 20):
        assert producer.submit(stmts("p", 10, start=k * 10 + 1))
    producer.close()
    second = subprocess.Popen(argv, cwd=REPO)
    wait_for(200)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0
    assert statement_order(url) == [("p", i) for i in range(1, 201)]
    assert len(list(tmp_path.glob("spool.jsonl.0*"))) <= 2  # stored segments deleted


@pytest.mark.parametrize("bad", [
    '{"session_id":"d"}',  # no type: no table to put it in
    # a type but no session_id: both chains are keyed on it (this one used to
    # count as a store outage and block the spool)
    '{"type":"gateway","action":"start"}',
])
def test_a_spooled_line_the_store_cannot_take_is_quarantined_by_the_direct_sink(
        tmp_path: Path, bad: str) -> None:
    """The direct (StoreSink) path: a line that cannot become a row is set
    aside like one policyd refuses, and the others are stored."""
    from policyd.audit.sinks import StoreSink
    from policyd.audit.spool import Spool
    from policyd.audit.writer import SpoolShipper

    spool_path = tmp_path / "s.spool"
    good = [StatementEvent(session_id="d", statement_seq=i, sql="SELECT 1",
                           verdict="allow").model_dump_json() for i in (1, 2, 3)]
    spool = Spool(spool_path)
    spool.append([good[0], bad, good[1], good[2]])
    spool.close()
    url = f"sqlite:///{tmp_path / 'a.db'}"
    shipper = SpoolShipper(spool_path, StoreSink(url), writer_id="w", interval=0.01)
    ship_until_idle(shipper)
    assert shipper.stats.outages == 0
    with AuditStore(url) as store, store.engine.connect() as c:
        seqs = [r[0] for r in c.execute(text(
            "SELECT statement_seq FROM audit_statements ORDER BY seq"))]
        actions = [r[0] for r in c.execute(text("SELECT action FROM audit_gateway_events"))]
    assert seqs == [1, 2, 3] and actions == ["event_quarantined"]
    [line] = shipper.quarantine_path.read_text().splitlines()
    assert json.loads(line)["n"] == 2 and json.loads(line)["event"] == bad


def test_a_busy_shipper_lets_batches_fill_instead_of_shipping_back_to_back(
        tmp_path: Path) -> None:
    """Under a steady load a shipper that shipped again as soon as a batch
    was stored made batches as small as one store round trip (the store's
    fixed cost per batch then dominated policyd's CPU). A partial batch now
    waits up to one ship interval for the next events."""
    import time

    from policyd.audit.sinks import StoreSink

    url = f"sqlite:///{tmp_path / 'a.db'}"
    sizes: list[int] = []

    class SlowStore(StoreSink):
        def append(self, writer_id, entries):  # type: ignore[no-untyped-def]
            sizes.append(len(entries))
            time.sleep(0.02)  # a store under load
            return super().append(writer_id, entries)

    w = writer(tmp_path, url, sink=SlowStore(url), ship_interval=0.2).start()
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < 1.0:
        n += 1
        assert w.submit(stmts("busy", 1, start=n))
        time.sleep(0.002)
    assert w.close()
    assert statement_order(url) == [("busy", i) for i in range(1, n + 1)]
    # back to back, 1 s of 20 ms appends made ~50 batches; with the wait ~6
    assert len(sizes) <= 15, sizes

