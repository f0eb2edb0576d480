"""Approval requests and approver actions as stored, plus the plain record the
rest of pgwarden sees.

Two tables live in the audit store's database (same URL, own tables, created
by :class:`policyd.approvals.store.ApprovalStore`, never by the audit
migrations):

* ``approval_requests``: one row per request, its current status;
* ``approval_actions``: append-only history (requested, approved, denied,
  expired, cancelled, spent) with who and why, so a request's story can be
  told even though its row changes. The tamper-evident copy of each action
  is the :class:`policyd.audit.events.ApprovalEvent` in the audit chain.

Times are epoch seconds (UTC) in ``float`` columns: the same comparisons work
in SQLite and PostgreSQL and no timezone is ever guessed.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

__all__ = [
    "APPROVAL_ID_PREFIX",
    "ApprovalAction",
    "ApprovalRecord",
    "ApprovalRow",
    "Status",
    "is_approval_id",
    "new_approval_id",
    "params_digest",
    "statement_digest",
]

APPROVAL_ID_PREFIX = "ap_"
_ID_CHARS = 12
_B32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")


class Status(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    SPENT = "spent"  # a late grant that a retry has used


def new_approval_id() -> str:
    """``ap_`` + 12 base32 characters (60 random bits): short enough to type in
    ``pgwarden approvals approve ID``, too many to guess."""
    raw = base64.b32encode(secrets.token_bytes(8)).decode().lower()
    return APPROVAL_ID_PREFIX + raw[:_ID_CHARS]


def is_approval_id(value: str) -> bool:
    body = value[len(APPROVAL_ID_PREFIX):]
    return (value.startswith(APPROVAL_ID_PREFIX) and len(body) == _ID_CHARS
            and all(c in _B32 for c in body))


def params_digest(params: Sequence[str | None] | None) -> str:
    """SHA-256 (hex) of the Bind values: proves on release that the parameters
    are the ones the approver saw the request for, without storing them
    (a value may be a PAN). ``None`` (no Bind, e.g. a simple Query) and an
    empty list digest differently."""
    canonical = json.dumps(None if params is None else list(params), ensure_ascii=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def statement_digest(sql: str) -> str:
    """SHA-256 (hex) of the exact statement text. The fingerprint normalises
    constants away, so it alone cannot say a retry is *identical*."""
    return hashlib.sha256(sql.encode("utf-8", "surrogatepass")).hexdigest()


class ApprovalRow(SQLModel, table=True):
    """One approval request (table ``approval_requests``)."""

    __tablename__ = "approval_requests"

    approval_id: str = Field(primary_key=True, max_length=32)
    status: str = Field(index=True, max_length=16)
    subject: str = Field(index=True)
    actor: str | None = None
    groups: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    database: str = ""
    session_id: str = ""
    statement_seq: int | None = None
    statement: str = ""  # PANs redacted
    statement_digest: str = Field(default="", max_length=64)
    fingerprint: str = ""
    params_digest: str = Field(default="", max_length=64)
    reason: str = ""
    approver_groups: list[str] = Field(default_factory=list,
                                       sa_column=Column(JSON, nullable=False))
    decision_id: str = ""
    created_at: float
    expires_at: float
    late_grant_until: float
    late_grant: bool = False
    approver: str = ""
    approver_reason: str = ""
    decided_at: float | None = None


class ApprovalAction(SQLModel, table=True):
    """What happened to a request, one row per step (table ``approval_actions``)."""

    __tablename__ = "approval_actions"

    id: int | None = Field(default=None, primary_key=True)
    approval_id: str = Field(index=True, max_length=32)
    action: str = Field(max_length=16)
    actor: str = ""  # who did it: approver subject, requester, or "policyd"
    reason: str = ""
    at: float


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    """A request as callers see it (immutable snapshot of a row)."""

    approval_id: str
    status: Status
    subject: str
    actor: str | None
    groups: tuple[str, ...]
    database: str
    session_id: str
    statement_seq: int | None
    statement: str
    statement_digest: str
    fingerprint: str
    params_digest: str
    reason: str
    approver_groups: tuple[str, ...]
    decision_id: str
    created_at: float
    expires_at: float
    late_grant_until: float
    late_grant: bool
    approver: str
    approver_reason: str
    decided_at: float | None

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> ApprovalRecord:
        """From a row of ``approval_requests`` as SQLAlchemy returns it."""
        return cls(
            approval_id=row["approval_id"], status=Status(row["status"]),
            subject=row["subject"], actor=row["actor"], groups=tuple(row["groups"] or ()),
            database=row["database"], session_id=row["session_id"],
            statement_seq=row["statement_seq"], statement=row["statement"],
            statement_digest=row["statement_digest"], fingerprint=row["fingerprint"],
            params_digest=row["params_digest"], reason=row["reason"],
            approver_groups=tuple(row["approver_groups"] or ()),
            decision_id=row["decision_id"], created_at=float(row["created_at"]),
            expires_at=float(row["expires_at"]),
            late_grant_until=float(row["late_grant_until"]),
            late_grant=bool(row["late_grant"]), approver=row["approver"],
            approver_reason=row["approver_reason"],
            decided_at=None if row["decided_at"] is None else float(row["decided_at"]),
        )

    @property
    def actor_chain(self) -> tuple[str, ...]:
        """The requester's actors, most recent first (``a<-b`` → ``(a, b)``)."""
        return tuple(a for a in (self.actor or "").split("<-") if a)

    def to_json(self) -> dict[str, Any]:
        """The JSON form of the HTTP API and the CLI (ISO 8601 UTC times)."""
        def iso(v: float | None) -> str | None:
            t = _ts(v)
            return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        return {
            "approval_id": self.approval_id,
            "status": self.status.value,
            "subject": self.subject,
            "actor": self.actor,
            "groups": list(self.groups),
            "database": self.database,
            "session_id": self.session_id,
            "statement_seq": self.statement_seq,
            "statement": self.statement,
            "fingerprint": self.fingerprint,
            "statement_digest": self.statement_digest,
            "params_digest": self.params_digest,
            "reason": self.reason,
            "approver_groups": list(self.approver_groups),
            "decision_id": self.decision_id,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "late_grant_until": iso(self.late_grant_until),
            "late_grant": self.late_grant,
            "approver": self.approver,
            "approver_reason": self.approver_reason,
            "decided_at": iso(self.decided_at),
        }
