"""Event builders from the tap contract, the spool's crash recovery, and a
property: any single-field change to any stored record is found by verify."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from policyd.audit import emit
from policyd.audit.chain import CheckpointLog, verify
from policyd.audit.events import StatementEvent
from policyd.audit.spool import Spool, SpoolReader
from policyd.audit.store import AuditStore
from tap.hooks import Decision, Identity, RecordRows, SessionInfo, StatementRequest, Verdict

IDENT = Identity(subject="agent-7", groups=("fraud", "ci"), issuer="https://idp", actor="ci<-bob")
SESS = SessionInfo(session_id="s-1", database="payments", upstream_role="app_ro",
                   client_addr="10.1.2.3", tls=True, application_name="psql")


def test_session_start_from_hooks() -> None:
    ev = emit.session_start(IDENT, SESS, driver_mode="inline")
    assert (ev.subject, ev.groups, ev.actor, ev.tls, ev.driver_mode) == (
        "agent-7", ["fraud", "ci"], "ci<-bob", True, "inline")


def test_statement_honours_record_rows_policy() -> None:
    req = StatementRequest(identity=IDENT, session=SESS, sql="SELECT pan FROM cards WHERE id=1",
                           path="parse", params=("1",))
    rows = [["XXXXXXXXXXXX1111"], ["XXXXXXXXXXXX4444"], ["XXXXXXXXXXXX0005"]]
    capped = Decision(verdict=Verdict.ALLOW, record_rows=RecordRows.MASKED_ROWS,
                      record_rows_cap=2, analysis={"relations": ["public.cards"]})
    ev = emit.statement(req, capped, statement_seq=4, rows_returned=3, recorded_rows=rows)
    assert ev.path == "extended" and ev.params == ["1"]
    assert ev.recorded_rows == rows[:2] and ev.rows_truncated
    assert ev.fingerprint == emit.statement(
        StatementRequest(identity=IDENT, session=SESS, sql="SELECT pan FROM cards WHERE id=2"),
        capped, statement_seq=5).fingerprint
    counted = Decision(verdict=Verdict.ALLOW)  # record_rows=count
    ev = emit.statement(req, counted, statement_seq=1, rows_returned=3, recorded_rows=rows)
    assert ev.recorded_rows is None and ev.rows_returned == 3
    silent = Decision(verdict=Verdict.ALLOW, record_rows=RecordRows.NONE)
    res = emit.statement_result("s-1", 1, silent, rows_returned=3, recorded_rows=rows,
                                finished_at=datetime.now(UTC))
    assert res.rows_returned is None and res.recorded_rows is None


def test_torn_spool_line_is_cut_and_earlier_lines_kept(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool.jsonl")
    sp.append(['{"type":"gateway","action":"start"}'] * 3)
    sp.close()
    [segment] = tmp_path.glob("spool.jsonl.0*")
    with open(segment, "ab") as f:
        f.write(b'{"n":4,"e":{"type":"gat')  # the process died inside write()
    sp = Spool(tmp_path / "spool.jsonl")
    assert sp.last_n == 3
    assert sp.append(['{"type":"gateway","action":"stop"}']) == (4, 4)
    reader = SpoolReader(tmp_path / "spool.jsonl")
    assert [(e.n, e.event["action"]) for e in reader.read(0, 10)] == [
        (1, "start"), (2, "start"), (3, "start"), (4, "stop")]
    sp.close()
    reader.close()


def test_reader_hands_out_each_event_as_the_text_that_was_spooled(tmp_path: Path) -> None:
    """The shipper sends the spooled text to policyd without parsing it; the
    text must be exactly the event, even one whose strings look like the
    line's own framing."""
    import json

    texts = ['{"type":"gateway","action":"start"}',
             json.dumps({"type": "statement", "sql": 'select \'{"n":9,"e":{}}\', \'}\n\''}),
             json.dumps({"type": "statement", "sql": "caf\u00e9 ,\"e\":"}, ensure_ascii=False)]
    sp = Spool(tmp_path / "spool.jsonl")
    sp.append(texts)
    reader = SpoolReader(tmp_path / "spool.jsonl")
    entries = reader.read(0, 10)
    assert [e.n for e in entries] == [1, 2, 3]
    assert [e.raw for e in entries] == [t.encode() for t in texts]
    assert [e.event for e in entries] == [json.loads(t) for t in texts]
    assert reader.read(2, 10)[0].n == 3
    sp.close()
    reader.close()


def test_reader_follows_segments_and_deletes_stored_ones(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool.jsonl", segment_bytes=200)
    reader = SpoolReader(tmp_path / "spool.jsonl")
    seen: list[int] = []
    for k in range(20):
        sp.append([f'{{"type":"gateway","action":"start","k":{k}}}'] * 2)
        if k % 3 == 0:
            got = reader.read(seen[-1] if seen else 0, 5)
            seen += [e.n for e in got]
            if got:
                reader.advance(got[-1])
    while got := reader.read(seen[-1], 7):
        seen += [e.n for e in got]
        reader.advance(got[-1])
    assert seen == list(range(1, 41))
    assert len(list(tmp_path.glob("spool.jsonl.0*"))) <= 2  # the last read and the newest
    sp.close()
    sp = Spool(tmp_path / "spool.jsonl")  # numbering survives deletion of old segments
    assert sp.append(["{}"]) == (41, 41)
    sp.close()
    reader.close()


MUTABLE = ["sql", "verdict", "subject", "ts", "session_id", "command_tag", "reasons",
           "rows_returned", "statement_seq", "prev_hash", "session_seq"]


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty migrated store, copied per example (migrating costs more than the test)."""
    path = tmp_path_factory.mktemp("template") / "a.db"
    AuditStore(f"sqlite:///{path}").close()
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 12), victim=st.integers(0, 11), field=st.sampled_from(MUTABLE))
def test_any_single_field_change_is_found(
    migrated: Path, n: int, victim: int, field: str
) -> None:
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(migrated, f"{d}/a.db")
        with AuditStore(f"sqlite:///{d}/a.db", migrate=False) as store:
            store.append([StatementEvent(session_id=f"s{i % 3}", statement_seq=i + 1,
                                         sql=f"SELECT {i}", verdict="allow",
                                         command_tag="SELECT 1", rows_returned=1,
                                         reasons=["ok"]) for i in range(n)])
            seq = victim % n + 1
            new = {"sql": "'SELECT 999'", "verdict": "'deny'", "subject": "'mallory'",
                   "ts": "'1999-01-01T00:00:00.000000Z'", "session_id": "'other'",
                   "command_tag": "'DELETE 5'", "reasons": "'[]'", "rows_returned": "7",
                   "statement_seq": "statement_seq + 100", "prev_hash": "'" + "1" * 64 + "'",
                   "session_seq": "session_seq + 1"}[field]
            with store.engine.begin() as c:
                c.execute(text(f"UPDATE audit_statements SET {field} = {new} WHERE seq = :s"),
                          {"s": seq})
            report = verify(store, CheckpointLog(Path(d) / "none.jsonl"), None)
            assert report.problems, (field, seq)
            assert report.problems[0].seq == seq and report.problems[0].table == "audit_statements"
