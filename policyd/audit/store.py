"""The audit store: engine set-up, migrations, chained appends and reads.

SQLite (WAL, ``synchronous=FULL``) locally, PostgreSQL (psycopg 3) in
production. ``append`` writes a whole batch in one transaction: it locks the
chain head row, numbers and hashes the records, inserts them with one
multi-row statement per table and moves the heads. Several appenders (policyd
replicas, the CLI recording an evidence read) therefore extend one chain in
turn, never interleaving inside a batch.
"""

from __future__ import annotations

import heapq
import json
import os
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import JSON, Engine, bindparam, create_engine, event, func, or_, select, update
from sqlalchemy.engine import Connection, make_url

from policyd.audit.events import Event
from policyd.audit.models import (
    GENESIS,
    ChainHead,
    SessionHead,
    WriterState,
    canonical,
    event_to_content,
    hash_canonical,
    record_tables,
    table_of,
)
from policyd.audit.scrub import scrub_event

DEFAULT_URL = "sqlite:///.run/audit.db"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x70677761  # "pgwa": advisory lock key for migrations
_MIGRATING = threading.Lock()


def store_url(url: str | None = None) -> str:
    """The store URL: explicit, else ``PGWARDEN_AUDIT_URL``, else the local
    SQLite default."""
    return url or os.environ.get("PGWARDEN_AUDIT_URL") or DEFAULT_URL


def _sqlalchemy_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _ensure_wal(cur: Any) -> None:
    """Switch the file to WAL once (the mode persists in the file). The switch
    needs the file to itself; another process opening it at the same moment
    gets SQLITE_BUSY without the busy handler, so retry for a while."""
    import sqlite3
    import time

    deadline = time.monotonic() + 30
    while True:
        mode = cur.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() == "wal":
            return
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_engine(url: str) -> Engine:
    sa_url = make_url(_sqlalchemy_url(url))
    if sa_url.get_backend_name() == "sqlite":
        if sa_url.database and sa_url.database != ":memory:":
            Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(sa_url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from pysqlite so BEGIN IMMEDIATE is used:
            # the chain head must be locked before it is read.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # Wait for other writers before anything else: policyd and the
            # taps open the store at the same moment when a stack starts.
            cur.execute("PRAGMA busy_timeout=30000")
            _ensure_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # A store that stops answering must surface as an outage, not a hang:
    # bounded connect time and TCP keepalives on the audit connections.
    return create_engine(
        sa_url,
        pool_pre_ping=True,
        pool_size=2,
        max_overflow=2,
        connect_args={"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 30,
                      "keepalives_interval": 10, "keepalives_count": 3},
    )


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations to the store at ``url``."""
    engine = make_engine(url)
    try:
        # Alembic keeps its context in module globals: one migration per
        # process at a time, whatever the database does.
        with _MIGRATING, engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Several replicas starting at once: one migrates, the others
                # wait and then find the store at head. (SQLite: BEGIN
                # IMMEDIATE already serialises.)
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


@dataclass(frozen=True, slots=True)
class Record:
    """One stored record: its table and all its columns."""

    table: str
    row: dict[str, Any]

    @property
    def seq(self) -> int:
        return int(self.row["seq"])


class AuditStore:
    """Chained, batched access to the record tables."""

    def __init__(self, url: str | None = None, *, migrate: bool = True) -> None:
        self.url = store_url(url)
        if migrate:
            upgrade(self.url)
        self.engine = make_engine(self.url)
        self.tables = record_tables()
        self._insert_sql = self._prepare_inserts()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # -- writing -------------------------------------------------------------

    def append(
        self,
        events: Sequence[Event],
        *,
        writer_id: str | None = None,
        spool_n: int | None = None,
        scrubbed: bool = False,
    ) -> list[int]:
        """Store ``events`` in order in one transaction; return their ``seq``.

        With ``writer_id``/``spool_n`` the writer's spool position is moved in
        the same transaction. Unless ``scrubbed``, events are scrubbed here.
        """
        if not scrubbed:
            events = [scrub_event(e) for e in events]
        return self.append_content(
            [event_to_content(e) for e in events], writer_id=writer_id, spool_n=spool_n
        )

    def append_content(
        self,
        contents: Sequence[tuple[str, dict[str, Any]]],
        *,
        writer_id: str | None = None,
        spool_n: int | None = None,
    ) -> list[int]:
        """``append`` for rows already made (and scrubbed) by the caller:
        ``(table, non-chain columns)`` pairs."""
        with self.engine.begin() as conn:
            seqs = self._chain_and_insert(conn, contents)
            if writer_id is not None and spool_n is not None:
                self._set_writer_position(conn, writer_id, spool_n)
        return seqs

    def append_spooled(
        self, writer_id: str, items: Sequence[tuple[int, tuple[str, dict[str, Any]]]]
    ) -> tuple[int, int]:
        """Store spooled ``(n, content)`` items of one producer exactly once.

        Inside the transaction, after the chain head is locked (which
        serialises every appender), items numbered at or below the
        producer's stored position are dropped as duplicates (a retry after a
        timeout or a crash). ``n == 0`` items are always stored. Returns the
        producer's new position and the number of duplicates dropped.
        """
        t = table_of(WriterState)
        with self.engine.begin() as conn:
            self._lock_head(conn)
            pos = int(
                conn.execute(select(t.c.spool_n).where(t.c.writer_id == writer_id)).scalar() or 0
            )
            fresh = [(n, c) for n, c in items if n == 0 or n > pos]
            self._chain_and_insert(conn, [c for _, c in fresh])
            new_pos = max([pos, *(n for n, _ in fresh)])
            if new_pos != pos:
                self._set_writer_position(conn, writer_id, new_pos)
        return new_pos, len(items) - len(fresh)

    def _lock_head(self, conn: Connection) -> tuple[int, str] | None:
        head_t = table_of(ChainHead)
        head = conn.execute(
            select(head_t.c.seq, head_t.c.hash).where(head_t.c.id == 1).with_for_update()
        ).one_or_none()
        return (int(head[0]), str(head[1])) if head else None

    def _chain_and_insert(
        self, conn: Connection, contents: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[int]:
        """Number, hash and insert ``contents``; move the heads. Takes the
        chain head lock (again, harmlessly, if the caller already holds it)."""
        if not contents:
            return []
        head_t = table_of(ChainHead)
        shead_t = table_of(SessionHead)
        head = self._lock_head(conn)
        seq, prev = head if head else (0, GENESIS)
        sids = sorted({str(row["session_id"]) for _, row in contents})
        heads: dict[str, tuple[int, str]] = {}
        for chunk_start in range(0, len(sids), 500):
            chunk = sids[chunk_start : chunk_start + 500]
            for sid, sseq, shash in conn.execute(
                select(shead_t.c.session_id, shead_t.c.session_seq, shead_t.c.hash).where(
                    shead_t.c.session_id.in_(chunk)
                )
            ):
                heads[sid] = (int(sseq), str(shash))
        known = set(heads)
        by_table: dict[str, list[dict[str, Any]]] = defaultdict(list)
        seqs: list[int] = []
        for table, content in contents:
            row = dict(content)
            sid = str(row["session_id"])
            seq += 1
            sseq, sprev = heads.get(sid, (0, GENESIS))
            row.update(seq=seq, session_seq=sseq + 1, session_prev_hash=sprev, prev_hash=prev)
            body = canonical(table, row)  # one serialisation serves both chains
            row["hash"] = prev = hash_canonical(prev, body)
            row["session_hash"] = hash_canonical(sprev, body)
            heads[sid] = (sseq + 1, row["session_hash"])
            by_table[table].append(row)
            seqs.append(seq)
        for table, rows in by_table.items():
            self._insert(conn, table, rows)
        if head is None:
            conn.execute(head_t.insert(), [{"id": 1, "seq": seq, "hash": prev}])
        else:
            conn.execute(update(head_t).where(head_t.c.id == 1).values(seq=seq, hash=prev))
        self._move_session_heads(conn, heads, known, set(sids))
        return seqs

    def _insert(self, conn: Connection, table: str, rows: list[dict[str, Any]]) -> None:
        """One multi-row insert through the driver (``executemany``).

        Bypasses SQLAlchemy's per-value processing, which cost more than the
        database on the writer's hot path; JSON columns are serialised here.
        Reads still go through SQLAlchemy, so verify sees exactly the values
        any other reader sees.
        """
        sql, json_cols, cols = self._insert_sql[table]
        data = [
            tuple(
                json.dumps(r[c], ensure_ascii=False) if c in json_cols and r[c] is not None
                else r[c]
                for c in cols
            )
            for r in rows
        ]
        conn.exec_driver_sql(sql, data)

    def _prepare_inserts(self) -> dict[str, tuple[str, frozenset[str], tuple[str, ...]]]:
        quote = self.engine.dialect.identifier_preparer.quote
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        out: dict[str, tuple[str, frozenset[str], tuple[str, ...]]] = {}
        for name, table in self.tables.items():
            cols = tuple(c.name for c in table.columns)
            json_cols = frozenset(c.name for c in table.columns if isinstance(c.type, JSON))
            values = ", ".join(
                (f"CAST({mark} AS JSON)" if c in json_cols and mark == "%s" else mark)
                for c in cols
            )
            out[name] = (
                # identifiers come from our own table metadata, quoted by the dialect
                f"INSERT INTO {quote(name)} ({', '.join(quote(c) for c in cols)}) "  # noqa: S608
                f"VALUES ({values})",
                json_cols,
                cols,
            )
        return out

    def _move_session_heads(
        self,
        conn: Connection,
        heads: dict[str, tuple[int, str]],
        known: set[str],
        touched: set[str],
    ) -> None:
        t = table_of(SessionHead)
        new = [
            {"session_id": s, "session_seq": heads[s][0], "hash": heads[s][1]}
            for s in sorted(touched - known)
        ]
        if new:
            conn.execute(t.insert(), new)
        moved = [
            {"sid": s, "sseq": heads[s][0], "shash": heads[s][1]} for s in sorted(touched & known)
        ]
        if moved:
            # One executemany, not one statement per session: with PostgreSQL
            # each was a round trip, and a batch can touch many sessions.
            conn.execute(
                update(t)
                .where(t.c.session_id == bindparam("sid"))
                .values(session_seq=bindparam("sseq"), hash=bindparam("shash")),
                moved,
            )

    def _set_writer_position(self, conn: Connection, writer_id: str, spool_n: int) -> None:
        t = table_of(WriterState)
        done = conn.execute(
            update(t).where(t.c.writer_id == writer_id).values(spool_n=spool_n)
        ).rowcount
        if not done:
            conn.execute(t.insert(), [{"writer_id": writer_id, "spool_n": spool_n}])

    def writer_position(self, writer_id: str) -> int:
        """Last spool number of ``writer_id`` already stored (0 if none)."""
        t = table_of(WriterState)
        with self.engine.connect() as conn:
            got = conn.execute(select(t.c.spool_n).where(t.c.writer_id == writer_id)).scalar()
        return int(got or 0)

    # -- reading -------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        t = table_of(ChainHead)
        with self.engine.connect() as conn:
            got = conn.execute(select(t.c.seq, t.c.hash).where(t.c.id == 1)).one_or_none()
        return (int(got[0]), str(got[1])) if got else (0, GENESIS)

    def iter_records(
        self,
        since_seq: int = 0,
        *,
        since_ts: str | None = None,
        until_seq: int | None = None,
        batch: int = 2000,
    ) -> Iterator[Record]:
        """All records with ``seq >= since_seq`` (and ``ts >= since_ts``,
        ``seq <= until_seq``) in global order, merged from the tables in
        bounded memory. Each table is read in its own queries: on a store
        that is being appended to, only a bound at or below a chain head
        read beforehand gives every table the same records."""

        def one_table(name: str) -> Iterator[Record]:
            table = self.tables[name]
            last = since_seq - 1
            while True:
                q = select(table).where(table.c.seq > last)
                if since_ts is not None:
                    q = q.where(table.c.ts >= since_ts)
                if until_seq is not None:
                    q = q.where(table.c.seq <= until_seq)
                q = q.order_by(table.c.seq).limit(batch)
                with self.engine.connect() as conn:
                    rows = [dict(r._mapping) for r in conn.execute(q)]
                if not rows:
                    return
                for row in rows:
                    yield Record(name, row)
                last = int(rows[-1]["seq"])

        yield from heapq.merge(*(one_table(n) for n in self.tables), key=lambda r: r.seq)

    def session_records(self, session_id: str) -> list[Record]:
        out: list[Record] = []
        with self.engine.connect() as conn:
            for name, table in self.tables.items():
                for r in conn.execute(select(table).where(table.c.session_id == session_id)):
                    out.append(Record(name, dict(r._mapping)))
        out.sort(key=lambda r: r.seq)
        return out

    def list_sessions(
        self,
        *,
        since: str | None = None,
        subject: str | None = None,
        group: str | None = None,
        decision: str | None = None,
    ) -> list[dict[str, Any]]:
        """Session summaries (start row plus counts and how it ended)."""
        s = self.tables["audit_sessions"]
        st = self.tables["audit_statements"]
        se = self.tables["audit_session_ends"]
        q = select(s)
        if since:
            q = q.where(s.c.ts >= since)
        if subject:
            q = q.where(s.c.subject == subject)
        if decision:
            q = q.where(s.c.session_id.in_(select(st.c.session_id).where(
                self._held(st) if decision == "hold" else st.c.verdict == decision)))
        q = q.order_by(s.c.seq)
        out: list[dict[str, Any]] = []
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
            if group:
                rows = [r for r in rows if group in (r.get("groups") or [])]
            sids = [r["session_id"] for r in rows]
            counts: dict[str, dict[str, int]] = defaultdict(dict)
            held: dict[str, int] = {}
            ends: dict[str, tuple[str, str]] = {}
            for start in range(0, len(sids), 500):
                chunk = sids[start : start + 500]
                for sid, verdict, n in conn.execute(
                    select(st.c.session_id, st.c.verdict, func.count())
                    .where(st.c.session_id.in_(chunk))
                    .group_by(st.c.session_id, st.c.verdict)
                ):
                    counts[sid][verdict] = int(n)
                for sid, n in conn.execute(
                    select(st.c.session_id, func.count())
                    .where(st.c.session_id.in_(chunk), self._held(st))
                    .group_by(st.c.session_id)
                ):
                    held[sid] = int(n)
                for sid, ts, reason in conn.execute(
                    select(se.c.session_id, se.c.ts, se.c.reason).where(se.c.session_id.in_(chunk))
                ):
                    ends[sid] = (ts, reason)
        for row in rows:
            c = counts.get(row["session_id"], {})
            end = ends.get(row["session_id"])
            row["statements"] = sum(c.values())
            row["denied"] = c.get("deny", 0)
            row["held"] = held.get(row["session_id"], 0)
            row["ended_at"] = end[0] if end else None
            row["end_reason"] = end[1] if end else None
            out.append(row)
        return out

    @staticmethod
    def _held(st: Any) -> Any:
        """Statements that waited for an approver. The tap records a held
        statement once its hold is resolved, with the approval's id and the
        outcome as verdict (allow, or deny), so ``verdict == "hold"`` alone
        would never match."""
        return or_(st.c.verdict == "hold", st.c.approval_id != "")

    def delete_before(self, seq: int) -> int:
        """Delete every record with ``seq < seq`` (prune); returns the count."""
        n = 0
        with self.engine.begin() as conn:
            for table in self.tables.values():
                n += conn.execute(table.delete().where(table.c.seq < seq)).rowcount
        return n

    def first_seq_at_or_after(self, ts: str) -> int | None:
        """Smallest ``seq`` whose record is at or after ``ts``."""
        best: int | None = None
        with self.engine.connect() as conn:
            for table in self.tables.values():
                got = conn.execute(
                    select(table.c.seq).where(table.c.ts >= ts).order_by(table.c.seq).limit(1)
                ).scalar()
                if got is not None and (best is None or got < best):
                    best = int(got)
        return best

    def record(self, seq: int) -> Record | None:
        with self.engine.connect() as conn:
            for name, table in self.tables.items():
                r = conn.execute(select(table).where(table.c.seq == seq)).first()
                if r is not None:
                    return Record(name, dict(r._mapping))
        return None

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
