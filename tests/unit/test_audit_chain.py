"""Tamper evidence on the SQLite store: verify passes on an untouched store and
names the record that was changed, deleted, inserted or reordered; signed
checkpoints catch a recomputed chain and a cut tail; prune keeps the rest
verifiable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from policyd.audit.chain import (
    CheckpointLog,
    PruneRefused,
    load_or_create_key,
    prune,
    verify,
)
from policyd.audit.events import (
    ApprovalEvent,
    AuthEvent,
    Event,
    SessionEndEvent,
    SessionStartEvent,
    StatementEvent,
    StatementResultEvent,
)
from policyd.audit.models import GENESIS, ChainHead, chain_hash, record_tables, table_of
from policyd.audit.store import AuditStore
from policyd.audit.writer import AuditWriter


def session_events(sid: str, subject: str = "agent-7", t0: datetime | None = None) -> list[Event]:
    t0 = t0 or datetime.now(UTC)
    return [
        AuthEvent(session_id=sid, outcome="success", subject=subject, ts=t0),
        SessionStartEvent(session_id=sid, subject=subject, groups=["fraud"], ts=t0,
                          client_addr="10.0.0.5", database="payments", upstream_role="app_ro"),
        StatementEvent(session_id=sid, statement_seq=1, sql="SELECT pan FROM cards", ts=t0,
                       verdict="allow", command_tag="SELECT 2", rows_returned=2,
                       analysis={"commands": ["SELECT"], "relations": ["public.cards:read"]},
                       masked_counts={"public.cards.pan": 2},
                       recorded_rows=[["XXXXXXXXXXXX1111"], ["XXXXXXXXXXXX4444"]]),
        StatementEvent(session_id=sid, statement_seq=2, sql="DROP DATABASE payments", ts=t0,
                       verdict="deny", reasons=["prohibited statement"], error_sqlstate="42501"),
        ApprovalEvent(session_id=sid, approval_id="ap-1", action="requested", statement_seq=3,
                      ts=t0),
        ApprovalEvent(session_id=sid, approval_id="ap-1", action="approved", approver="alice",
                      statement_seq=3, ts=t0),
        # recorded before forwarding, its outcome afterwards
        StatementEvent(session_id=sid, statement_seq=3, sql="SELECT * FROM payments", ts=t0,
                       verdict="allow", approval_id="ap-1"),
        StatementResultEvent(session_id=sid, statement_seq=3, ts=t0, command_tag="SELECT 0",
                             rows_returned=0),
        SessionEndEvent(session_id=sid, reason="client_terminate", ts=t0),
    ]


def write(tmp: Path, url: str, events: list[Event], **kw: Any) -> AuditWriter:
    w = AuditWriter(url, tmp / "spool.jsonl", signing_key=tmp / "key",
                    checkpoint_file=tmp / "cp.jsonl", **kw).start()
    assert w.submit(events)
    assert w.close()
    return w


@pytest.fixture
def store(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    write(tmp_path, url, session_events("s1") + session_events("s2", "agent-8"),
          checkpoint_every=4, batch_size=4)
    st = AuditStore(url)
    yield st
    st.close()


def run_verify(tmp: Path, st: AuditStore, since: str | None = None) -> Any:
    key = load_or_create_key(tmp / "key", create=False)
    return verify(st, CheckpointLog(tmp / "cp.jsonl"), key.public_key(), since=since)


def seq_of(st: AuditStore, table: str, where: str) -> int:
    with st.engine.connect() as c:
        return int(c.execute(text(f"SELECT seq FROM {table} WHERE {where} LIMIT 1")).scalar_one())


def test_untouched_store_verifies(tmp_path: Path, store: AuditStore) -> None:
    report = run_verify(tmp_path, store)
    assert report.ok, report.problems
    assert report.records == 20  # 2 x 9 session events + gateway start and stop
    assert report.checkpoints_covered >= 2


def test_changed_record_is_named(tmp_path: Path, store: AuditStore) -> None:
    seq = seq_of(store, "audit_statements", "verdict = 'deny'")
    with store.engine.begin() as c:
        c.execute(text("UPDATE audit_statements SET verdict = 'allow' WHERE seq = :s"), {"s": seq})
    problems = run_verify(tmp_path, store).problems
    assert [(p.kind, p.table, p.seq) for p in problems] == [("changed", "audit_statements", seq)]


def test_deleted_record_is_named(tmp_path: Path, store: AuditStore) -> None:
    seq = seq_of(store, "audit_statements", "verdict = 'deny'")
    with store.engine.begin() as c:
        c.execute(text("DELETE FROM audit_statements WHERE seq = :s"), {"s": seq})
    problems = run_verify(tmp_path, store).problems
    assert len(problems) == 1
    assert problems[0].kind == "deleted" and problems[0].seq == seq + 1
    assert f"seq {seq} missing" in problems[0].message


def test_inserted_record_is_named(tmp_path: Path, store: AuditStore) -> None:
    seq = seq_of(store, "audit_sessions", "subject = 'agent-7'")
    forged = StatementEvent(session_id="s1", statement_seq=9, sql="SELECT 1", verdict="allow")
    with store.engine.begin() as c:
        row = forged.model_dump(mode="json")
        row.pop("type")
        row.update(seq=seq, session_seq=2, session_prev_hash=GENESIS, session_hash=GENESIS,
                   prev_hash=GENESIS, hash=GENESIS)
        c.execute(record_tables()["audit_statements"].insert(), [row])
    problems = run_verify(tmp_path, store).problems
    assert [(p.kind, p.table, p.seq) for p in problems] == [("inserted", "audit_statements", seq)]


def test_reordered_records_are_named(tmp_path: Path, store: AuditStore) -> None:
    a = seq_of(store, "audit_statements", "statement_seq = 1")
    b = seq_of(store, "audit_statements", "statement_seq = 2")
    with store.engine.begin() as c:
        c.execute(text("UPDATE audit_statements SET seq = -1 WHERE seq = :a"), {"a": a})
        c.execute(text("UPDATE audit_statements SET seq = :a WHERE seq = :b"), {"a": a, "b": b})
        c.execute(text("UPDATE audit_statements SET seq = :b WHERE seq = -1"), {"b": b})
    problems = run_verify(tmp_path, store).problems
    found = {(p.kind, p.table, p.seq) for p in problems}
    assert ("reordered", "audit_statements", a) in found
    assert ("reordered", "audit_statements", b) in found


def test_recomputed_chain_is_caught_by_signed_checkpoint(tmp_path: Path, store: AuditStore) -> None:
    """An attacker with write access recomputes every hash after an edit: the
    chain is consistent again, but no longer matches the signed checkpoints."""
    seq = seq_of(store, "audit_statements", "verdict = 'deny'")
    with store.engine.begin() as c:
        c.execute(text("UPDATE audit_statements SET verdict = 'allow' WHERE seq = :s"), {"s": seq})
    _rechain(store)
    problems = run_verify(tmp_path, store).problems
    assert problems and all(p.kind == "checkpoint" for p in problems)
    assert all(p.seq >= seq for p in problems)


def test_cut_tail_is_caught(tmp_path: Path, store: AuditStore) -> None:
    head, _ = store.head()
    with store.engine.begin() as c:
        for t in record_tables().values():
            c.execute(t.delete().where(t.c.seq > head - 3))
        prev = c.execute(text("SELECT hash FROM audit_session_ends WHERE seq = :s"),
                         {"s": head - 3}).scalar()
        c.execute(update(table_of(ChainHead)).values(seq=head - 3, hash=prev or ""))
    problems = run_verify(tmp_path, store).problems
    assert [p.kind for p in problems] == ["deleted"]
    assert f"{head - 2}..{head}" in problems[0].message


def test_records_shipped_while_verify_reads_are_not_missing(tmp_path: Path,
                                                           store: AuditStore) -> None:
    """`pgwarden audit verify` on a live store: the gateway ships more
    records (and moves the chain head) after verify has read the records.
    The demo's verify once failed so ("records seq 7133..7133 are missing
    (chain head is 7133)"), with nothing missing."""
    url = str(store.engine.url)

    def ship(sid: str) -> None:
        w = AuditWriter(url, tmp_path / f"spool-{sid}.jsonl", signing_key=tmp_path / "key",
                        checkpoint_file=tmp_path / "cp.jsonl", checkpoint_every=1000)
        w.start()
        assert w.submit(session_events(sid, "agent-9"))
        assert w.close()

    class Shipping:
        def iter_records(self, start: int, **kw: Any) -> Any:
            # The store reads each table in its own queries: ship once
            # after the first record and again at the end.
            for n, record in enumerate(store.iter_records(start, batch=3, **kw)):
                yield record
                if n == 0:
                    ship("s3")
            ship("s4")

        def head(self) -> tuple[int, str]:
            return store.head()

    before, _ = store.head()
    report = verify(Shipping(), CheckpointLog(tmp_path / "cp.jsonl"),  # type: ignore[arg-type]
                    load_or_create_key(tmp_path / "key", create=False).public_key())
    assert store.head()[0] > before, "the second writer shipped nothing"
    assert report.ok, report.problems
    assert run_verify(tmp_path, store).ok


def test_removed_checkpoint_line_is_caught(tmp_path: Path, store: AuditStore) -> None:
    cp = tmp_path / "cp.jsonl"
    lines = cp.read_text().splitlines()
    assert len(lines) >= 2
    cp.write_text("\n".join(lines[1:]) + "\n")
    problems = run_verify(tmp_path, store).problems
    assert any(p.kind == "checkpoint" and "removed or edited" in p.message for p in problems)


def test_verify_since_starts_at_a_checkpoint(tmp_path: Path, store: AuditStore) -> None:
    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    report = run_verify(tmp_path, store, since=future)
    assert report.ok and report.start.startswith("checkpoint at seq")


def test_prune_keeps_remaining_chain_verifiable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    old = datetime.now(UTC) - timedelta(days=400)
    with AuditStore(url) as st:
        st.append(session_events("old", t0=old))
    write(tmp_path, url, session_events("new"))
    with AuditStore(url) as st:
        key = load_or_create_key(tmp_path / "key", create=False)
        log = CheckpointLog(tmp_path / "cp.jsonl", key)
        result = prune(st, log, key.public_key(), "365d")
        assert result.deleted == 9
        assert st.session_records("old") == []
        report = verify(st, log, key.public_key())
        assert report.ok, report.problems
        assert report.start.startswith("prune anchor")
        # and tampering after a prune is still found
        seq = seq_of(st, "audit_statements", "verdict = 'deny'")
        with st.engine.begin() as c:
            c.execute(text("UPDATE audit_statements SET sql = 'x' WHERE seq = :s"), {"s": seq})
        assert [p.seq for p in verify(st, log, key.public_key()).problems] == [seq]


def test_prune_refuses_a_tampered_store(tmp_path: Path, store: AuditStore) -> None:
    with store.engine.begin() as c:
        c.execute(text("UPDATE audit_sessions SET subject = 'someone-else'"))
    key = load_or_create_key(tmp_path / "key", create=False)
    with pytest.raises(PruneRefused):
        prune(store, CheckpointLog(tmp_path / "cp.jsonl", key), key.public_key(), "0s")


def test_signing_key_is_private(tmp_path: Path) -> None:
    load_or_create_key(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    (tmp_path / "k").chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        load_or_create_key(tmp_path / "k")


def _rechain(st: AuditStore) -> None:
    """Recompute every hash as an attacker without the key could."""
    recs = list(st.iter_records())
    prev = GENESIS
    sessions: dict[str, str] = {}
    with st.engine.begin() as c:
        for r in recs:
            row = dict(r.row)
            sprev = sessions.get(row["session_id"], GENESIS)
            row.update(prev_hash=prev, session_prev_hash=sprev)
            row["hash"] = prev = chain_hash(prev, r.table, row)
            row["session_hash"] = sessions[row["session_id"]] = chain_hash(sprev, r.table, row)
            t = record_tables()[r.table]
            c.execute(
                t.update().where(t.c.seq == r.seq).values(
                    prev_hash=row["prev_hash"], hash=row["hash"],
                    session_prev_hash=row["session_prev_hash"], session_hash=row["session_hash"],
                )
            )
        c.execute(update(table_of(ChainHead)).values(hash=prev))


def interleaved(sids: list[str], n: int) -> list[Event]:
    """Statements of several sessions taking turns: every stored batch moves
    the chain head of sessions it already knows (one executemany)."""
    return [StatementEvent(session_id=sid, statement_seq=i, sql=f"SELECT {i}", verdict="allow")
            for i in range(1, n + 1) for sid in sids]


def session_heads_match_their_last_records(st: AuditStore) -> None:
    with st.engine.connect() as c:
        heads = {r[0]: (r[1], r[2]) for r in c.execute(text(
            "SELECT session_id, session_seq, hash FROM audit_session_heads"))}
        last: dict[str, tuple[int, str]] = {}
        for table in record_tables():
            for sid, sseq, shash in c.execute(text(
                    f"SELECT session_id, session_seq, session_hash FROM {table}")):
                if sid not in last or sseq > last[sid][0]:
                    last[sid] = (sseq, shash)
    assert heads == last


def test_batches_that_move_many_session_heads_verify(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    sids = [f"m{k}" for k in range(7)]
    write(tmp_path, url, interleaved(sids, 6), batch_size=5)
    with AuditStore(url) as st:
        report = run_verify(tmp_path, st)
        assert report.ok, report.problems
        session_heads_match_their_last_records(st)
        with st.engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM audit_statements")).scalar_one() == 42
