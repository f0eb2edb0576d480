"""Clients of the approval service.

:class:`ApprovalClient` is what the tap calls when a decision's verdict is
HOLD::

    approvals = ApprovalClient("127.0.0.1:50061")
    await approvals.start()
    ...
    decision = await approvals.hold(request, decision, cancel=client_cancelled)
    # ALLOW (approval_id set): run exactly this statement
    # DENY PW001 denied / PW002 expired / PW003 cancelled / 58000 unavailable

It never raises for an outcome and fails closed: an unreachable service is a
DENY (SQLSTATE 58000). The held statement is identified by its exact text and
a digest of its Bind values, so only what the approver saw is released.

:class:`RemoteApprovals` is the approver's side over gRPC (the CLI and the
stand-alone HTTP API use it); it raises the same exceptions as
:class:`policyd.approvals.service.ApprovalManager`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
from datetime import UTC, datetime

import grpc
import structlog

from pgwarden._proto import approvals_pb2 as apb
from pgwarden._proto import approvals_pb2_grpc as apb_grpc
from policyd.approvals.convert import record_from_pb
from policyd.approvals.models import ApprovalRecord, new_approval_id, params_digest
from policyd.approvals.store import (
    ApprovalError,
    ApprovalNotFound,
    InvalidRequest,
    NotAnApprover,
    NotPending,
    SelfApproval,
    Unauthenticated,
)
from policyd.convert import identity_to_pb, session_to_pb
from tap.hooks import Decision, StatementRequest, Verdict

__all__ = [
    "CANCELLED_SQLSTATE",
    "DENIED_SQLSTATE",
    "EXPIRED_SQLSTATE",
    "UNAVAILABLE_SQLSTATE",
    "ApprovalClient",
    "RemoteApprovals",
    "ServiceUnavailable",
    "cancelled_decision",
]

log = structlog.get_logger("pgwarden.approvals.client")

DENIED_SQLSTATE = "PW001"
EXPIRED_SQLSTATE = "PW002"
CANCELLED_SQLSTATE = "PW003"
UNAVAILABLE_SQLSTATE = "58000"  # as for the policy service: external, worth retrying later
DEFAULT_TARGET = "127.0.0.1:50061"
_RPC_SLACK = 30.0  # beyond the hold: the server answers expired itself


def _minutes(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return f"{minutes} minute" + ("" if minutes == 1 else "s")


def _until(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S UTC")


def _deny(decision: Decision, sqlstate: str, reason: str, approval_id: str) -> Decision:
    return dataclasses.replace(decision, verdict=Verdict.DENY, sqlstate=sqlstate,
                               reasons=(reason,), approval_id=approval_id)


def cancelled_decision(decision: Decision, approval_id: str) -> Decision:
    """The PW003 answer for a statement whose hold the client cancelled."""
    return _deny(decision, CANCELLED_SQLSTATE,
                 f"approval {approval_id} cancelled: the statement was cancelled while it "
                 "waited for approval; run it again to ask again", approval_id)


def _outcome_decision(decision: Decision, result: apb.HoldResult) -> Decision:
    info = result.approval
    rid = info.approval_id
    if result.outcome == apb.OUTCOME_APPROVED:
        how = "late approval" if result.from_late_grant else "approved"
        reason = f"{how} {rid} by {info.approver}: {info.approver_reason}"
        return dataclasses.replace(decision, verdict=Verdict.ALLOW, approval_id=rid,
                                   reasons=(*decision.reasons, reason))
    if result.outcome == apb.OUTCOME_DENIED:
        return _deny(decision, DENIED_SQLSTATE,
                     f"approval {rid} denied by {info.approver}: {info.approver_reason}; "
                     "running it again asks again", rid)
    if result.outcome == apb.OUTCOME_EXPIRED:
        window = max(0.0, info.late_grant_until - info.expires_at)
        return _deny(decision, EXPIRED_SQLSTATE,
                     f"approval {rid} not given within the hold; ask an approver: "
                     f"pgwarden approvals approve {rid} --reason TEXT, then retry the identical "
                     f"statement within {_minutes(window)} after a late approval "
                     f"(until {_until(info.late_grant_until)})", rid)
    if result.outcome == apb.OUTCOME_CANCELLED:
        return cancelled_decision(decision, rid)
    return _deny(decision, DENIED_SQLSTATE,
                 f"approval {rid or '(none)'} ended without an approval; refused", rid)


class ApprovalClient:
    """The tap's client of ``ApprovalService`` (one per tap process).

    ``target``: ``host:port`` or ``unix:/path``. ``rpc_deadline`` bounds the
    small calls (Cancel); a Hold may last its hold time plus a margin.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, rpc_deadline: float = 2.0) -> None:
        self.target = target
        self.rpc_deadline = rpc_deadline
        self._channel: grpc.aio.Channel | None = None
        self._stub: apb_grpc.ApprovalServiceStub | None = None

    async def start(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = apb_grpc.ApprovalServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> ApprovalClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def hold_request(self, request: StatementRequest, decision: Decision,
                     approval_id: str, statement_seq: int | None = None) -> apb.HoldRequest:
        msg = apb.HoldRequest(
            identity=identity_to_pb(request.identity), session=session_to_pb(request.session),
            sql=request.sql, params_digest=params_digest(request.params),
            fingerprint=str(decision.analysis.get("fingerprint", "") or ""),
            reason=decision.approval.reason or "; ".join(decision.reasons),
            approver_groups=list(decision.approval.approver_groups),
            hold_seconds=decision.approval.hold_seconds or 60.0,
            decision_id=decision.decision_id, approval_id=approval_id)
        if statement_seq is not None:
            msg.statement_seq = statement_seq
        return msg

    async def hold(self, request: StatementRequest, decision: Decision, *,
                   cancel: asyncio.Event | None = None,
                   statement_seq: int | None = None) -> Decision:
        """Hold ``request`` until an approver decides, the hold ends, or
        ``cancel`` is set (the client's CancelRequest, a disconnect).

        Returns ALLOW (a copy of ``decision`` with ``approval_id``) or DENY
        with PW001/PW002/PW003 or 58000; never raises, except CancelledError
        when the calling task is cancelled (the request is cancelled too).
        """
        if self._stub is None:
            await self.start()
        assert self._stub is not None
        approval_id = new_approval_id()  # ours: we can name it even if we cancel
        try:
            msg = self.hold_request(request, decision, approval_id, statement_seq)
        except (ValueError, TypeError):
            return _deny(decision, DENIED_SQLSTATE,
                         "statement could not be sent to the approval service; refused", "")
        deadline = msg.hold_seconds + _RPC_SLACK
        call = self._stub.Hold(msg, timeout=deadline)
        try:
            if cancel is not None:
                waiter = asyncio.ensure_future(cancel.wait())
                result_task = asyncio.ensure_future(self._await(call))
                try:
                    done, _ = await asyncio.wait({waiter, result_task},
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if result_task not in done:
                    call.cancel()
                    result_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await result_task
                    await self._cancel(approval_id)
                    return cancelled_decision(decision, approval_id)
                result = result_task.result()
            else:
                result = await self._await(call)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "DEADLINE"
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else ""
            log.warning("approval_rpc_failed", session_id=request.session.session_id,
                        approval_id=approval_id, code=code)
            if isinstance(exc, grpc.aio.AioRpcError) and _ours(exc) and detail:
                why = detail  # the service's own refusal (e.g. audit trail unavailable)
            else:
                why = f"approval service unavailable ({code.lower()})"
            return _deny(decision, UNAVAILABLE_SQLSTATE,
                         f"{why}; statement held for approval was refused", approval_id)
        return _outcome_decision(decision, result)

    @staticmethod
    async def _await(call: grpc.aio.UnaryUnaryCall[apb.HoldRequest, apb.HoldResult],
                     ) -> apb.HoldResult:
        result: apb.HoldResult = await call
        return result

    async def _cancel(self, approval_id: str) -> None:
        """Belt and braces: the server cancels when our call goes away, this
        says so explicitly (and covers a call that had not reached it)."""
        assert self._stub is not None
        with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
            await self._stub.Cancel(apb.CancelRequest(approval_id=approval_id),
                                    timeout=self.rpc_deadline)


class ServiceUnavailable(ApprovalError):
    """policyd could not be reached, or could not record the action."""


_ERRORS: dict[str, type[ApprovalError]] = {cls.__name__: cls for cls in (
    Unauthenticated, ApprovalNotFound, NotPending, InvalidRequest, SelfApproval,
    NotAnApprover)}


def _ours(exc: grpc.aio.AioRpcError) -> str:
    """The exception class name the service sent, or "" (a transport error)."""
    for key, value in exc.trailing_metadata() or ():
        if key == "pgwarden-error":
            return str(value)
    return ""


def _error(exc: grpc.aio.AioRpcError) -> ApprovalError:
    """The exception the service raised, from the class name it sent along."""
    detail = exc.details() or exc.code().name
    name = _ours(exc)
    cls = _ERRORS.get(name)
    if cls is None:
        if exc.code() == grpc.StatusCode.UNAVAILABLE and name:
            return ServiceUnavailable(detail)
        return ServiceUnavailable(f"approval service unavailable ({exc.code().name.lower()})")
    return cls(detail)


class RemoteApprovals:
    """The approver's operations over gRPC; same methods and exceptions as
    :class:`policyd.approvals.service.ApprovalManager` (so the HTTP API can
    use either)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, deadline: float = 10.0) -> None:
        self.target = target
        self.deadline = deadline
        self._channel: grpc.aio.Channel | None = None
        self._stub_: apb_grpc.ApprovalServiceStub | None = None

    @property
    def _stub(self) -> apb_grpc.ApprovalServiceStub:
        # Made on first use, inside the event loop that will drive it.
        if self._stub_ is None:
            self._channel = grpc.aio.insecure_channel(self.target)
            self._stub_ = apb_grpc.ApprovalServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub_

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub_ = None

    async def __aenter__(self) -> RemoteApprovals:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def decide(self, token: str, approval_id: str, approve: bool,
                     reason: str) -> ApprovalRecord:
        try:
            msg = await self._stub.Decide(apb.DecideRequest(
                approval_id=approval_id, token=token, approve=approve, reason=reason),
                timeout=self.deadline)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return record_from_pb(msg)

    async def list(self, token: str, status: str | None = None,
                   limit: int = 100) -> builtins.list[ApprovalRecord]:
        try:
            msg = await self._stub.List(apb.ListRequest(token=token, status=status or "",
                                                        limit=limit), timeout=self.deadline)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return [record_from_pb(m) for m in msg.approvals]

    async def get(self, token: str, approval_id: str) -> ApprovalRecord:
        try:
            msg = await self._stub.Get(apb.GetRequest(token=token, approval_id=approval_id),
                                       timeout=self.deadline)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return record_from_pb(msg)
