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
