"""Audit events: what the tap and policyd report, one model per event type.

These models are the schema of the spool, of the store (one table per type)
and of the JSONL export (``docs/audit-export-schema.json``, version
:data:`SCHEMA_VERSION`). Fields are only ever added, with defaults, so a
SIEM parser written against an older version keeps working; a rename or a
removal means a new major version.

Every event carries ``type`` (the discriminator), ``event_id`` (unique, for
deduplication downstream), ``ts`` (UTC) and ``session_id`` (empty for events
that belong to no client session: gateway and evidence access).

The producer is trusted to give the right facts, not to have removed secrets:
the writer scrubs every free-text field (SQL, parameters, error messages,
recorded rows) before anything touches the spool or the store.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

SCHEMA_VERSION = "pgwarden.audit.v1"

GatewayAction = Literal["start", "stop", "policy_reload", "sink_outage", "sink_recovered",
                        "event_quarantined"]
AuthOutcome = Literal["success", "failure"]
ProtocolPath = Literal["simple", "extended", "function_call", "copy"]
ApprovalAction = Literal["requested", "approved", "denied", "expired", "cancelled"]
SessionEndReason = Literal[
    "client_terminate",
    "client_disconnect",
    "idle_timeout",
    "token_expired",
    "protocol_error",
    "server_closed",
    "shutdown",
    "result_limit",
]
EvidenceAction = Literal["list", "replay", "export", "console", "verify", "prune"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_ts(ts: datetime) -> str:
    """Render a timestamp the one way the store, the hash and the export use.

    Fixed width with microseconds and ``Z`` so that text order is time order
    in SQLite and PostgreSQL alike and the hashed form never depends on the
    database's timestamp type.
    """
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    ts = ts.astimezone(UTC)
    if ts.year >= 1000:  # isoformat is several times cheaper; same text here
        return ts.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_id() -> str:
    return uuid.uuid4().hex


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=_new_id)
    ts: datetime = Field(default_factory=utcnow, description="UTC time the event happened")
    session_id: str = ""

    @field_validator("ts")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class GatewayEvent(_EventBase):
    """Start/stop of a component, policy reloads and audit sink outages
    (PCI DSS 10.2.1.6: start, stop and pause of the audit logs)."""

    type: Literal["gateway"] = "gateway"
    action: GatewayAction
    component: str = Field("", description="tap, policyd, maskd, audit-writer, ...")
    instance: str = Field("", description="host/replica that reports it")
    policy_revision: str = ""
    detail: dict[str, Any] = Field(default_factory=dict)


class SessionStartEvent(_EventBase):
    """A client session was authenticated and connected upstream (8.2.1/8.2.2:
    the token subject and actor make a shared database role attributable)."""

    type: Literal["session_start"] = "session_start"
    subject: str
    groups: list[str] = Field(default_factory=list)
    issuer: str = ""
    kind: str = "agent"
    actor: str | None = None
    client_addr: str = ""
    database: str = ""
    user: str = ""
    upstream_role: str = ""
    tls: bool = False
    application_name: str = ""
    driver_mode: str = Field("", description="ext_proc or inline")


class AuthEvent(_EventBase):
    """An authentication attempt (10.2.1.4 invalid access attempts). Never
    carries the token: ``reason`` is a precise cause such as
    ``token_expired`` or ``bad_signature``."""

    type: Literal["auth"] = "auth"
    outcome: AuthOutcome
    reason: str = ""
    subject: str = ""
    issuer: str = ""
    client_addr: str = ""
    database: str = ""
    user: str = ""


class StatementEvent(_EventBase):
    """One statement (one protocol message), its decision and its outcome.

    Carries the six items of PCI DSS 10.2.2: user (via the session and
    ``subject``), type (``path``/``command_tag``), date and time, success or
    failure (``verdict``, ``error_sqlstate``), origin (session's client
    address) and the affected resource (``analysis``: relations touched).
    """

    type: Literal["statement"] = "statement"
    statement_seq: int = Field(description="position of the statement within its session, from 1")
    subject: str = ""
    sql: str
    params: list[str | None] | None = None
    fingerprint: str = ""
    path: ProtocolPath = "simple"
    analysis: dict[str, Any] = Field(default_factory=dict)
    verdict: Literal["allow", "deny", "hold"]
    reasons: list[str] = Field(default_factory=list)
    decision_id: str = ""
    policy_revision: str = ""
    approval_id: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    command_tag: str = ""
    rows_returned: int | None = None
    rows_affected: int | None = None
    masked_counts: dict[str, int] = Field(
        default_factory=dict, description="masked values per column or rule"
    )
    digest_before: str = Field("", description="hex digest of the result before masking")
    digest_after: str = Field("", description="hex digest of the result the client got")
    recorded_rows: list[list[str | None]] | None = Field(
        None, description="masked rows as the client saw them, capped by policy"
    )
    rows_truncated: bool = False
    error_sqlstate: str = ""
    error_message: str = ""

    @field_validator("started_at", "finished_at")
    @classmethod
    def _utc_opt(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    @property
    def succeeded(self) -> bool:
        return self.verdict == "allow" and not self.error_sqlstate


class StatementResultEvent(_EventBase):
    """How a statement ended, when the producer records the statement before
    forwarding it (so a ``kill -9`` after forwarding still leaves the
    statement on record) and its outcome afterwards. Joined to its
    :class:`StatementEvent` by ``session_id`` and ``statement_seq``.
    """

    type: Literal["statement_result"] = "statement_result"
    statement_seq: int
    finished_at: datetime | None = None
    command_tag: str = ""
    rows_returned: int | None = None
    rows_affected: int | None = None
    masked_counts: dict[str, int] = Field(default_factory=dict)
    digest_before: str = ""
    digest_after: str = ""
    recorded_rows: list[list[str | None]] | None = None
    rows_truncated: bool = False
    error_sqlstate: str = ""
    error_message: str = ""

    @field_validator("finished_at")
    @classmethod
    def _utc_opt(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class ApprovalEvent(_EventBase):
    """A just-in-time approval request and what the approver did with it."""

    type: Literal["approval"] = "approval"
    approval_id: str
    action: ApprovalAction
    statement_seq: int | None = None
    approver: str = ""
    reason: str = ""


class SessionEndEvent(_EventBase):
    type: Literal["session_end"] = "session_end"
    reason: SessionEndReason
    detail: str = ""
    statements: int | None = None


class EvidenceAccessEvent(_EventBase):
    """A read of the audit trail itself (PCI DSS 10.2.1.3)."""

    type: Literal["evidence_access"] = "evidence_access"
    action: EvidenceAction
    accessor: str = Field(description="OS user (and operator name if given) who read")
    host: str = ""
    target: str = Field("", description="session id, filter or range read")
    detail: dict[str, Any] = Field(default_factory=dict)


Event = Annotated[
    GatewayEvent
    | SessionStartEvent
    | AuthEvent
    | StatementEvent
    | StatementResultEvent
    | ApprovalEvent
    | SessionEndEvent
    | EvidenceAccessEvent,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

EVENT_TYPES: dict[str, type[_EventBase]] = {
    "gateway": GatewayEvent,
    "session_start": SessionStartEvent,
    "auth": AuthEvent,
    "statement": StatementEvent,
    "statement_result": StatementResultEvent,
    "approval": ApprovalEvent,
    "session_end": SessionEndEvent,
    "evidence_access": EvidenceAccessEvent,
}


def parse_event(data: str | bytes | dict[str, Any]) -> Event:
    """Parse one event from JSON text or a dict (as found in the spool)."""
    if isinstance(data, dict):
        return EVENT_ADAPTER.validate_python(data)
    return EVENT_ADAPTER.validate_json(data)


def event_to_json(event: Event) -> str:
    return event.model_dump_json()


# The export envelope: chain fields that the store adds to every record.
EXPORT_ENVELOPE: dict[str, Any] = {
    "schema": {"const": SCHEMA_VERSION, "description": "export schema version"},
    "table": {"type": "string", "description": "store table the record lives in"},
    "seq": {"type": "integer", "description": "position in the global chain"},
    "session_seq": {"type": "integer", "description": "position in its session's chain"},
    "prev_hash": {"type": "string", "description": "hash of the previous record (global)"},
    "hash": {
        "type": "string",
        "description": "SHA-256 hex over the canonical JSON of the record and prev_hash",
    },
    "session_prev_hash": {"type": "string"},
    "session_hash": {"type": "string"},
}


def export_json_schema() -> dict[str, Any]:
    """The JSON Schema of one JSONL export line, as kept in
    ``docs/audit-export-schema.json`` (a unit test keeps them equal)."""
    schema = EVENT_ADAPTER.json_schema(mode="serialization")
    defs = schema.get("$defs", {})
    for name in defs:
        props = defs[name].setdefault("properties", {})
        props.update(EXPORT_ENVELOPE)
        req = set(defs[name].get("required", []))
        req.update({"schema", "table", "seq", "hash", "prev_hash", "type", "ts"})
        defs[name]["required"] = sorted(req)
        defs[name]["additionalProperties"] = False
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://pgwarden.invalid/schemas/audit-export/v1.json",
        "title": "pgwarden audit export line (JSONL), " + SCHEMA_VERSION,
        "description": (
            "One JSON object per line. Fields may be added in later v1 revisions; "
            "none are removed or renamed within v1. Timestamps are UTC ISO 8601 "
            "with microseconds and Z."
        ),
        **schema,
    }


if __name__ == "__main__":  # python -m policyd.audit.events > docs/audit-export-schema.json
    import json
    import sys

    sys.stdout.write(json.dumps(export_json_schema(), indent=2, sort_keys=True) + "\n")
