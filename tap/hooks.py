"""The contract between the sans-IO tap core and the services that decide,
mask and record.

The core never performs I/O. When it needs a decision it emits a
``NeedDecision`` action carrying a :class:`StatementRequest`; the driver asks
the policy (in-process cache first, policyd over gRPC otherwise) and feeds a
:class:`Decision` back with ``Session.on_decision``. Masking and audit events
work the same way. Everything here is plain data so it can cross a process
boundary and be unit-tested with literals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Verdict(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    HOLD = "hold"  # needs a human approval first


class RecordRows(enum.StrEnum):
    NONE = "none"
    COUNT = "count"
    MASKED_ROWS = "masked_rows"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is behind the session (filled from the validated OIDC token)."""

    subject: str = "anonymous"
    groups: tuple[str, ...] = ()
    issuer: str = ""
    kind: str = "agent"  # "agent" or "human"
    actor: str | None = None  # RFC 8693 `act` chain, rendered "a<-b"
    expires_at: float | None = None  # token `exp`, epoch seconds


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    database: str = ""
    user: str = ""  # the user name the client sent
    upstream_role: str = ""
    client_addr: str = ""
    application_name: str = ""
    tls: bool = False
    search_path: str = '"$user", public'
    transaction_status: str = "I"  # I idle, T in block, E failed block


@dataclass(frozen=True, slots=True)
class StatementRequest:
    """One decision to take: the SQL of one protocol message.

    ``path`` is how the SQL arrived: ``simple`` (Query), ``parse`` (extended
    Parse, decided when first executed), ``function_call`` (FunctionCall by
    OID: ``sql`` is the call in SQL, ``SELECT "schema"."name"($1, ...)``, or
    ``"<function call oid N>"`` while the function is not known) or ``copy``.
    ``params`` are the Bind values in text form when known (None = NULL);
    binary parameters are given as ``b"\\x..."`` hex text.
    ``function`` is a FunctionCall's (OID, argument count).
    """

    identity: Identity
    session: SessionInfo
    sql: str
    path: str = "simple"
    statement_name: str = ""
    params: tuple[str | None, ...] | None = None
    function: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class ColumnRule:
    """Mask one result column. ``column`` is ``schema.table.column``."""

    column: str
    style: str = "last4"  # last4 | first6_last4 | redact | null | hmac


@dataclass(frozen=True, slots=True)
class MaskPlan:
    rules: tuple[ColumnRule, ...] = ()
    # Output positions (0-based) derived from a classified column through an
    # expression: masked as a whole whatever their content.
    derived_columns: tuple[int, ...] = ()
    scan_content: bool = True  # look for Luhn-valid PANs in every text value
    unmasked: bool = False  # policy grants raw data (recorded)
    # The server's error text is not passed on for this statement (it may
    # quote a reshaped card number); SQLSTATE and position are.
    withhold_errors: bool = False
    # (position, schema.table.column) of binary COPY output columns that are
    # a classified column: its rule applies there (COPY data carries no
    # column identity the way a RowDescription does).
    column_positions: tuple[tuple[int, str], ...] = ()

    @property
    def active(self) -> bool:
        return not self.unmasked and bool(self.rules or self.derived_columns or self.scan_content
                                          or self.column_positions)


@dataclass(frozen=True, slots=True)
class Approval:
    required: bool = False
    reason: str = ""
    approver_groups: tuple[str, ...] = ()
    hold_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reasons: tuple[str, ...] = ()
    decision_id: str = ""
    policy_revision: str = ""
    sqlstate: str = "42501"
    mask: MaskPlan = field(default_factory=MaskPlan)
    approval: Approval = field(default_factory=Approval)
    record_rows: RecordRows = RecordRows.COUNT
    record_rows_cap: int = 100
    analysis: dict[str, Any] = field(default_factory=dict)
    approval_id: str = ""  # set when a hold was created
    # Bytes of DataRow/CopyData one execution may return, by policy; None:
    # no limit from the policy (tap.max_result_bytes may still set one).
    max_result_bytes: int | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


ALLOW_ALL = Decision(verdict=Verdict.ALLOW, reasons=("no policy configured",),
                     mask=MaskPlan(scan_content=False))


@dataclass(frozen=True, slots=True)
class UpstreamLogin:
    """How the tap logs in to PostgreSQL for a session. Secrets stay here and
    in the session's memory; ``repr`` never shows them."""

    role: str
    method: str = "scram-sha-256"  # scram-sha-256 | md5 | password | trust | cert
    password: str | None = field(default=None, repr=False)
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The answer to a token presented as a password.

    ``reason`` is precise and goes to the audit record only; the client sees a
    generic message.
    """

    ok: bool
    identity: Identity = field(default_factory=Identity)
    login: UpstreamLogin | None = None
    reason: str = ""
    sqlstate: str = "28P01"
    decision_id: str = ""
