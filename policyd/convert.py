"""Between tap.hooks dataclasses and pgwarden.policy.v1 messages.

One place for both directions so the tap's client and policyd's server can
never disagree on a field.
"""

from __future__ import annotations

import json
from typing import Any

from pgwarden._proto import policy_pb2 as pb
from tap.hooks import (
    Approval,
    ColumnRule,
    Decision,
    Identity,
    MaskPlan,
    RecordRows,
    SessionInfo,
    StatementRequest,
    Verdict,
)

_VERDICT_TO_PB = {Verdict.ALLOW: pb.VERDICT_ALLOW, Verdict.DENY: pb.VERDICT_DENY,
                  Verdict.HOLD: pb.VERDICT_HOLD}
_VERDICT_FROM_PB = {v: k for k, v in _VERDICT_TO_PB.items()}


def identity_to_pb(identity: Identity) -> pb.Identity:
    msg = pb.Identity(subject=identity.subject, groups=list(identity.groups),
                      issuer=identity.issuer, kind=identity.kind)
    if identity.actor is not None:
        msg.actor = identity.actor
    if identity.expires_at is not None:
        msg.expires_at = identity.expires_at
    return msg


def identity_from_pb(msg: pb.Identity) -> Identity:
    return Identity(
        subject=msg.subject or "anonymous",
        groups=tuple(msg.groups),
        issuer=msg.issuer,
        kind=msg.kind or "agent",
        actor=msg.actor if msg.HasField("actor") else None,
        expires_at=msg.expires_at if msg.HasField("expires_at") else None,
    )


def session_to_pb(session: SessionInfo) -> pb.Session:
    return pb.Session(
        session_id=session.session_id, database=session.database, user=session.user,
        upstream_role=session.upstream_role, client_addr=session.client_addr,
        application_name=session.application_name, tls=session.tls,
        search_path=session.search_path, transaction_status=session.transaction_status,
    )


def session_from_pb(msg: pb.Session) -> SessionInfo:
    return SessionInfo(
        session_id=msg.session_id, database=msg.database, user=msg.user,
        upstream_role=msg.upstream_role, client_addr=msg.client_addr,
        application_name=msg.application_name, tls=msg.tls,
        search_path=msg.search_path or '"$user", public',
        transaction_status=msg.transaction_status or "I",
    )


def request_to_pb(request: StatementRequest) -> pb.DecideRequest:
    msg = pb.DecideRequest(
        identity=identity_to_pb(request.identity), session=session_to_pb(request.session),
        sql=request.sql, path=request.path, statement_name=request.statement_name,
        params_known=request.params is not None,
    )
    for value in request.params or ():
        msg.params.append(pb.Param(is_null=True) if value is None else pb.Param(value=value))
    return msg


def request_from_pb(msg: pb.DecideRequest) -> StatementRequest:
    params = (tuple(None if p.is_null else p.value for p in msg.params)
              if msg.params_known else None)
    return StatementRequest(
        identity=identity_from_pb(msg.identity), session=session_from_pb(msg.session),
        sql=msg.sql, path=msg.path or "simple", statement_name=msg.statement_name,
        params=params,
    )


def decision_to_pb(decision: Decision, *, params_read: tuple[int, ...] = (),
                   cacheable: bool = True) -> pb.DecideResponse:
    return pb.DecideResponse(
        verdict=_VERDICT_TO_PB[decision.verdict],
        reasons=list(decision.reasons),
        decision_id=decision.decision_id,
        policy_revision=decision.policy_revision,
        sqlstate=decision.sqlstate,
        mask=pb.MaskPlan(
            rules=[pb.ColumnRule(column=r.column, style=r.style) for r in decision.mask.rules],
            derived_columns=list(decision.mask.derived_columns),
            scan_content=decision.mask.scan_content,
            unmasked=decision.mask.unmasked,
            withhold_errors=decision.mask.withhold_errors,
            column_positions=[pb.ColumnPosition(position=p, column=c)
                              for p, c in decision.mask.column_positions],
        ),
        approval=pb.Approval(
            required=decision.approval.required, reason=decision.approval.reason,
            approver_groups=list(decision.approval.approver_groups),
            hold_seconds=decision.approval.hold_seconds,
        ),
        record_rows=decision.record_rows.value,
        record_rows_cap=decision.record_rows_cap,
        analysis_json=json.dumps(decision.analysis, separators=(",", ":")),
        params_read=list(params_read),
        cacheable=cacheable,
        max_result_bytes=decision.max_result_bytes or 0,
    )


def decision_from_pb(msg: pb.DecideResponse) -> Decision:
    """A Decision from the wire; anything unexpected makes it a DENY."""
    verdict = _VERDICT_FROM_PB.get(msg.verdict, Verdict.DENY)
    try:
        analysis: dict[str, Any] = json.loads(msg.analysis_json) if msg.analysis_json else {}
    except ValueError:
        analysis = {}
    try:
        record_rows = RecordRows(msg.record_rows or RecordRows.COUNT.value)
    except ValueError:
        record_rows = RecordRows.COUNT
    reasons = tuple(msg.reasons)
    if msg.verdict not in _VERDICT_FROM_PB:
        reasons = (*reasons, "policy service sent no verdict")
    return Decision(
        verdict=verdict,
        reasons=reasons,
        decision_id=msg.decision_id,
        policy_revision=msg.policy_revision,
        sqlstate=msg.sqlstate or "42501",
        mask=MaskPlan(
            rules=tuple(ColumnRule(column=r.column, style=r.style or "last4")
                        for r in msg.mask.rules),
            derived_columns=tuple(msg.mask.derived_columns),
            scan_content=msg.mask.scan_content if msg.HasField("mask") else True,
            unmasked=msg.mask.unmasked,
            withhold_errors=msg.mask.withhold_errors,
            column_positions=tuple((p.position, p.column) for p in msg.mask.column_positions),
        ),
        approval=Approval(
            required=msg.approval.required, reason=msg.approval.reason,
            approver_groups=tuple(msg.approval.approver_groups),
            hold_seconds=msg.approval.hold_seconds or 60.0,
        ),
        record_rows=record_rows,
        record_rows_cap=msg.record_rows_cap,
        analysis=analysis,
        max_result_bytes=msg.max_result_bytes if msg.max_result_bytes > 0 else None,
    )
