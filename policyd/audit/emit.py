"""Build audit events from the tap's data contract (``tap.hooks``).

The tap and policyd call these so that every producer fills the events the
same way: the protocol path named as the export schema names it, the
fingerprint computed by PostgreSQL's parser, and the decision's
``record_rows`` setting applied (none / count / masked rows up to the cap).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime

from pglast import parser as _pg

from policyd.audit.events import (
    ProtocolPath,
    SessionStartEvent,
    StatementEvent,
    StatementResultEvent,
)
from policyd.audit.scrub import scrub_sql
from tap.hooks import Decision, Identity, RecordRows, SessionInfo, StatementRequest

_PATHS: dict[str, ProtocolPath] = {
    "simple": "simple",
    "parse": "extended",
    "extended": "extended",
    "function_call": "function_call",
    "copy": "copy",
}


def fingerprint(sql: str) -> str:
    """libpg_query's fingerprint (same for statements differing only in
    constants); for text PostgreSQL cannot parse, a hash of the scrubbed text."""
    try:
        return str(_pg.fingerprint(sql))
    except Exception:  # pglast raises its own ParseError types
        clean, _ = scrub_sql(sql)
        return "raw:" + hashlib.sha256(clean.encode()).hexdigest()[:16]


def session_start(
    identity: Identity, session: SessionInfo, *, driver_mode: str = "", ts: datetime | None = None
) -> SessionStartEvent:
    event = SessionStartEvent(
        session_id=session.session_id,
        subject=identity.subject,
        groups=list(identity.groups),
        issuer=identity.issuer,
        kind=identity.kind,
        actor=identity.actor,
        client_addr=session.client_addr,
        database=session.database,
        user=session.user,
        upstream_role=session.upstream_role,
        tls=session.tls,
        application_name=session.application_name,
        driver_mode=driver_mode,
    )
    return event if ts is None else event.model_copy(update={"ts": event._utc(ts)})


def statement(
    request: StatementRequest,
    decision: Decision,
    *,
    statement_seq: int,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    command_tag: str = "",
    rows_returned: int | None = None,
    rows_affected: int | None = None,
    masked_counts: Mapping[str, int] | None = None,
    digest_before: str = "",
    digest_after: str = "",
    recorded_rows: Sequence[Sequence[str | None]] | None = None,
    error_sqlstate: str = "",
    error_message: str = "",
) -> StatementEvent:
    """The statement event for ``request`` decided by ``decision``.

    ``recorded_rows`` are the rows as the client received them (already
    masked); they are kept only when the decision says ``masked_rows`` and
    only up to ``record_rows_cap``. The text is scrubbed later by the writer.
    """
    rows: list[list[str | None]] | None = None
    truncated = False
    if decision.record_rows is RecordRows.MASKED_ROWS and recorded_rows is not None:
        cap = max(decision.record_rows_cap, 0)
        rows = [list(r) for r in recorded_rows[:cap]]
        truncated = len(recorded_rows) > cap
    if decision.record_rows is RecordRows.NONE:
        rows_returned = rows_affected = None
    event = StatementEvent(
        session_id=request.session.session_id,
        statement_seq=statement_seq,
        subject=request.identity.subject,
        sql=request.sql,
        params=list(request.params) if request.params is not None else None,
        fingerprint=fingerprint(request.sql),
        path=_PATHS.get(request.path, "simple"),
        analysis=dict(decision.analysis),
        verdict=decision.verdict.value,
        reasons=list(decision.reasons),
        decision_id=decision.decision_id,
        policy_revision=decision.policy_revision,
        approval_id=decision.approval_id,
        started_at=started_at,
        finished_at=finished_at,
        command_tag=command_tag,
        rows_returned=rows_returned,
        rows_affected=rows_affected,
        masked_counts=dict(masked_counts or {}),
        digest_before=digest_before,
        digest_after=digest_after,
        recorded_rows=rows,
        rows_truncated=truncated,
        error_sqlstate=error_sqlstate,
        error_message=error_message,
    )
    return event if started_at is None else event.model_copy(update={"ts": event.started_at})


def statement_result(
    session_id: str,
    statement_seq: int,
    decision: Decision,
    *,
    finished_at: datetime | None = None,
    command_tag: str = "",
    rows_returned: int | None = None,
    rows_affected: int | None = None,
    masked_counts: Mapping[str, int] | None = None,
    digest_before: str = "",
    digest_after: str = "",
    recorded_rows: Sequence[Sequence[str | None]] | None = None,
    error_sqlstate: str = "",
    error_message: str = "",
) -> StatementResultEvent:
    """The outcome of a statement recorded earlier with :func:`statement`
    (record first, forward, then this), with the same ``record_rows`` rules."""
    rows: list[list[str | None]] | None = None
    truncated = False
    if decision.record_rows is RecordRows.MASKED_ROWS and recorded_rows is not None:
        cap = max(decision.record_rows_cap, 0)
        rows = [list(r) for r in recorded_rows[:cap]]
        truncated = len(recorded_rows) > cap
    if decision.record_rows is RecordRows.NONE:
        rows_returned = rows_affected = None
    event = StatementResultEvent(
        session_id=session_id,
        statement_seq=statement_seq,
        finished_at=finished_at,
        command_tag=command_tag,
        rows_returned=rows_returned,
        rows_affected=rows_affected,
        masked_counts=dict(masked_counts or {}),
        digest_before=digest_before,
        digest_after=digest_after,
        recorded_rows=rows,
        rows_truncated=truncated,
        error_sqlstate=error_sqlstate,
        error_message=error_message,
    )
    return event if finished_at is None else event.model_copy(update={"ts": event.finished_at})
