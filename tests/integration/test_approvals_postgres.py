"""Approvals across replicas on a real PostgreSQL 15 started for these tests
(initdb in a temporary directory, 127.0.0.1, a free port): a hold waiting in
one store or policyd replica is released by a decision taken through another
(LISTEN/NOTIFY), and a late grant is used exactly once whoever races for it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from pgwarden.devissuer import DevIssuer, ensure_dev_keys
from policyd.approvals.client import ApprovalClient, RemoteApprovals
from policyd.approvals.models import Status, params_digest
from policyd.approvals.service import add_to_server
from policyd.approvals.store import ApprovalStore
from policyd.audit.store import AuditStore
from policyd.audit.writer import AuditWriter
from policyd.identity import TokenValidator
from tap.hooks import Approval, Decision, Identity, SessionInfo, StatementRequest, Verdict

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REQUESTER = Identity(subject="ci-bot", groups=("fraud-readers",))
APPROVER = Identity(subject="bob", groups=("payments-approvers",))
SQL = "SELECT * FROM payments WHERE amount > 10000"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Postgres:
    base: Path
    port: int
    user: str | None

    def run(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, user=self.user, group=self.user,
                       extra_groups=[] if self.user else None)

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    user = "postgres" if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
    base = Path(tempfile.mkdtemp(prefix="pgwarden-approvals-pg-"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    server = Postgres(base, _free_port(), user)
    data = str(base / "data")
    server.run(str(PG_BIN / "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
               "--encoding=UTF8", "--locale=C", "--no-sync")
    server.run(str(PG_BIN / "pg_ctl"), "-D", data, "-w", "-t", "60", "-l", str(base / "pg.log"),
               "-o", f"-c listen_addresses=127.0.0.1 -c port={server.port} "
                     f"-c unix_socket_directories={base} -c fsync=off", "start")
    try:
        yield server
    finally:
        try:
            server.run(str(PG_BIN / "pg_ctl"), "-D", data, "-w", "-m", "fast", "stop")
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _create(store: ApprovalStore, hold: float = 600.0, params: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    return store.create(identity=REQUESTER, sql=SQL, params_digest=params_digest(params),
                        database="shop", fingerprint="fp", reason="big read",
                        approver_groups=("payments-approvers",), hold_seconds=hold)


async def test_wait_in_one_store_released_by_decide_in_another(pg: Postgres) -> None:
    url = pg.create_db("stores")
    # Re-reads only every 10 minutes: within the test only a NOTIFY can wake the waiter.
    a = ApprovalStore(url, recheck_interval=600)
    b = ApprovalStore(url, recheck_interval=600)
    try:
        assert a.notifies and b.notifies
        for approve, want in ((True, Status.APPROVED), (False, Status.DENIED)):
            rec = await asyncio.to_thread(_create, a)
            heard = a.notifications_received
            waiter = asyncio.create_task(a.wait(rec.approval_id, 120))
            while rec.approval_id not in a._waiters:  # listening and registered
                await asyncio.sleep(0.01)
            done = await asyncio.to_thread(b.decide, rec.approval_id, APPROVER, approve, "ok")
            assert done.status is want
            released = await waiter
            assert released.status is want and released.approver == "bob"
            assert a.notifications_received > heard
    finally:
        await a.aclose()
        await b.aclose()


def test_late_grant_race_has_one_winner(pg: Postgres) -> None:
    url = pg.create_db("race")
    stores = [ApprovalStore(url) for _ in range(4)]
    try:
        rec = _create(stores[0], hold=0)
        stores[0].expire(rec.approval_id)
        assert stores[1].decide(rec.approval_id, APPROVER, True, "late").late_grant
        wins: list[object] = []
        barrier = threading.Barrier(len(stores))

        def race(store: ApprovalStore) -> None:
            barrier.wait()
            got = store.consume_late_grant("ci-bot", "fp", params_digest(()), "shop",
                                           statement_digest=rec.statement_digest)
            if got is not None:
                wins.append(got)

        threads = [threading.Thread(target=race, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert stores[2].get(rec.approval_id).status is Status.SPENT  # type: ignore[union-attr]
    finally:
        for s in stores:
            s.close()


# --------------------------------------------------------------------------- two policyd


@contextlib.asynccontextmanager
async def replica(url: str, tmp: Path, issuer: DevIssuer,
                  name: str) -> AsyncIterator[tuple[str, AuditWriter]]:
    store = ApprovalStore(url, recheck_interval=600)
    writer = AuditWriter(url, tmp / f"{name}-spool.jsonl", signing_key=tmp / f"{name}.key",
                         checkpoint_file=tmp / f"{name}-cp.jsonl", writer_id=name).start()
    server = grpc.aio.server()
    add_to_server(server, store, writer, TokenValidator(issuer.identity_settings()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", writer
    finally:
        await server.stop(0)
        writer.close()
        await store.aclose()


def _request(params: tuple[str | None, ...] = ("10000",)) -> StatementRequest:
    return StatementRequest(identity=REQUESTER, session=SessionInfo(session_id="s-1",
                                                                    database="shop"),
                            sql=SQL, params=params)


def _held(hold: float) -> Decision:
    return Decision(verdict=Verdict.HOLD, decision_id="d",
                    approval=Approval(required=True, reason="amount > 10000",
                                      approver_groups=("payments-approvers",),
                                      hold_seconds=hold),
                    analysis={"fingerprint": "fp"})


async def _pending(url: str) -> str:
    store = ApprovalStore(url)
    try:
        for _ in range(3000):
            found = await asyncio.to_thread(store.list, Status.PENDING)
            if found:
                return found[0].approval_id
            await asyncio.sleep(0.01)
    finally:
        store.close()
    raise AssertionError("no pending request appeared")


async def test_two_policyd_replicas(pg: Postgres, tmp_path: Path) -> None:
    url = pg.create_db("replicas")
    # Migrate the audit store once, as a deployment's migration job does: two
    # writers migrating an empty database at the same moment race in Alembic.
    AuditStore(url).close()
    issuer = ensure_dev_keys(tmp_path / "identity")
    bob = issuer.mint("bob", ["payments-approvers"], kind="human")
    async with replica(url, tmp_path, issuer, "one") as (first, w1), \
            replica(url, tmp_path, issuer, "two") as (second, w2), \
            ApprovalClient(first) as tap, RemoteApprovals(second) as approver:
        # held through the first replica, approved through the second
        task = asyncio.create_task(tap.hold(_request(), _held(300)))
        rid = await _pending(url)
        await approver.decide(bob, rid, True, "FRAUD-9")
        decision = await task
        assert (decision.verdict, decision.approval_id) == (Verdict.ALLOW, rid)

        # expired via the first, approved late via the second, retried via the first
        expired = await tap.hold(_request(("5",)), _held(0.3))
        assert expired.sqlstate == "PW002"
        late = await approver.decide(bob, expired.approval_id, True, "late")
        assert late.late_grant
        retry = await tap.hold(_request(("5",)), _held(0.3))
        assert (retry.verdict, retry.approval_id) == (Verdict.ALLOW, expired.approval_id)

        assert w1.flush(30) and w2.flush(30)
    with AuditStore(url) as st:
        events = [(r.row["approval_id"], r.row["action"]) for r in st.iter_records()
                  if r.table == "audit_approvals"]
    assert events.count((rid, "approved")) == 1
    assert [a for i, a in events if i == expired.approval_id] == [
        "requested", "expired", "approved"]
