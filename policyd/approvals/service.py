"""The approval service: holds for the tap, decisions for approvers.

:class:`ApprovalManager` is the logic, independent of the transport: the
gRPC :class:`ApprovalService` (hosted by policyd, see :func:`add_to_server`)
and the HTTP API (:mod:`policyd.approvals.http`, in process) both call it.

Every creation, decision, expiry and cancellation is submitted to the audit
writer as an :class:`policyd.audit.events.ApprovalEvent` by the replica
that made the change (exactly once: the store tells which call won), and
announced on the webhook when one is configured.

Approvers authenticate with their OIDC token (``TokenValidator``); whether
they may decide a given request is the store's rule (approver groups,
no self-approval), so every path applies the same one.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import socket
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol

import grpc
import structlog

from pgwarden._proto import approvals_pb2 as apb
from pgwarden._proto import approvals_pb2_grpc as apb_grpc
from policyd.approvals.convert import record_to_pb
from policyd.approvals.models import ApprovalRecord, Status, is_approval_id, statement_digest
from policyd.approvals.notify import Notifier
from policyd.approvals.store import (
    ApprovalError,
    ApprovalNotFound,
    ApprovalStore,
    InvalidRequest,
    NotAnApprover,
    NotPending,
    SelfApproval,
    Unauthenticated,
)
from policyd.audit.events import ApprovalAction, ApprovalEvent, Event
from policyd.convert import identity_from_pb, session_from_pb
from policyd.identity import TokenRejected
from tap.hooks import Identity, SessionInfo

__all__ = [
    "SERVICE_NAME",
    "ApprovalManager",
    "ApprovalService",
    "AuditUnavailable",
    "add_to_server",
]

log = structlog.get_logger("pgwarden.approvals")

SERVICE_NAME = "pgwarden.approvals.v1.ApprovalService"
MAX_HOLD_SECONDS = 3600.0


class AuditUnavailable(ApprovalError):
    """The request could not be recorded: it is cancelled (fail closed)."""


class EventSink(Protocol):
    """What we need of :class:`policyd.audit.writer.AuditWriter`."""

    def submit(self, events: Sequence[Event]) -> bool: ...


class Validator(Protocol):
    """What we need of :class:`policyd.identity.TokenValidator`."""

    async def validate_async(self, token: str) -> Identity: ...


_OUTCOME = {
    Status.APPROVED: apb.OUTCOME_APPROVED,
    Status.SPENT: apb.OUTCOME_APPROVED,
    Status.DENIED: apb.OUTCOME_DENIED,
    Status.EXPIRED: apb.OUTCOME_EXPIRED,
    Status.CANCELLED: apb.OUTCOME_CANCELLED,
}


class ApprovalManager:
    """Approval logic over an :class:`ApprovalStore`. The store's blocking
    calls run in worker threads; every method is safe to await from the loop
    that serves gRPC or HTTP."""

    def __init__(self, store: ApprovalStore, writer: EventSink | None, validator: Validator,
                 notifier: Notifier | None = None) -> None:
        self.store = store
        self.writer = writer
        self.validator = validator
        self.notifier = notifier
        self.instance = socket.gethostname()

    # -- the tap's side ----------------------------------------------------------

    async def hold(self, *, identity: Identity, session: SessionInfo, sql: str,
                   params_digest: str, fingerprint: str = "", reason: str = "",
                   approver_groups: Sequence[str] = (), hold_seconds: float = 60.0,
                   decision_id: str = "", approval_id: str = "",
                   statement_seq: int | None = None) -> tuple[ApprovalRecord, bool]:
        """Wait for a decision on this statement. Returns the final record and
        whether a late grant answered at once. Cancelled (the tap's call went
        away) → the request is marked cancelled, then CancelledError goes on."""
        digest = statement_digest(sql)
        granted = await asyncio.to_thread(
            self.store.consume_late_grant, identity.subject, fingerprint, params_digest,
            session.database, statement_digest=digest)
        if granted is not None:
            log.info("approval_late_grant_used", approval_id=granted.approval_id,
                     session_id=session.session_id, subject=identity.subject)
            return granted, True
        hold_seconds = min(max(hold_seconds, 0.0), MAX_HOLD_SECONDS)
        existing = None
        if approval_id:
            if not is_approval_id(approval_id):
                raise InvalidRequest("approval id must be 'ap_' followed by 12 base32 characters")
            existing = await asyncio.to_thread(self.store.get, approval_id)
        if existing is not None:  # the tap repeats its call (transport blip): resume
            if (existing.subject, existing.statement_digest, existing.params_digest) != (
                    identity.subject, digest, params_digest):
                raise InvalidRequest(f"approval id {approval_id} belongs to another statement")
            record = existing
            remaining = max(0.0, existing.expires_at - self.store.clock())
        else:
            creating = asyncio.ensure_future(asyncio.to_thread(
                lambda: self.store.create(
                    identity=identity, sql=sql, params_digest=params_digest,
                    database=session.database, session_id=session.session_id,
                    fingerprint=fingerprint, reason=reason, approver_groups=approver_groups,
                    hold_seconds=hold_seconds, decision_id=decision_id,
                    statement_seq=statement_seq, approval_id=approval_id or None)))
            try:
                record = await asyncio.shield(creating)
            except asyncio.CancelledError:
                # Cancelled while the row was being written: it will exist, so
                # close it rather than leave it pending.
                with contextlib.suppress(Exception):
                    made = await creating
                    self._audit(made, "requested", reason=made.reason)
                    await self._close(made.approval_id, Status.CANCELLED,
                                      "client cancelled or disconnected during the hold")
                raise
            if not self._audit(record, "requested", reason=record.reason):
                await asyncio.to_thread(self.store.cancel, record.approval_id,
                                        "audit trail unavailable")
                raise AuditUnavailable("the approval request could not be recorded; refused")
            log.info("approval_requested", approval_id=record.approval_id,
                     session_id=session.session_id, subject=identity.subject,
                     fingerprint=fingerprint, hold_seconds=hold_seconds)
            self._notify("requested", record)
            remaining = hold_seconds
        try:
            record = await self.store.wait(record.approval_id, remaining)
        except asyncio.CancelledError:
            await asyncio.shield(self._close(record.approval_id, Status.CANCELLED,
                                             "client cancelled or disconnected during the hold"))
            raise
        if record.status is Status.PENDING:
            record = await self._close(record.approval_id, Status.EXPIRED,
                                       f"hold of {hold_seconds:g}s ended unanswered")
        return record, False

    async def cancel(self, approval_id: str, reason: str = "cancelled by the tap") -> ApprovalRecord:
        return await self._close(approval_id, Status.CANCELLED, reason)

    async def _close(self, approval_id: str, status: Status, reason: str) -> ApprovalRecord:
        record, changed = await asyncio.to_thread(self.store.close_pending, approval_id,
                                                  status, reason)
        if changed:
            self._audit(record, "expired" if status is Status.EXPIRED else "cancelled",
                        reason=reason)
            log.info(f"approval_{status.value}", approval_id=approval_id,
                     session_id=record.session_id)
            self._notify(status.value, record)
        return record

    # -- the approver's side ------------------------------------------------------

    async def authenticate(self, token: str) -> Identity:
        try:
            return await self.validator.validate_async(token)
        except TokenRejected as exc:
            log.info("approver_token_rejected", reason=exc.reason_code.value)
            raise Unauthenticated(f"approver token rejected ({exc.reason_code.value})") from None

    async def decide(self, token: str, approval_id: str, approve: bool,
                     reason: str) -> ApprovalRecord:
        return await self.decide_as(await self.authenticate(token), approval_id, approve,
                                    reason)

    async def decide_as(self, approver: Identity, approval_id: str, approve: bool,
                        reason: str) -> ApprovalRecord:
        """:meth:`decide` for a caller that authenticated the approver itself
        (e.g. a console session): same rules, audit event and notification."""
        if not reason.strip():
            raise InvalidRequest("a reason is required: every approval and denial says why")
        try:
            record = await asyncio.to_thread(self.store.decide, approval_id, approver,
                                             approve, reason)
        except (SelfApproval, NotAnApprover, NotPending, ApprovalNotFound) as exc:
            # 10.2.1.4: refused attempts are worth an operator's attention.
            log.warning("approval_decision_refused",
                        approval_id=approval_id if is_approval_id(approval_id) else "(malformed)",
                        approver=approver.subject, refusal=type(exc).__name__)
            raise
        action: ApprovalAction = "approved" if approve else "denied"
        self._audit(record, action, approver=approver.subject, reason=record.approver_reason)
        log.info(f"approval_{action}", approval_id=approval_id, approver=approver.subject,
                 late_grant=record.late_grant, session_id=record.session_id)
        self._notify(action, record)
        return record

    async def list(self, token: str, status: str | None = None,
                   limit: int = 100) -> builtins.list[ApprovalRecord]:
        viewer = await self.authenticate(token)
        if status and status not in Status.__members__.values():
            raise InvalidRequest(f"unknown status {status[:20]!r}")
        for record in await asyncio.to_thread(self.store.expire_overdue):
            self._audit(record, "expired", reason="holder gone; hold ended unanswered")
            self._notify("expired", record)
        return await asyncio.to_thread(
            lambda: self.store.list(status or None, max(1, min(limit or 100, 1000)),
                                    visible_to=viewer))

    async def get(self, token: str, approval_id: str) -> ApprovalRecord:
        """Visible to the requester and the request's approvers; to anyone else
        it does not exist."""
        viewer = await self.authenticate(token)
        record = await asyncio.to_thread(self.store.get, approval_id)
        if record is None or not (record.subject == viewer.subject
                                  or set(viewer.groups) & set(record.approver_groups)):
            shown = approval_id if is_approval_id(approval_id) else "with that id"
            raise ApprovalNotFound(f"no approval request {shown} visible to you")
        return record

    # -- evidence and notification -----------------------------------------------

    def _audit(self, record: ApprovalRecord, action: ApprovalAction, *, approver: str = "",
               reason: str = "") -> bool:
        if self.writer is None:
            return True
        event = ApprovalEvent(session_id=record.session_id, approval_id=record.approval_id,
                              action=action, statement_seq=record.statement_seq,
                              approver=approver, reason=reason)
        accepted = self.writer.submit([event])
        if not accepted:
            log.error("approval_audit_refused", approval_id=record.approval_id, action=action)
        return accepted

    def _notify(self, event: str, record: ApprovalRecord) -> None:
        if self.notifier is not None:
            self.notifier.notify(event, record)


def _status_for(exc: ApprovalError) -> grpc.StatusCode:
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, SelfApproval | NotAnApprover):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, ApprovalNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, NotPending):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, AuditUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    if not isinstance(exc, ApprovalError):
        # A database or programming error: its message can hold SQL and the
        # store URL, so only the class is logged and nothing is sent on.
        log.error("approval_service_error", error=type(exc).__name__)
        exc = AuditUnavailable("approval store unavailable; statement refused")
    # The class name travels too, so a remote caller raises the same exception.
    await context.abort(_status_for(exc), str(exc),
                        trailing_metadata=(("pgwarden-error", type(exc).__name__),))
    raise AssertionError("unreachable: abort raises")


class ApprovalService(apb_grpc.ApprovalServiceServicer):
    """gRPC adaptor of :class:`ApprovalManager`. Refusals become status codes
    (UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, FAILED_PRECONDITION,
    INVALID_ARGUMENT, UNAVAILABLE) whose details are safe to show."""

    def __init__(self, manager: ApprovalManager) -> None:
        self.manager = manager

    async def Hold(self, request: apb.HoldRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> apb.HoldResult:
        try:
            record, late = await self.manager.hold(
                identity=identity_from_pb(request.identity),
                session=session_from_pb(request.session), sql=request.sql,
                params_digest=request.params_digest, fingerprint=request.fingerprint,
                reason=request.reason, approver_groups=tuple(request.approver_groups),
                hold_seconds=request.hold_seconds or 60.0, decision_id=request.decision_id,
                approval_id=request.approval_id,
                statement_seq=(request.statement_seq if request.HasField("statement_seq")
                               else None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        return apb.HoldResult(outcome=_OUTCOME.get(record.status, apb.OUTCOME_UNSPECIFIED),
                              approval=record_to_pb(record), from_late_grant=late)

    async def Cancel(self, request: apb.CancelRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> apb.ApprovalInfo:
        try:
            return record_to_pb(await self.manager.cancel(request.approval_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    async def Decide(self, request: apb.DecideRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> apb.ApprovalInfo:
        try:
            return record_to_pb(await self.manager.decide(
                request.token, request.approval_id, request.approve, request.reason))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    async def List(self, request: apb.ListRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> apb.ListResponse:
        try:
            records = await self.manager.list(request.token, request.status or None,
                                              request.limit or 100)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        return apb.ListResponse(approvals=[record_to_pb(r) for r in records])

    async def Get(self, request: apb.GetRequest,
                  context: grpc.aio.ServicerContext[Any, Any]) -> apb.ApprovalInfo:
        try:
            return record_to_pb(await self.manager.get(request.token, request.approval_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)


def add_to_server(server: grpc.aio.Server, store: ApprovalStore, writer: EventSink | None,
                  validator: Validator, *, notifier: Notifier | None = None) -> ApprovalService:
    """Host the approval service on policyd's gRPC server (call before
    ``server.start()``). Returns the servicer; its ``manager`` is what the
    in-process HTTP API takes."""
    servicer = ApprovalService(ApprovalManager(store, writer, validator, notifier))
    apb_grpc.add_ApprovalServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    return servicer
