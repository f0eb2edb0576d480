"""Where approval requests live and how a held statement learns it may run.

:class:`ApprovalStore` keeps the requests in the audit store's database (the
same URL; SQLite locally, PostgreSQL in production) in its own two tables.
Every change of status is one conditional ``UPDATE ... WHERE status = <the
status we read>``, so two replicas racing (a hold timing out while an
approver clicks, two approvers at once) never both win: exactly one change
lands and the loser sees the winner's result.

Waking a held statement:

* **PostgreSQL**: every change sends ``NOTIFY pgwarden_approvals, '<id>'`` in
  its own transaction (delivered on commit). Each store keeps one ``LISTEN``
  connection per event loop, so an approval given through *any* policyd
  replica releases a hold waiting in another. Waiters still re-read every
  ``recheck_interval`` seconds, and after a reconnect, so a lost listen
  connection delays a release but never loses it.
* **SQLite**: one replica only; :meth:`ApprovalStore.wait` polls every
  ``poll_interval`` seconds.

Authorisation lives here, not in the transports, so the CLI, the HTTP API and
any future path apply the same rules: nobody approves their own request or
one of their own actor chain (:class:`SelfApproval`), only members of the
request's approver groups decide (:class:`NotAnApprover`; a request with no
approver groups cannot be approved by anyone: fail closed).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import structlog
from sqlalchemy import Engine, Table, insert, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlmodel import SQLModel

from maskd.detect import scrub
from policyd.approvals.models import (
    ApprovalAction,
    ApprovalRecord,
    ApprovalRow,
    Status,
    is_approval_id,
    new_approval_id,
    statement_digest,
)
from policyd.audit.store import make_engine, store_url
from tap.hooks import Identity

__all__ = [
    "DEFAULT_LATE_GRANT_SECONDS",
    "NOTIFY_CHANNEL",
    "ApprovalError",
    "ApprovalNotFound",
    "ApprovalStore",
    "InvalidRequest",
    "NotAnApprover",
    "NotPending",
    "SelfApproval",
    "Unauthenticated",
]

log = structlog.get_logger("pgwarden.approvals.store")

NOTIFY_CHANNEL = "pgwarden_approvals"
DEFAULT_LATE_GRANT_SECONDS = 900.0  # 15 minutes
# A pending request this long past the end of its hold has lost its holder
# (replica crash): an approval of it becomes a late grant.
OVERDUE_GRACE_SECONDS = 5.0
_ADVISORY_LOCK = 0x7067_7761_7070  # "pgwapp": serialises create_all across replicas
_MAX_TEXT = 64 * 1024


class ApprovalError(Exception):
    """Base of the refusals below; ``str()`` is safe to show the approver."""


class ApprovalNotFound(ApprovalError):
    pass


class SelfApproval(ApprovalError):
    pass


class NotAnApprover(ApprovalError):
    pass


class NotPending(ApprovalError):
    pass


class Unauthenticated(ApprovalError):
    """The approver's token was refused (the reason code, never the token)."""


class InvalidRequest(ApprovalError):
    pass


def _requests() -> Table:
    table = ApprovalRow.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


def _actions() -> Table:
    table = ApprovalAction.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


def _chain(subject: str, actor: str | None) -> set[str]:
    return {subject, *(a for a in (actor or "").split("<-") if a)}


def _clean(value: str, limit: int = _MAX_TEXT) -> str:
    """PANs redacted (PCI DSS 3.5.1: this table is a store too), bounded size."""
    value = scrub(value)
    return value if len(value) <= limit else value[:limit] + "…"


def _libpq_url(url: str) -> str:
    sa = make_url(url)
    return sa.set(drivername="postgresql").render_as_string(hide_password=False)


class ApprovalStore:
    """Approval requests in the audit database. Thread-safe (SQLAlchemy pool);
    the blocking methods are meant for a worker thread when called from an
    event loop, :meth:`wait` is the asynchronous one.

    ``clock`` gives wall-clock epoch seconds (injectable so tests can move
    past a late-grant window without sleeping).
    """

    def __init__(self, url: str | None = None, *,
                 late_grant_seconds: float = DEFAULT_LATE_GRANT_SECONDS,
                 poll_interval: float = 0.2, recheck_interval: float = 5.0,
                 clock: Callable[[], float] = time.time, create_tables: bool = True) -> None:
        self.url = store_url(url)
        self.engine: Engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name
        self.late_grant_seconds = late_grant_seconds
        self.poll_interval = poll_interval
        self.recheck_interval = recheck_interval
        self.clock = clock
        self.notifications_received = 0  # for health checks and tests
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listener_loop: asyncio.AbstractEventLoop | None = None
        self._listening = asyncio.Event()
        if create_tables:
            self.create_tables()

    @property
    def notifies(self) -> bool:
        """True when holds are released by LISTEN/NOTIFY (PostgreSQL)."""
        return self.dialect == "postgresql"

    def create_tables(self) -> None:
        """Create the two tables if absent (idempotent, safe from several
        replicas at once: PostgreSQL serialises it with an advisory lock)."""
        with self.engine.begin() as conn:
            if self.notifies:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
            SQLModel.metadata.create_all(conn, tables=[_requests(), _actions()])

    # -- reads -----------------------------------------------------------------

    def get(self, approval_id: str) -> ApprovalRecord | None:
        if not is_approval_id(approval_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(_requests()).where(
                _requests().c.approval_id == approval_id)).mappings().first()
        return None if row is None else ApprovalRecord.from_mapping(row)

    def list(self, status: Status | str | None = None, limit: int = 100, *,
             visible_to: Identity | None = None) -> list[ApprovalRecord]:
        """Newest first. ``visible_to``: only requests that identity made or
        may decide (what an approver's console should show)."""
        t = _requests()
        query = select(t).order_by(t.c.created_at.desc())
        if status:
            query = query.where(t.c.status == Status(status).value)
        if visible_to is None:
            query = query.limit(max(1, limit))
        out: list[ApprovalRecord] = []
        with self.engine.connect() as conn:
            for row in conn.execute(query).mappings():
                rec = ApprovalRecord.from_mapping(row)
                if visible_to is not None and not (
                        rec.subject == visible_to.subject
                        or set(visible_to.groups) & set(rec.approver_groups)):
                    continue
                out.append(rec)
                if len(out) >= limit:
                    break
        return out

    def actions(self, approval_id: str) -> builtins.list[dict[str, Any]]:
        """The history of one request, oldest first."""
        a = _actions()
        with self.engine.connect() as conn:
            rows = conn.execute(select(a).where(a.c.approval_id == approval_id)
                                .order_by(a.c.id)).mappings().all()
        return [dict(r) for r in rows]

    # -- changes ---------------------------------------------------------------

    def create(self, *, identity: Identity, sql: str, params_digest: str,
               database: str = "", session_id: str = "", fingerprint: str = "",
               reason: str = "", approver_groups: Sequence[str] = (),
               hold_seconds: float = 60.0, decision_id: str = "",
               statement_seq: int | None = None,
               approval_id: str | None = None) -> ApprovalRecord:
        """A new pending request. The SQL is stored with PANs redacted; its
        exact-text digest is kept so only the identical statement is released."""
        now = self.clock()
        approval_id = approval_id or new_approval_id()
        if not is_approval_id(approval_id):
            raise ValueError("approval id must be 'ap_' followed by 12 base32 characters")
        values: dict[str, Any] = {
            "approval_id": approval_id, "status": Status.PENDING.value,
            "subject": identity.subject, "actor": identity.actor,
            "groups": list(identity.groups), "database": database,
            "session_id": session_id, "statement_seq": statement_seq,
            "statement": _clean(sql), "statement_digest": statement_digest(sql),
            "fingerprint": fingerprint, "params_digest": params_digest,
            "reason": _clean(reason, 2048), "approver_groups": list(approver_groups),
            "decision_id": decision_id, "created_at": now,
            "expires_at": now + max(0.0, hold_seconds),
            "late_grant_until": now + max(0.0, hold_seconds) + self.late_grant_seconds,
            "late_grant": False, "approver": "", "approver_reason": "", "decided_at": None,
        }
        with self.engine.begin() as conn:
            conn.execute(insert(_requests()).values(**values))
            self._action(conn, approval_id, "requested", identity.subject, values["reason"], now)
        return ApprovalRecord.from_mapping(values)

    def decide(self, approval_id: str, approver: Identity, approve: bool,
               reason: str) -> ApprovalRecord:
        """Record an approver's decision.

        Pending → approved/denied. Expired (the hold gave up) and still within
        the late window → approved as a *late grant* (one identical retry by
        the same identity) or denied. Anything else raises :class:`NotPending`.
        """
        with self.engine.begin() as conn:
            rec = self._locked(conn, approval_id)
            if _chain(approver.subject, approver.actor) & _chain(rec.subject, rec.actor):
                raise SelfApproval(
                    f"{approver.subject} may not decide {approval_id}: it was requested by "
                    "the same identity or its actor chain; another approver must decide")
            if not set(approver.groups) & set(rec.approver_groups):
                wanted = ", ".join(rec.approver_groups) or "none configured"
                raise NotAnApprover(
                    f"{approver.subject} is not in an approver group of {approval_id} "
                    f"(approver groups: {wanted})")
            now = self.clock()
            status = rec.status
            overdue = status is Status.PENDING and now > rec.expires_at + OVERDUE_GRACE_SECONDS
            if status is Status.PENDING and not overdue:
                late = False
            elif status in (Status.PENDING, Status.EXPIRED) and now < rec.late_grant_until:
                late = True
            else:
                raise NotPending(self._not_pending(rec, now))
            new_status = Status.APPROVED if approve else Status.DENIED
            clean_reason = _clean(reason, 2048)
            changed = self._transition(conn, approval_id, status, new_status, {
                "approver": approver.subject, "approver_reason": clean_reason,
                "decided_at": now, "late_grant": late and approve,
            })
            if not changed:
                raise NotPending(f"{approval_id} changed meanwhile; show it again")
            if late and status is Status.PENDING:
                self._action(conn, approval_id, "expired", "policyd", "hold ended unanswered", now)
            self._action(conn, approval_id, new_status.value, approver.subject, clean_reason, now)
            return self._read(conn, approval_id)

    def expire(self, approval_id: str) -> ApprovalRecord:
        """The hold is over without a decision: pending → expired. Returns the
        record as it is afterwards (already decided: unchanged)."""
        return self.close_pending(approval_id, Status.EXPIRED, "hold ended unanswered")[0]

    def cancel(self, approval_id: str, reason: str = "client cancelled") -> ApprovalRecord:
        """The client gave up (cancel, disconnect): pending → cancelled."""
        return self.close_pending(approval_id, Status.CANCELLED, reason)[0]

    def close_pending(self, approval_id: str, new: Status,
                      reason: str) -> tuple[ApprovalRecord, bool]:
        """Pending → ``new`` (expired or cancelled); the record afterwards and
        whether this call made the change (so it is audited exactly once)."""
        now = self.clock()
        with self.engine.begin() as conn:
            self._locked(conn, approval_id)
            changed = self._transition(conn, approval_id, Status.PENDING, new, {})
            if changed:
                self._action(conn, approval_id, new.value, "policyd", reason, now)
            return self._read(conn, approval_id), changed

    def expire_overdue(self) -> builtins.list[ApprovalRecord]:
        """Expire pending requests whose holder is gone (a crashed replica)."""
        t = _requests()
        cutoff = self.clock() - OVERDUE_GRACE_SECONDS
        with self.engine.connect() as conn:
            ids = conn.execute(select(t.c.approval_id).where(
                t.c.status == Status.PENDING.value, t.c.expires_at < cutoff)).scalars().all()
        done: builtins.list[ApprovalRecord] = []
        for approval_id in ids:
            rec, changed = self.close_pending(approval_id, Status.EXPIRED,
                                              "holder gone; hold ended unanswered")
            if changed:
                done.append(rec)
        return done

    def consume_late_grant(self, subject: str, fingerprint: str, params_digest: str,
                           database: str, *,
                           statement_digest: str | None = None) -> ApprovalRecord | None:
        """Use a late grant for a retry: the same subject, database, statement
        (fingerprint, and exact text when ``statement_digest`` is given) and
        parameters, within the window. At most one caller ever gets a given
        grant; it is 'spent' afterwards."""
        t = _requests()
        now = self.clock()
        query = select(t).where(
            t.c.status == Status.APPROVED.value, t.c.late_grant.is_(True),
            t.c.subject == subject, t.c.fingerprint == fingerprint,
            t.c.params_digest == params_digest, t.c.database == database,
            t.c.late_grant_until > now,
        ).order_by(t.c.decided_at)
        if statement_digest is not None:
            query = query.where(t.c.statement_digest == statement_digest)
        with self.engine.begin() as conn:
            for row in conn.execute(query).mappings().all():
                rec = ApprovalRecord.from_mapping(row)
                if self._transition(conn, rec.approval_id, Status.APPROVED, Status.SPENT, {}):
                    self._action(conn, rec.approval_id, "spent", subject,
                                 "late grant used by a retry", now)
                    return self._read(conn, rec.approval_id)
        return None

    # -- waiting ---------------------------------------------------------------

    async def wait(self, approval_id: str, timeout: float) -> ApprovalRecord:
        """The record once it is no longer pending, or as it is after
        ``timeout`` seconds (still pending: the caller decides to expire it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        event = asyncio.Event()
        if self.notifies:
            await self._ensure_listener()
            self._waiters.setdefault(approval_id, set()).add(event)
        try:
            while True:
                rec = await asyncio.to_thread(self.get, approval_id)
                if rec is None:
                    raise ApprovalNotFound(f"no approval request {approval_id}")
                remaining = deadline - loop.time()
                if rec.status is not Status.PENDING or remaining <= 0:
                    return rec
                if self.notifies:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(),
                                               min(remaining, self.recheck_interval))
                    event.clear()
                else:
                    await asyncio.sleep(min(remaining, self.poll_interval))
        finally:
            waiters = self._waiters.get(approval_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[approval_id]

    async def _ensure_listener(self) -> None:
        loop = asyncio.get_running_loop()
        if self._listener is None or self._listener.done() or self._listener_loop is not loop:
            self._listening = asyncio.Event()
            self._listener_loop = loop
            self._listener = loop.create_task(self._listen(), name="approvals-listen")
        # Waiting is correct without it (rechecks), only slower: do not block long.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), 5.0)

    async def _listen(self) -> None:
        backoff = 0.1
        conninfo = _libpq_url(self.url)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._listening.set()
                    backoff = 0.1
                    self._wake_all()  # whatever changed while we were not listening
                    async for note in conn.notifies():
                        self.notifications_received += 1
                        for event in self._waiters.get(note.payload, ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the class only: messages can echo the DSN
                log.warning("approvals_listen_lost", error=type(exc).__name__)
            self._listening.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def aclose(self) -> None:
        """Stop listening (call from the loop that waited) and release the pool."""
        task, self._listener = self._listener, None
        if task is not None and self._listener_loop is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.engine.dispose()

    def close(self) -> None:
        """Synchronous close, from any thread (the listener is cancelled in
        its own loop)."""
        task, loop = self._listener, self._listener_loop
        self._listener = None
        if task is not None and not task.done() and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        self.engine.dispose()

    # -- internals -------------------------------------------------------------

    def _read(self, conn: Connection, approval_id: str) -> ApprovalRecord:
        row = conn.execute(select(_requests()).where(
            _requests().c.approval_id == approval_id)).mappings().first()
        if row is None:
            raise ApprovalNotFound(f"no approval request {approval_id}")
        return ApprovalRecord.from_mapping(row)

    def _locked(self, conn: Connection, approval_id: str) -> ApprovalRecord:
        if not is_approval_id(approval_id):  # not echoed: it is whatever was typed
            raise ApprovalNotFound("no approval request with that id "
                                   "(ids are 'ap_' and 12 letters or digits)")
        query = select(_requests()).where(_requests().c.approval_id == approval_id)
        if self.notifies:
            query = query.with_for_update()
        row = conn.execute(query).mappings().first()
        if row is None:
            raise ApprovalNotFound(f"no approval request {approval_id}")
        return ApprovalRecord.from_mapping(row)

    def _transition(self, conn: Connection, approval_id: str, old: Status, new: Status,
                    values: dict[str, Any]) -> bool:
        t = _requests()
        result = conn.execute(update(t).where(
            t.c.approval_id == approval_id, t.c.status == old.value,
        ).values(status=new.value, **values))
        if result.rowcount != 1:
            return False
        if self.notifies:  # delivered at commit, to every replica listening
            conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": NOTIFY_CHANNEL, "p": approval_id})
        return True

    @staticmethod
    def _action(conn: Connection, approval_id: str, action: str, actor: str, reason: str,
                at: float) -> None:
        conn.execute(insert(_actions()).values(approval_id=approval_id, action=action,
                                               actor=actor, reason=reason, at=at))

    @staticmethod
    def _not_pending(rec: ApprovalRecord, now: float) -> str:
        if rec.status is Status.EXPIRED or (rec.status is Status.PENDING):
            return (f"{rec.approval_id} expired and its late-approval window has closed; "
                    "the requester must run the statement again for a new request")
        who = f" by {rec.approver}" if rec.approver else ""
        return f"{rec.approval_id} is already {rec.status.value}{who}"
