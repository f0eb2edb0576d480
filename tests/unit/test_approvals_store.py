"""The approval store on SQLite: who may decide, late grants, expiry, waiting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from policyd.approvals.models import Status, is_approval_id, new_approval_id, params_digest
from policyd.approvals.store import (
    ApprovalNotFound,
    ApprovalStore,
    NotAnApprover,
    NotPending,
    SelfApproval,
)
from tap.hooks import Identity

PAN = "4111111111111111"
SQL = "SELECT * FROM payments WHERE amount > 10000"
REQUESTER = Identity(subject="ci-bot", groups=("fraud-readers",), actor="alice<-ops-robot")
APPROVER = Identity(subject="bob", groups=("payments-approvers",), kind="human")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> ApprovalStore:
    return ApprovalStore(f"sqlite:///{tmp_path / 'audit.db'}", clock=clock, poll_interval=0.02)


def create(store: ApprovalStore, sql: str = SQL, params: tuple[str | None, ...] | None = None,
           identity: Identity = REQUESTER, hold: float = 60.0):  # type: ignore[no-untyped-def]
    return store.create(identity=identity, sql=sql, params_digest=params_digest(params),
                        database="shop", session_id="s1", fingerprint="fp1",
                        reason="large payments read", approver_groups=("payments-approvers",),
                        hold_seconds=hold)


def test_ids_are_short_and_unguessable() -> None:
    ids = {new_approval_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_approval_id(i) and len(i) == 15 for i in ids)
    assert not is_approval_id("ap_../../etc")


def test_params_digest_tells_values_apart() -> None:
    forms: list[tuple[str | None, ...] | None] = [None, (), (None,), ("",), ("1",), ("1", None),
                                                  ("1,", ""), ("1", ",")]
    assert len({params_digest(f) for f in forms}) == len(forms)


def test_create_redacts_pan_and_keeps_digests(store: ApprovalStore) -> None:
    rec = create(store, sql=f"SELECT * FROM payments WHERE pan = '{PAN}'", params=(PAN,))
    assert rec.status is Status.PENDING
    assert PAN not in rec.statement and "1111" in rec.statement
    got = store.get(rec.approval_id)
    assert got == rec
    assert PAN not in repr(store.list())
    assert rec.late_grant_until == rec.created_at + 60 + 900


def test_approve_and_deny(store: ApprovalStore) -> None:
    a = create(store)
    done = store.decide(a.approval_id, APPROVER, True, "ticket FRAUD-12")
    assert (done.status, done.approver, done.approver_reason, done.late_grant) == (
        Status.APPROVED, "bob", "ticket FRAUD-12", False)
    with pytest.raises(NotPending):
        store.decide(a.approval_id, APPROVER, False, "changed my mind")
    b = create(store)
    assert store.decide(b.approval_id, APPROVER, False, "no").status is Status.DENIED
    assert [x["action"] for x in store.actions(a.approval_id)] == ["requested", "approved"]


@pytest.mark.parametrize("who", [
    Identity(subject="ci-bot", groups=("payments-approvers",)),          # the requester
    Identity(subject="alice", groups=("payments-approvers",)),           # in its actor chain
    Identity(subject="ops-robot", groups=("payments-approvers",)),       # deeper in the chain
    Identity(subject="tool", groups=("payments-approvers",), actor="alice"),  # alice via a tool
])
def test_self_and_actor_chain_approval_refused(store: ApprovalStore, who: Identity) -> None:
    rec = create(store)
    with pytest.raises(SelfApproval):
        store.decide(rec.approval_id, who, True, "lgtm")
    assert store.get(rec.approval_id).status is Status.PENDING  # type: ignore[union-attr]


def test_non_approver_refused(store: ApprovalStore) -> None:
    rec = create(store)
    with pytest.raises(NotAnApprover):
        store.decide(rec.approval_id, Identity(subject="eve", groups=("fraud-readers",)),
                     True, "lgtm")
    no_groups = store.create(identity=REQUESTER, sql=SQL, params_digest=params_digest(None))
    with pytest.raises(NotAnApprover):  # no approver groups: nobody can approve
        store.decide(no_groups.approval_id, APPROVER, True, "lgtm")


def test_unknown_id(store: ApprovalStore) -> None:
    with pytest.raises(ApprovalNotFound):
        store.decide(new_approval_id(), APPROVER, True, "x")
    assert store.get("nonsense") is None


def test_late_grant_is_consumed_once(store: ApprovalStore, clock: Clock) -> None:
    rec = create(store, params=("10000",))
    assert store.expire(rec.approval_id).status is Status.EXPIRED
    pd = params_digest(("10000",))
    assert store.consume_late_grant("ci-bot", "fp1", pd, "shop") is None  # not approved yet
    clock.now += 300
    late = store.decide(rec.approval_id, APPROVER, True, "late but fine")
    assert (late.status, late.late_grant) == (Status.APPROVED, True)
    # not for another identity, other parameters, another database, another text
    assert store.consume_late_grant("other", "fp1", pd, "shop") is None
    assert store.consume_late_grant("ci-bot", "fp1", params_digest(("1",)), "shop") is None
    assert store.consume_late_grant("ci-bot", "fp1", pd, "other") is None
    assert store.consume_late_grant("ci-bot", "fp1", pd, "shop",
                                    statement_digest="0" * 64) is None
    used = store.consume_late_grant("ci-bot", "fp1", pd, "shop",
                                    statement_digest=rec.statement_digest)
    assert used is not None and used.status is Status.SPENT
    assert store.consume_late_grant("ci-bot", "fp1", pd, "shop") is None  # spent
    assert [x["action"] for x in store.actions(rec.approval_id)] == [
        "requested", "expired", "approved", "spent"]


def test_in_time_approval_is_no_late_grant(store: ApprovalStore) -> None:
    rec = create(store)
    store.decide(rec.approval_id, APPROVER, True, "ok")
    assert store.consume_late_grant("ci-bot", "fp1", params_digest(None), "shop") is None


def test_late_window_closes(store: ApprovalStore, clock: Clock) -> None:
    rec = create(store)
    store.expire(rec.approval_id)
    clock.now += 60 + 900 + 1
    with pytest.raises(NotPending):
        store.decide(rec.approval_id, APPROVER, True, "too late")
    fresh = create(store)
    store.expire(fresh.approval_id)
    store.decide(fresh.approval_id, APPROVER, True, "in time")
    clock.now += 60 + 900 + 1
    assert store.consume_late_grant("ci-bot", "fp1", params_digest(None), "shop") is None


def test_expire_and_cancel_only_pending(store: ApprovalStore) -> None:
    rec = create(store)
    store.decide(rec.approval_id, APPROVER, False, "no")
    assert store.expire(rec.approval_id).status is Status.DENIED
    assert store.cancel(rec.approval_id).status is Status.DENIED
    other = create(store)
    assert store.cancel(other.approval_id).status is Status.CANCELLED
    with pytest.raises(NotPending):
        store.decide(other.approval_id, APPROVER, True, "x")


def test_overdue_pending_becomes_late_grant(store: ApprovalStore, clock: Clock) -> None:
    """A replica that held the statement died: the request is past its hold."""
    rec = create(store, hold=10)
    clock.now += 30
    assert [r.approval_id for r in store.expire_overdue()] == [rec.approval_id]
    assert store.expire_overdue() == []
    crashed = create(store, hold=10)
    clock.now += 30
    assert store.decide(crashed.approval_id, APPROVER, True, "ok").late_grant


def test_list_filters(store: ApprovalStore) -> None:
    a = create(store)
    b = create(store, identity=Identity(subject="nightly", groups=("x",)))
    store.decide(b.approval_id, APPROVER, False, "no")
    assert {r.approval_id for r in store.list()} == {a.approval_id, b.approval_id}
    assert [r.approval_id for r in store.list(status="denied")] == [b.approval_id]
    assert store.list(limit=1)[0].approval_id in {a.approval_id, b.approval_id}
    assert store.list(visible_to=Identity(subject="eve", groups=("nobody",))) == []
    assert [r.approval_id for r in store.list(visible_to=Identity(subject="nightly"))] == [
        b.approval_id]


async def test_wait_polls_sqlite(store: ApprovalStore) -> None:
    rec = create(store)
    waiter = asyncio.create_task(store.wait(rec.approval_id, 30))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await asyncio.to_thread(store.decide, rec.approval_id, APPROVER, True, "go")
    done = await waiter
    assert done.status is Status.APPROVED


async def test_wait_times_out_pending(store: ApprovalStore) -> None:
    rec = create(store)
    assert (await store.wait(rec.approval_id, 0.05)).status is Status.PENDING


def test_settings_build_store_and_notifier(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from policyd.approvals.settings import ApprovalSettings

    settings = ApprovalSettings.model_validate(
        {"late_grant_seconds": 60, "webhook": {"url": "https://hooks.example.invalid/T/B/x"}})
    store = settings.store(f"sqlite:///{tmp_path / 'a.db'}")
    assert store.late_grant_seconds == 60
    notifier = settings.notifier()
    assert notifier is not None and "hooks" not in repr(notifier)
    assert ApprovalSettings().notifier() is None
    with pytest.raises(ValidationError):
        ApprovalSettings.model_validate({"webhook": {"url": "ftp://x.invalid/hook"}})
    store.close()
