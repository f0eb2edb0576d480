"""The tap's session records become audit events in a real (SQLite) store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from policyd.audit.writer import AuditWriter
from tap.audit_sink import AuditSink

PAN = "4111111111111111"


def test_records_of_a_session_are_stored_scrubbed(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    writer = AuditWriter(f"sqlite:///{db}", tmp_path / "tap.spool",
                         signing_key=tmp_path / "k", checkpoint_file=tmp_path / "cp.jsonl")
    writer.start()
    sink = AuditSink(writer, instance="test")
    sid = "s-1"
    records = [
        {"type": "gateway", "action": "start", "component": "tap", "detail": {"driver": "inline"}},
        {"type": "auth", "session_id": sid, "outcome": "failure", "reason": "expired"},
        {"type": "session_start", "session_id": sid, "subject": "fraud-bot",
         "groups": ["fraud-readers"], "issuer": "dev", "kind": "agent", "actor": None,
         "client_addr": "127.0.0.1:5", "database": "shop", "user": "x",
         "upstream_role": "fraud_reader", "tls": True, "application_name": "a", "driver": "inline"},
        {"type": "statement", "session_id": sid, "seq": 1,
         "sql": f"select * from payments where card_number = '{PAN}'", "path": "simple",
         "verdict": "allow", "reasons": [], "decision_id": "d1", "policy_revision": "r1",
         "approval_id": ""},
        {"type": "statement_end", "session_id": sid, "seq": 1, "rows": 2, "tags": ["SELECT 2"],
         "path": "simple", "masked": {"values": 2, "by_column": {"card_number": 2},
                                      "by_rule": {"last4": 2}}},
        {"type": "statement", "session_id": sid, "seq": 2, "sql": "drop database shop",
         "path": "parse", "verdict": "deny", "reasons": ["always blocked"], "decision_id": "d2",
         "policy_revision": "r1", "approval_id": ""},
        {"type": "protocol_error", "session_id": "s-2", "sqlstate": "08P01",
         "message": "invalid message length", "reason": "protocol_error"},
        {"type": "session_end", "session_id": sid, "reason": "client_terminate"},
        {"type": "statement_refused", "session_id": sid, "seq": 2},
    ]
    assert sink.submit(records)
    assert writer.flush(30)
    writer.close()
    text = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert PAN.encode() not in text  # store, spool and checkpoints
    con = sqlite3.connect(db)
    tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
    dump = "\n".join(str(row) for t in tables for row in con.execute(f'select * from "{t}"'))
    assert "fraud-bot" in dump and "drop database shop" in dump and "SELECT 2" in dump
    assert "expired" in dump and "invalid message length" in dump


def test_fast_lines_equal_the_model_path(tmp_path: Path) -> None:
    """The hot-path JSON of statement records parses to the same event as the
    pydantic path with scrubbing (ids and times aside)."""
    from policyd.audit.events import event_to_json, parse_event
    from policyd.audit.scrub import scrub_event

    writer = AuditWriter(f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "s.spool", ship=False,
                         signing_key=tmp_path / "k", checkpoint_file=tmp_path / "c")
    sink = AuditSink(writer)
    records = [
        {"type": "statement", "session_id": "s", "seq": 3,
         "sql": f"alter role x password 'hunter2' -- {PAN}", "path": "parse",
         "verdict": "deny", "reasons": [f"card {PAN}"], "decision_id": "d",
         "policy_revision": "r", "approval_id": "ap_1", "analysis": {"note": PAN}},
        {"type": "statement_end", "session_id": "s", "seq": 3, "rows": 0,
         "tags": ["UPDATE 2", "INSERT 0 1"], "sqlstate": "23505",
         "error": f"Key (card_number)=({PAN}) already exists.",
         "masked": {"values": 1, "by_column": {"c": 1}, "by_rule": {"last4": 1}}},
    ]
    for r in records:
        fast = parse_event(sink.fast_line(r) or "")
        slow_event = sink.convert(r)
        assert slow_event is not None
        slow = parse_event(event_to_json(scrub_event(slow_event)))
        ignore = {"event_id", "ts", "started_at", "finished_at"}
        assert ({k: v for k, v in fast.model_dump().items() if k not in ignore}
                == {k: v for k, v in slow.model_dump().items() if k not in ignore})
        assert PAN not in (sink.fast_line(r) or "") and "hunter2" not in (sink.fast_line(r) or "")
    writer.spool.close()


def test_derived_pan_in_an_error_never_reaches_the_store(tmp_path: Path) -> None:
    writer = AuditWriter(f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "s.spool", ship=False,
                         signing_key=tmp_path / "k", checkpoint_file=tmp_path / "c")
    sink = AuditSink(writer)
    hexed = PAN.encode().hex()
    r = {"type": "statement_end", "session_id": "s", "seq": 1, "rows": 0, "tags": [],
         "sqlstate": "22003", "error": f'value "{hexed}" is out of range for type integer'}
    line = sink.fast_line(r) or ""
    event = sink.convert(r)
    assert hexed not in line and event is not None and hexed not in event.model_dump_json()
    assert PAN[::-1] not in (sink.fast_line({**r, "error": f"bad {PAN[::-1]}"}) or "")
    writer.spool.close()


def test_event_ids_are_distinct_uuid4_hex() -> None:
    import uuid

    from tap.audit_sink import _event_id

    ids = [_event_id() for _ in range(1000)]  # crosses the 256-id pool several times
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(hex=text)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, text)


def test_record_timestamps_are_iso_utc_with_microseconds_and_current() -> None:
    import datetime as dt
    import re
    import time

    from tap.audit_sink import _ts

    # (1 µs of slack: the fraction is truncated from a float)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(microseconds=1)
    stamps = []
    for _ in range(5):
        stamps.append(_ts())
        time.sleep(0.3)  # crosses at least one second boundary
    after = dt.datetime.now(dt.UTC)
    for text in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", text), text
        assert before <= dt.datetime.fromisoformat(text) <= after
    parsed = [dt.datetime.fromisoformat(t) for t in stamps]
    assert parsed == sorted(parsed)
