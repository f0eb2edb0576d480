"""Store tables (sqlmodel) and the mapping between events and rows.

One table per event type. Every record row carries the chain columns:

- ``seq``: its position in the one global chain (primary key, no gaps);
- ``prev_hash``/``hash``: SHA-256 over the canonical JSON of the row's
  content (every column but ``hash``) and the previous record's hash;
- ``session_seq``/``session_prev_hash``/``session_hash``: the same per
  session (events outside a session chain under ``session_id = ''``).

Timestamps are stored as fixed-width UTC text (see ``events.format_ts``) so the
hashed form is identical whatever the database; structured fields are JSON.
Record rows are written once and never updated; the head tables hold the
chain tips that the next batch continues from.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Table
from sqlmodel import Field, SQLModel

from policyd.audit.events import (
    ApprovalEvent,
    AuthEvent,
    Event,
    EvidenceAccessEvent,
    GatewayEvent,
    SessionEndEvent,
    SessionStartEvent,
    StatementEvent,
    StatementResultEvent,
    format_ts,
    parse_event,
)

GENESIS = "0" * 64


class _Record(SQLModel):
    seq: int = Field(
        sa_type=BigInteger, primary_key=True, sa_column_kwargs={"autoincrement": False}
    )
    event_id: str = Field(max_length=64)
    ts: str = Field(max_length=32, index=True)
    session_id: str = Field(default="", max_length=128, index=True)
    session_seq: int = Field(sa_type=BigInteger)
    session_prev_hash: str = Field(max_length=64)
    session_hash: str = Field(max_length=64)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class GatewayRecord(_Record, table=True):
    __tablename__ = "audit_gateway_events"
    action: str = Field(max_length=32)
    component: str = ""
    instance: str = ""
    policy_revision: str = ""
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class SessionRecord(_Record, table=True):
    __tablename__ = "audit_sessions"
    subject: str = Field(index=True)
    groups: list[str] = Field(default_factory=list, sa_type=JSON)
    issuer: str = ""
    kind: str = ""
    actor: str | None = None
    client_addr: str = ""
    database: str = ""
    user: str = ""
    upstream_role: str = ""
    tls: bool = False
    application_name: str = ""
    driver_mode: str = ""


class AuthRecord(_Record, table=True):
    __tablename__ = "audit_auth_events"
    outcome: str = Field(max_length=16)
    reason: str = ""
    subject: str = ""
    issuer: str = ""
    client_addr: str = ""
    database: str = ""
    user: str = ""


class StatementRecord(_Record, table=True):
    __tablename__ = "audit_statements"
    statement_seq: int = Field(sa_type=BigInteger)
    subject: str = ""
    sql: str = ""
    params: list[str | None] | None = Field(default=None, sa_type=JSON)
    fingerprint: str = ""
    path: str = Field(default="simple", max_length=16)
    analysis: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    verdict: str = Field(max_length=8, index=True)
    reasons: list[str] = Field(default_factory=list, sa_type=JSON)
    decision_id: str = ""
    policy_revision: str = ""
    approval_id: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    command_tag: str = ""
    rows_returned: int | None = Field(default=None, sa_type=BigInteger)
    rows_affected: int | None = Field(default=None, sa_type=BigInteger)
    masked_counts: dict[str, int] = Field(default_factory=dict, sa_type=JSON)
    digest_before: str = ""
    digest_after: str = ""
    recorded_rows: list[list[str | None]] | None = Field(default=None, sa_type=JSON)
    rows_truncated: bool = False
    error_sqlstate: str = ""
    error_message: str = ""


class StatementResultRecord(_Record, table=True):
    __tablename__ = "audit_statement_results"
    statement_seq: int = Field(sa_type=BigInteger)
    finished_at: str | None = None
    command_tag: str = ""
    rows_returned: int | None = Field(default=None, sa_type=BigInteger)
    rows_affected: int | None = Field(default=None, sa_type=BigInteger)
    masked_counts: dict[str, int] = Field(default_factory=dict, sa_type=JSON)
    digest_before: str = ""
    digest_after: str = ""
    recorded_rows: list[list[str | None]] | None = Field(default=None, sa_type=JSON)
    rows_truncated: bool = False
    error_sqlstate: str = ""
    error_message: str = ""


class ApprovalRecord(_Record, table=True):
    __tablename__ = "audit_approvals"
    approval_id: str = Field(index=True)
    action: str = Field(max_length=16)
    statement_seq: int | None = Field(default=None, sa_type=BigInteger)
    approver: str = ""
    reason: str = ""


class SessionEndRecord(_Record, table=True):
    __tablename__ = "audit_session_ends"
    reason: str = Field(max_length=32)
    detail: str = ""
    statements: int | None = Field(default=None, sa_type=BigInteger)


class EvidenceAccessRecord(_Record, table=True):
    __tablename__ = "audit_evidence_access"
    action: str = Field(max_length=16)
    accessor: str = ""
    host: str = ""
    target: str = ""
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class ChainHead(SQLModel, table=True):
    """Tip of the global chain; locked by every appending transaction so that
    several writers (policyd replicas, the CLI) extend one chain in turn."""

    __tablename__ = "audit_chain_head"
    id: int = Field(primary_key=True)
    seq: int = Field(sa_type=BigInteger)
    hash: str = Field(max_length=64)


class SessionHead(SQLModel, table=True):
    __tablename__ = "audit_session_heads"
    session_id: str = Field(primary_key=True, max_length=128)
    session_seq: int = Field(sa_type=BigInteger)
    hash: str = Field(max_length=64)


class WriterState(SQLModel, table=True):
    """How far each writer's spool has been stored, updated in the same
    transaction as the records: a replay after a crash stores each spooled
    event exactly once."""

    __tablename__ = "audit_writer_state"
    writer_id: str = Field(primary_key=True, max_length=200)
    spool_n: int = Field(sa_type=BigInteger)


RECORD_MODELS: dict[str, type[_Record]] = {
    "gateway": GatewayRecord,
    "session_start": SessionRecord,
    "auth": AuthRecord,
    "statement": StatementRecord,
    "statement_result": StatementResultRecord,
    "approval": ApprovalRecord,
    "session_end": SessionEndRecord,
    "evidence_access": EvidenceAccessRecord,
}
TABLE_TYPES: dict[str, str] = {str(m.__tablename__): t for t, m in RECORD_MODELS.items()}
CHAIN_COLUMNS = ("seq", "session_seq", "session_prev_hash", "session_hash", "prev_hash", "hash")


def table_of(model: type[SQLModel]) -> Table:
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


def record_tables() -> dict[str, Table]:
    """Record tables by table name, in a fixed order."""
    return {str(m.__tablename__): table_of(m) for m in RECORD_MODELS.values()}


def content_columns(table: Table) -> list[Column[Any]]:
    return [c for c in table.columns if c.name not in ("hash", "session_hash")]


def event_to_content(event: Event) -> tuple[str, dict[str, Any]]:
    """Table name and the non-chain columns of the row for ``event``."""
    data = event.model_dump(mode="python")
    kind = data.pop("type")
    for key, value in list(data.items()):
        if isinstance(value, datetime):
            data[key] = format_ts(value)
    model = RECORD_MODELS[kind]
    return str(model.__tablename__), data


_TIME_FIELDS = ("ts", "started_at", "finished_at")


def spooled_to_content(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Like :func:`event_to_content` for an event already validated and
    serialised to the spool (``model_dump(mode="json")`` form), without a
    second pydantic round trip on the writer's hot path."""
    row = dict(data)
    kind = row.pop("type")
    if not isinstance(row.get("session_id"), str):
        # Both chains are keyed on it: a line without one cannot be stored
        # (KeyError: the caller's "not an event this store knows").
        raise KeyError("session_id")
    for key in _TIME_FIELDS:
        value = row.get(key)
        if isinstance(value, str):
            row[key] = format_ts(datetime.fromisoformat(value))
    return str(RECORD_MODELS[kind].__tablename__), row


def canonical(table: str, row: dict[str, Any]) -> bytes:
    """The bytes a record's hashes cover: its table and every column but the
    two hashes, as JSON with sorted keys and no whitespace."""
    body = {k: v for k, v in row.items() if k not in ("hash", "session_hash")}
    body["_table"] = table
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, table: str, row: dict[str, Any]) -> str:
    return hash_canonical(prev_hash, canonical(table, row))


def hash_canonical(prev_hash: str, body: bytes) -> str:
    """SHA-256 of the previous hash, a newline and the canonical body."""
    h = hashlib.sha256()
    h.update(prev_hash.encode())
    h.update(b"\n")
    h.update(body)
    return h.hexdigest()


def row_to_event(table: str, row: dict[str, Any]) -> Event:
    """Rebuild the event a stored row came from (for replay and export)."""
    data = {k: v for k, v in row.items() if k not in CHAIN_COLUMNS}
    data["type"] = TABLE_TYPES[table]
    return parse_event(data)


__all__ = [
    "GENESIS",
    "ApprovalEvent",
    "ApprovalRecord",
    "AuthEvent",
    "AuthRecord",
    "ChainHead",
    "EvidenceAccessEvent",
    "EvidenceAccessRecord",
    "GatewayEvent",
    "GatewayRecord",
    "SessionEndEvent",
    "SessionEndRecord",
    "SessionHead",
    "SessionRecord",
    "SessionStartEvent",
    "StatementEvent",
    "StatementRecord",
    "StatementResultEvent",
    "StatementResultRecord",
    "WriterState",
]
