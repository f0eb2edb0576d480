"""The tap's series that docs/metrics.md alerts on move when their event
happens: a statement refused because the decision point did not answer,
a statement held for approval, and how each hold ended."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from policyd import decision as dec
from tap.hooks import Approval, Decision, Identity, SessionInfo, StatementRequest, Verdict
from tap.runtime import Runtime

REQUEST = StatementRequest(identity=Identity(subject="bot", groups=("fraud-readers",)),
                           session=SessionInfo(session_id="s1", database="shop",
                                               upstream_role="fraud_reader"),
                           sql="SELECT * FROM payments WHERE amount > 10000")
HOLD = Decision(verdict=Verdict.HOLD, reasons=("large amounts need approval",),
                approval=Approval(required=True, reason="large amounts",
                                  approver_groups=("approvers",)))


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def returning(decision: Decision):  # type: ignore[no-untyped-def]
    async def decider(request: StatementRequest) -> Decision:
        return decision
    return decider


async def test_refusals_for_an_unanswered_decision_are_counted_and_policy_denials_are_not(
) -> None:
    before = value("pgwarden_policy_unavailable_total")
    down = Runtime(decider=returning(dec.deny("policy service unavailable (unavailable)",
                                              sqlstate=dec.UNAVAILABLE_SQLSTATE)))
    assert (await down.decide(REQUEST)).sqlstate == "58000"
    assert value("pgwarden_policy_unavailable_total") == before + 1
    refused = Runtime(decider=returning(dec.deny("writes are not allowed")))
    assert (await refused.decide(REQUEST)).verdict is Verdict.DENY
    assert value("pgwarden_policy_unavailable_total") == before + 1


class Approvals:
    """Stands in for policyd's approval client (our own gRPC client, tested
    against the real service elsewhere): answers each hold with ``outcome``
    once ``release`` is set."""

    def __init__(self, outcome: Decision | Exception) -> None:
        self.outcome = outcome
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    async def hold(self, request: StatementRequest, decision: Decision) -> Decision:
        self.waiting.set()
        await self.release.wait()
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize(("outcome", "label"), [
    (replace(HOLD, verdict=Verdict.ALLOW, approval_id="a1"), "approved"),
    (replace(HOLD, verdict=Verdict.DENY, sqlstate="PW001"), "rejected"),
    (replace(HOLD, verdict=Verdict.DENY, sqlstate="PW002"), "expired"),
    (replace(HOLD, verdict=Verdict.DENY, sqlstate="PW003"), "cancelled"),
    (replace(HOLD, verdict=Verdict.DENY, sqlstate="58000"), "unavailable"),
    (ConnectionError("approval service gone"), "unavailable"),
])
async def test_a_held_statement_is_pending_until_its_outcome_is_counted(
        outcome: Decision | Exception, label: str) -> None:
    approvals = Approvals(outcome)
    runtime = Runtime(decider=returning(HOLD), approvals=approvals)
    pending = value("pgwarden_approvals_pending")
    resolved = value("pgwarden_approvals_resolved_total", outcome=label)
    task = asyncio.ensure_future(runtime.decide(REQUEST))
    await asyncio.wait_for(approvals.waiting.wait(), 5)
    assert value("pgwarden_approvals_pending") == pending + 1
    approvals.release.set()
    final = await asyncio.wait_for(task, 5)
    assert final.verdict is (Verdict.ALLOW if label == "approved" else Verdict.DENY)
    assert value("pgwarden_approvals_pending") == pending
    assert value("pgwarden_approvals_resolved_total", outcome=label) == resolved + 1


async def test_a_hold_abandoned_by_its_client_counts_as_cancelled() -> None:
    approvals = Approvals(replace(HOLD, verdict=Verdict.ALLOW))
    runtime = Runtime(decider=returning(HOLD), approvals=approvals)
    pending = value("pgwarden_approvals_pending")
    cancelled = value("pgwarden_approvals_resolved_total", outcome="cancelled")
    task = asyncio.ensure_future(runtime.decide(REQUEST))
    await asyncio.wait_for(approvals.waiting.wait(), 5)
    task.cancel()  # what the ext_proc driver does on the client's CancelRequest
    with pytest.raises(asyncio.CancelledError):
        await task
    assert value("pgwarden_approvals_pending") == pending
    assert value("pgwarden_approvals_resolved_total", outcome="cancelled") == cancelled + 1
