"""Approval records to and from their protobuf form."""

from __future__ import annotations

from pgwarden._proto import approvals_pb2 as apb
from policyd.approvals.models import ApprovalRecord, Status


def record_to_pb(rec: ApprovalRecord) -> apb.ApprovalInfo:
    msg = apb.ApprovalInfo(
        approval_id=rec.approval_id, status=rec.status.value, subject=rec.subject,
        groups=list(rec.groups), database=rec.database, session_id=rec.session_id,
        statement=rec.statement, fingerprint=rec.fingerprint,
        params_digest=rec.params_digest, reason=rec.reason,
        approver_groups=list(rec.approver_groups), created_at=rec.created_at,
        expires_at=rec.expires_at, late_grant_until=rec.late_grant_until,
        approver=rec.approver, approver_reason=rec.approver_reason,
        decided_at=rec.decided_at or 0.0, late_grant=rec.late_grant,
        statement_digest=rec.statement_digest, decision_id=rec.decision_id,
    )
    if rec.actor is not None:
        msg.actor = rec.actor
    return msg


def record_from_pb(msg: apb.ApprovalInfo) -> ApprovalRecord:
    return ApprovalRecord(
        approval_id=msg.approval_id, status=Status(msg.status or "pending"),
        subject=msg.subject, actor=msg.actor if msg.HasField("actor") else None,
        groups=tuple(msg.groups), database=msg.database, session_id=msg.session_id,
        statement_seq=None, statement=msg.statement, statement_digest=msg.statement_digest,
        fingerprint=msg.fingerprint, params_digest=msg.params_digest, reason=msg.reason,
        approver_groups=tuple(msg.approver_groups), decision_id=msg.decision_id,
        created_at=msg.created_at, expires_at=msg.expires_at,
        late_grant_until=msg.late_grant_until, late_grant=msg.late_grant,
        approver=msg.approver, approver_reason=msg.approver_reason,
        decided_at=msg.decided_at or None,
    )
