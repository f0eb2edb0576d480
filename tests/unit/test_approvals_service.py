"""The approval service end to end on SQLite: the tap's client, gRPC, the CLI,
the HTTP API, the audit trail and the webhook (a tiny local HTTP server)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvicorn
from typer.testing import CliRunner

from pgwarden.devissuer import DevIssuer, ensure_dev_keys
from policyd.approvals.cli import app as approvals_cli
from policyd.approvals.client import ApprovalClient, RemoteApprovals
from policyd.approvals.http import create_app
from policyd.approvals.models import Status
from policyd.approvals.notify import WebhookNotifier, webhook_payload
from policyd.approvals.service import ApprovalService, add_to_server
from policyd.approvals.store import ApprovalStore, NotAnApprover, SelfApproval, Unauthenticated
from policyd.audit.store import AuditStore
from policyd.audit.writer import AuditWriter
from policyd.identity import TokenValidator
from tap.hooks import Approval, Decision, Identity, SessionInfo, StatementRequest, Verdict

PAN = "4111111111111111"
SQL = "SELECT * FROM payments WHERE amount > 10000"


# --------------------------------------------------------------------------- webhook sink


@dataclass
class Hook:
    url: str
    bodies: list[bytes] = field(default_factory=list)
    fail_first: int = 0
    attempts: int = 0


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.attempts += 1
            if state.attempts <= state.fail_first:
                self.send_response(503)
                self.end_headers()
                return
            state.bodies.append(body)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the service


@dataclass
class Env:
    issuer: DevIssuer
    store: ApprovalStore
    writer: AuditWriter
    servicer: ApprovalService
    notifier: WebhookNotifier
    target: str
    audit_url: str

    def token(self, sub: str, groups: tuple[str, ...] = ("payments-approvers",),
              act: str | None = None) -> str:
        return self.issuer.mint(sub, list(groups), act=act, kind="human")

    def approval_events(self) -> list[dict[str, Any]]:
        assert self.writer.flush(30)
        with AuditStore(self.audit_url) as st:
            return [r.row for r in st.iter_records() if r.table == "audit_approvals"]


@contextlib.asynccontextmanager
async def running(tmp: Path, hook: Hook) -> AsyncIterator[Env]:
    issuer = ensure_dev_keys(tmp / "identity")
    url = f"sqlite:///{tmp / 'audit.db'}"
    store = ApprovalStore(url, poll_interval=0.02)
    writer = AuditWriter(url, tmp / "spool.jsonl", signing_key=tmp / "key",
                         checkpoint_file=tmp / "cp.jsonl").start()
    notifier = WebhookNotifier(hook.url, base_delay=0.01, max_delay=0.05)
    server = grpc.aio.server()
    servicer = add_to_server(server, store, writer, TokenValidator(issuer.identity_settings()),
                             notifier=notifier)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Env(issuer, store, writer, servicer, notifier, f"127.0.0.1:{port}", url)
    finally:
        await server.stop(0)
        await notifier.aclose()
        writer.close()
        store.close()


def statement(sql: str = SQL, params: tuple[str | None, ...] | None = None,
              subject: str = "ci-bot", actor: str | None = "alice") -> StatementRequest:
    return StatementRequest(
        identity=Identity(subject=subject, groups=("fraud-readers",), actor=actor),
        session=SessionInfo(session_id="sess-1", database="shop"), sql=sql, params=params)


def held(hold: float = 30.0) -> Decision:
    return Decision(verdict=Verdict.HOLD, reasons=("large payment read",), decision_id="d1",
                    approval=Approval(required=True, reason="amount > 10000 needs approval",
                                      approver_groups=("payments-approvers",),
                                      hold_seconds=hold),
                    analysis={"fingerprint": "abc123"})


async def pending_id(env: Env) -> str:
    """The id of the one pending request, once the hold has created it."""
    for _ in range(2000):
        pending = await asyncio.to_thread(env.store.list, Status.PENDING)
        if pending:
            return pending[0].approval_id
        await asyncio.sleep(0.01)
    raise AssertionError("no pending request appeared")


def cli(*args: str, token: str) -> Any:
    return CliRunner().invoke(approvals_cli, list(args), env={"PGWARDEN_TOKEN": token})


# --------------------------------------------------------------------------- tests


async def test_approve_releases_the_hold(tmp_path: Path, hook: Hook) -> None:
    async with running(tmp_path, hook) as env, ApprovalClient(env.target) as client:
        task = asyncio.create_task(client.hold(statement(), held(), statement_seq=3))
        rid = await pending_id(env)
        listed = await asyncio.to_thread(cli, "list", "--policyd", env.target,
                                         token=env.token("bob"))
        assert listed.exit_code == 0 and rid in listed.output and "pending" in listed.output
        shown = await asyncio.to_thread(cli, "show", rid, "--policyd", env.target,
                                        token=env.token("bob"))
        assert shown.exit_code == 0 and SQL in shown.output and "ci-bot (actor alice)" in shown.output
        nobody = await asyncio.to_thread(cli, "list", "--json", "--policyd", env.target,
                                         token=env.token("eve", ("other",)))
        assert json.loads(nobody.output) == {"approvals": []}
        result = await asyncio.to_thread(
            cli, "approve", rid, "--reason", "FRAUD-7", "--policyd", env.target,
            token=env.token("bob"))
        assert result.exit_code == 0, result.output
        decision = await task
        assert decision.verdict is Verdict.ALLOW and decision.approval_id == rid
        assert any("bob" in r and "FRAUD-7" in r for r in decision.reasons)
        events = env.approval_events()
        assert [(e["action"], e["approver"], e["approval_id"], e["statement_seq"])
                for e in events] == [("requested", "", rid, 3), ("approved", "bob", rid, 3)]
        assert events[1]["reason"] == "FRAUD-7"


async def test_deny_is_pw001_with_the_id(tmp_path: Path, hook: Hook) -> None:
    async with running(tmp_path, hook) as env, ApprovalClient(env.target) as client:
        task = asyncio.create_task(client.hold(statement(), held()))
        rid = await pending_id(env)
        async with RemoteApprovals(env.target) as remote:
            await remote.decide(env.token("bob"), rid, False, "not today")
        decision = await task
        assert (decision.verdict, decision.sqlstate, decision.approval_id) == (
            Verdict.DENY, "PW001", rid)
        assert rid in decision.reasons[0] and "not today" in decision.reasons[0]


async def test_expiry_late_approval_one_retry(tmp_path: Path, hook: Hook) -> None:
    async with running(tmp_path, hook) as env, ApprovalClient(env.target) as client:
        first = await client.hold(statement(params=("10000",)), held(hold=0.2))
        rid = first.approval_id
        assert (first.verdict, first.sqlstate) == (Verdict.DENY, "PW002")
        assert f"pgwarden approvals approve {rid}" in first.reasons[0]
        assert "15 minutes" in first.reasons[0]
        result = await asyncio.to_thread(
            cli, "approve", rid, "--reason", "late ok", "--policyd", env.target,
            token=env.token("bob"))
        assert result.exit_code == 0 and "retry" in result.output, result.output
        # a different parameter value is not the approved statement
        other = await client.hold(statement(params=("1",)), held(hold=0.2))
        assert other.sqlstate == "PW002" and other.approval_id != rid
        retry = await client.hold(statement(params=("10000",)), held(hold=0.2))
        assert (retry.verdict, retry.approval_id) == (Verdict.ALLOW, rid)
        again = await client.hold(statement(params=("10000",)), held(hold=0.2))
        assert again.sqlstate == "PW002" and again.approval_id not in (rid, "")
        assert env.store.get(rid).status is Status.SPENT  # type: ignore[union-attr]
        actions = [e["action"] for e in env.approval_events() if e["approval_id"] == rid]
        assert actions == ["requested", "expired", "approved"]


async def test_self_actor_and_non_approver_refused(tmp_path: Path, hook: Hook) -> None:
    async with running(tmp_path, hook) as env, ApprovalClient(env.target) as client:
        task = asyncio.create_task(client.hold(statement(), held()))
        rid = await pending_id(env)
        async with RemoteApprovals(env.target) as remote:
            with pytest.raises(SelfApproval):
                await remote.decide(env.token("ci-bot"), rid, True, "mine")
            with pytest.raises(SelfApproval):  # alice is in the requester's actor chain
                await remote.decide(env.token("alice"), rid, True, "on my behalf")
            with pytest.raises(NotAnApprover):
                await remote.decide(env.token("eve", ("fraud-readers",)), rid, True, "x")
            with pytest.raises(Unauthenticated):
                await remote.decide("not.a.token", rid, True, "x")
        self_cli = await asyncio.to_thread(
            cli, "approve", rid, "--reason", "x", "--policyd", env.target,
            token=env.token("ci-bot"))
        assert self_cli.exit_code == 1 and "refused" in self_cli.output
        assert not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_cancel_marks_the_request_cancelled(tmp_path: Path, hook: Hook) -> None:
    async with running(tmp_path, hook) as env, ApprovalClient(env.target) as client:
        cancel = asyncio.Event()
        task = asyncio.create_task(client.hold(statement(), held(), cancel=cancel))
        rid = await pending_id(env)
        cancel.set()
        decision = await task
        assert (decision.sqlstate, decision.approval_id) == ("PW003", rid)
        assert env.store.get(rid).status is Status.CANCELLED  # type: ignore[union-attr]
        # the task of a tap that simply goes away
        task = asyncio.create_task(client.hold(statement(sql="SELECT 2"), held()))
        rid2 = await pending_id(env)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(2000):
            if env.store.get(rid2).status is Status.CANCELLED:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.01)
        assert env.store.get(rid2).status is Status.CANCELLED  # type: ignore[union-attr]
        for _ in range(2000):  # the event follows the status change
            actions = [e["action"] for e in env.approval_events()]
            if actions.count("cancelled") == 2:
                break
            await asyncio.sleep(0.01)
        assert actions.count("cancelled") == 2


async def test_unreachable_service_fails_closed() -> None:
    async with ApprovalClient("127.0.0.1:1") as client:
        decision = await client.hold(statement(), held())
    assert decision.verdict is Verdict.DENY and decision.sqlstate == "58000"
    assert "approval service unavailable" in decision.reasons[0]


async def test_http_api(tmp_path: Path, hook: Hook) -> None:
    async with running(tmp_path, hook) as env, ApprovalClient(env.target) as client:
        config = uvicorn.Config(create_app(env.servicer.manager), host="127.0.0.1", port=0,
                                log_level="warning")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}/approvals"

        def call(method: str, path: str, token: str | None,
                 body: dict[str, Any] | None = None) -> tuple[int, Any]:
            req = urllib.request.Request(base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode())
            req.add_header("Content-Type", "application/json")
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(req) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        try:
            task = asyncio.create_task(client.hold(statement(sql=f"SELECT '{PAN}'"), held()))
            rid = await pending_id(env)
            bob, mallory = env.token("bob"), env.token("ci-bot")
            status, body = await asyncio.to_thread(call, "GET", "", None)
            assert status == 401 and body["code"] == "Unauthenticated"
            status, body = await asyncio.to_thread(call, "GET", "?status=pending", bob)
            assert status == 200 and [a["approval_id"] for a in body["approvals"]] == [rid]
            assert PAN not in json.dumps(body)
            status, body = await asyncio.to_thread(call, "GET", f"/{rid}", bob)
            assert status == 200 and body["status"] == "pending"
            status, body = await asyncio.to_thread(call, "GET", "/ap_aaaaaaaaaaaa", bob)
            assert status == 404
            status, body = await asyncio.to_thread(call, "POST", f"/{rid}/approve", mallory,
                                                   {"reason": "me"})
            assert status == 403 and body["code"] == "SelfApproval"
            status, body = await asyncio.to_thread(call, "POST", f"/{rid}/approve", bob, {})
            assert status == 422
            status, body = await asyncio.to_thread(call, "POST", f"/{rid}/approve", bob,
                                                   {"reason": PAN * 200})
            assert status == 422 and PAN not in json.dumps(body)
            status, body = await asyncio.to_thread(call, "GET", f"/{PAN}", bob)
            assert status == 404 and PAN not in json.dumps(body)
            status, body = await asyncio.to_thread(call, "POST", f"/{rid}/deny", bob,
                                                   {"reason": "no"})
            assert status == 200 and body["status"] == "denied" and body["approver"] == "bob"
            status, body = await asyncio.to_thread(call, "POST", f"/{rid}/approve", bob,
                                                   {"reason": "changed"})
            assert status == 409
            assert (await task).sqlstate == "PW001"
        finally:
            server.should_exit = True
            await serving


async def test_webhook_payload_has_no_pan_or_token(tmp_path: Path, hook: Hook) -> None:
    hook.fail_first = 1  # the first delivery is retried
    async with running(tmp_path, hook) as env, ApprovalClient(env.target) as client:
        token = env.token("bob")
        task = asyncio.create_task(
            client.hold(statement(sql=f"SELECT * FROM payments WHERE pan = '{PAN}'",
                                  params=(PAN,)), held()))
        rid = await pending_id(env)
        async with RemoteApprovals(env.target) as remote:
            await remote.decide(token, rid, True, f"card {PAN} checked")
        assert (await task).verdict is Verdict.ALLOW
        await env.notifier.drain()
    payloads = [json.loads(b) for b in hook.bodies]
    assert [p["event"] for p in payloads] == ["approval.requested", "approval.approved"]
    assert hook.attempts == 3
    assert rid in payloads[0]["text"] and "pgwarden approvals approve" in payloads[0]["text"]
    assert "1111" in payloads[0]["approval"]["statement"]
    for raw in hook.bodies:
        text = raw.decode()
        assert PAN not in text
        for part in token.split("."):
            assert part not in text


def test_payload_shape() -> None:
    from policyd.approvals.models import ApprovalRecord

    rec = ApprovalRecord(
        approval_id="ap_abcdefghijkl", status=Status.PENDING, subject="ci-bot", actor=None,
        groups=(), database="shop", session_id="s", statement_seq=None,
        statement=f"SELECT '{PAN}'", statement_digest="d", fingerprint="f", params_digest="p",
        reason="r", approver_groups=("a",), decision_id="", created_at=0.0, expires_at=60.0,
        late_grant_until=960.0, late_grant=False, approver="", approver_reason="",
        decided_at=None)
    payload = webhook_payload("requested", rec)
    assert set(payload) == {"text", "event", "approval"}
    assert PAN not in json.dumps(payload)
