"""policyd end to end: PolicyClient -> gRPC -> PolicyService -> real OPA.

Each test starts its own OPA (on a copy of rego/ when it edits policies)
and its own policyd; everything is stopped afterwards. Waiting for a
background change (a policy reload, a restart) is a bounded poll of a
condition, never a timing assertion.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opa_client.errors import RegoParseError

from policyd.client import UNAVAILABLE_REASON, PolicyClient
from policyd.decision import UNAVAILABLE_SQLSTATE
from policyd.opa import OpaEngine
from policyd.opa_process import OpaProcess
from policyd.server import SERVICE_NAME, PolicyServer
from tap.hooks import Identity, SessionInfo, StatementRequest, Verdict

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="function")]

ROOT = Path(__file__).resolve().parent.parent.parent
READER = Identity(subject="fraud-bot", groups=("fraud-readers",), issuer="https://idp")
SESSION = SessionInfo(session_id="s-1", database="shop", upstream_role="fraud_reader")


def req(sql: str, identity: Identity = READER,
        params: tuple[str | None, ...] | None = None) -> StatementRequest:
    return StatementRequest(identity=identity, session=SESSION, sql=sql, params=params)


async def until(condition: Callable[[], Awaitable[bool]], what: str, tries: int = 400) -> None:
    for _ in range(tries):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def rego_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "rego"
    shutil.copytree(ROOT / "rego", dest)
    return dest


@pytest.fixture
def opa(rego_copy: Path) -> Iterator[OpaProcess]:
    with OpaProcess(paths=[rego_copy]) as proc:
        yield proc


@asynccontextmanager
async def policyd(opa_url: str, listen: str = "127.0.0.1:0",
                  policy_dir: Path | None = None) -> AsyncIterator[PolicyServer]:
    server = PolicyServer(listen, opa_url, opa_deadline=1.0, revision_interval=0.1,
                          policy_dir=policy_dir)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0)


@asynccontextmanager
async def client(target: str) -> AsyncIterator[PolicyClient]:
    async with PolicyClient(target, deadline=2.0) as c:
        await until(lambda: _true(c.cache.enabled), "the revision stream")
        yield c


async def _true(value: bool) -> bool:
    return value


async def test_decisions_through_grpc(opa: OpaProcess) -> None:
    async with policyd(opa.url) as server, client(server.target) as c:
        allow = await c.decide(req("SELECT id, card_number FROM payments WHERE id = 1"))
        assert allow.verdict is Verdict.ALLOW
        assert allow.policy_revision == server.engine.revision
        assert allow.mask.rules[0].column == "public.payments.card_number"
        assert allow.analysis["commands"] == ["select"]

        hold = await c.decide(req("SELECT * FROM payments WHERE amount > 10000"))
        assert hold.verdict is Verdict.HOLD
        assert hold.approval.required and hold.approval.approver_groups == ("approvers",)

        deny = await c.decide(req("DROP DATABASE shop"))
        assert deny.verdict is Verdict.DENY and deny.sqlstate == "42501"
        assert "DROP DATABASE is always blocked" in deny.reasons


async def test_warm_path_stays_in_process_and_is_keyed_right(opa: OpaProcess) -> None:
    async with policyd(opa.url) as server, client(server.target) as c:
        sql = "SELECT id FROM payments WHERE id = 1"
        first = await c.decide(req(sql))
        again = await c.decide(req(sql))
        assert again is first and c.cache.hits == 1

        # Another group set is another key: a dba decision is not a reader's.
        dba = Identity(subject="fraud-bot", groups=("dba",))
        assert (await c.decide(req(sql, dba))).mask.unmasked
        assert not (await c.decide(req(sql))).mask.unmasked

        # HOLD is never cached.
        held = "SELECT * FROM payments WHERE amount > 10000"
        await c.decide(req(held))
        hits = c.cache.hits
        assert (await c.decide(req(held))).verdict is Verdict.HOLD
        assert c.cache.hits == hits

        # The values of the parameters the policy read are part of the key.
        by_amount = "SELECT id FROM payments WHERE amount = $1"
        small = await c.decide(req(by_amount, params=("5",)))
        large = await c.decide(req(by_amount, params=("20000",)))
        assert small.verdict is Verdict.ALLOW and large.verdict is Verdict.HOLD
        assert (await c.decide(req(by_amount, params=("5",)))) is small


async def test_card_lookups_are_limited_per_identity(rego_copy: Path) -> None:
    """Each lookup of a card by value is a guess; policyd counts the ones
    the policy marks and the policy refuses the one over the budget (3 in
    this copy of the pack). Never cached: the answer depends on the count."""
    rules = rego_copy / "pgwarden_data" / "rules.json"
    data = json.loads(rules.read_text())
    data["rules"]["card_lookups_per_window"] = 3
    rules.write_text(json.dumps(data))
    lookup = "SELECT id FROM payments WHERE card_number = $1"
    guesses = [f"41111111111{n:05d}" for n in range(4)]
    with OpaProcess(paths=[rego_copy]) as opa:
        async with policyd(opa.url) as server, client(server.target) as c:
            answers = [await c.decide(req(lookup, params=(g,))) for g in guesses]
            assert [a.verdict for a in answers] == [Verdict.ALLOW] * 3 + [Verdict.DENY]
            assert any("identity looked up 3 in the last 3600 seconds" in r
                       and "the limit is 3" in r for r in answers[3].reasons), answers[3].reasons
            assert not any(g in r for r in answers[3].reasons for g in guesses)
            # A literal is a lookup too; so is a repeat (nothing is cached).
            literal = await c.decide(req(f"SELECT id FROM payments WHERE card_number = '{guesses[0]}'"))
            assert literal.verdict is Verdict.DENY
            assert (await c.decide(req(lookup, params=(guesses[0],)))).verdict is Verdict.DENY
            assert c.cache.hits == 0
            # Statements that are not lookups, other identities, unmasked groups:
            # not affected.
            assert (await c.decide(req("SELECT id FROM payments WHERE id = 1"))).verdict \
                is Verdict.ALLOW
            other = Identity(subject="another-bot", groups=("fraud-readers",), issuer="https://idp")
            assert (await c.decide(req(lookup, other, params=(guesses[0],)))).verdict \
                is Verdict.ALLOW
            dba = Identity(subject="fraud-bot", groups=("dba",), issuer="https://idp")
            assert (await c.decide(req(lookup, dba, params=(guesses[0],)))).verdict \
                is Verdict.ALLOW
            assert server.service.lookups.count(("https://idp", "fraud-bot")) == 3
            # Every lookup of a message counts: two statements, a UNION ALL.
            many = Identity(subject="many-bot", groups=("fraud-readers",), issuer="https://idp")
            two = "; ".join(f"SELECT id FROM payments WHERE card_number = '{g}'"
                            for g in guesses[:2])
            assert (await c.decide(req(two, many))).verdict is Verdict.ALLOW
            union = (f"SELECT id FROM payments WHERE card_number = '{guesses[2]}' UNION ALL "
                     f"SELECT id FROM payments WHERE card_number = '{guesses[3]}'")
            over = await c.decide(req(union, many))
            assert over.verdict is Verdict.DENY
            assert any("this message looks up 2 card numbers" in r for r in over.reasons)
            assert server.service.lookups.count(("https://idp", "many-bot")) == 2
            # A lookup inside COPY, a cursor or a CTE is a lookup too.
            wrapped = Identity(subject="wrapped-bot", groups=("fraud-readers",),
                               issuer="https://idp")
            inner = f"SELECT id FROM payments WHERE card_number = '{guesses[0]}'"
            for sql in (f"COPY ({inner}) TO STDOUT", f"DECLARE c CURSOR FOR {inner}",
                        f"WITH x AS ({inner}) SELECT * FROM x"):
                assert (await c.decide(req(sql, wrapped))).verdict is Verdict.ALLOW, sql
            assert server.service.lookups.count(("https://idp", "wrapped-bot")) == 3
            assert (await c.decide(req(inner, wrapped))).verdict is Verdict.DENY


async def test_decide_connect(opa: OpaProcess) -> None:
    async with policyd(opa.url) as server, client(server.target) as c:
        ok = await c.decide_connect(READER, "shop")
        assert ok.allowed and ok.upstream_role == "fraud_reader" and ok.policy_revision
        both = Identity(subject="x", groups=("fraud-readers", "dba"))
        assert (await c.decide_connect(both, "shop")).upstream_role == "dba_role"
        approver = Identity(subject="alice", groups=("approvers",), kind="human")
        assert not (await c.decide_connect(approver, "shop")).allowed
        assert not (await c.decide_connect(READER, "postgres")).allowed


@pytest.mark.parametrize("sees_folder", [False, True], ids=["poll-opa", "stat-folder"])
async def test_policy_edit_is_picked_up_without_restart(opa: OpaProcess, rego_copy: Path,
                                                        sees_folder: bool) -> None:
    folder = rego_copy if sees_folder else None
    async with policyd(opa.url, policy_dir=folder) as server, client(server.target) as c:
        sql = "SELECT id FROM payments WHERE id = 1"
        before = await c.decide(req(sql))
        assert before.verdict is Verdict.ALLOW
        assert (await c.decide(req(sql))) is before  # cached

        groups = rego_copy / "pgwarden_data" / "groups.json"
        doc = json.loads(groups.read_text())
        doc["groups"]["fraud-readers"]["databases"] = []
        groups.write_text(json.dumps(doc))

        await until(lambda: _true(c.cache.revision not in ("", before.policy_revision)),
                    "the new revision to reach the tap's cache")
        after = await c.decide(req(sql))
        assert after.verdict is Verdict.DENY
        assert after.policy_revision != before.policy_revision
        assert "not allowed" in after.reasons[0]


async def test_opa_down_fails_closed_and_recovers(opa: OpaProcess) -> None:
    async with policyd(opa.url) as server, client(server.target) as c:
        sql = "SELECT id FROM payments WHERE id = 2"
        assert (await c.decide(req(sql))).verdict is Verdict.ALLOW
        channel = grpc.aio.insecure_channel(server.target)
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            return int(reply.status)

        assert await status() == health_pb2.HealthCheckResponse.SERVING

        opa.stop()
        down = await c.decide(req("SELECT id FROM payments WHERE id = 3"))
        assert down.verdict is Verdict.DENY
        assert down.sqlstate == UNAVAILABLE_SQLSTATE
        assert "policy engine unavailable" in down.reasons[0]
        # policyd reports the outage; the tap stops trusting its cache.
        await until(lambda: _true(not c.cache.enabled), "the cache to switch off")
        assert (await c.decide(req(sql))).verdict is Verdict.DENY

        async def not_serving() -> bool:
            return await status() == health_pb2.HealthCheckResponse.NOT_SERVING

        await until(not_serving, "health to report NOT_SERVING")

        opa.start()  # same port

        async def allowed_again() -> bool:
            return (await c.decide(req(sql))).verdict is Verdict.ALLOW

        await until(allowed_again, "decisions after OPA came back")

        async def serving() -> bool:
            return await status() == health_pb2.HealthCheckResponse.SERVING

        await until(serving, "health to report SERVING again")
        await until(lambda: _true(c.cache.enabled), "the cache to switch back on")
        await channel.close()


async def test_policyd_down_fails_closed_and_recovers(opa: OpaProcess, tmp_path: Path) -> None:
    target = f"unix:{tmp_path / 'policyd.sock'}"
    sql = "SELECT id FROM payments WHERE id = 4"
    async with PolicyClient(target, deadline=2.0) as c:
        async with policyd(opa.url, listen=target):
            assert (tmp_path / "policyd.sock").stat().st_mode & 0o777 == 0o660
            await until(lambda: _true(c.cache.enabled), "the revision stream")
            assert (await c.decide(req(sql))).verdict is Verdict.ALLOW
        # An uncached statement is refused at once; the cache stops answering
        # as soon as the revision stream reports the loss (a few ms later).
        down = await c.decide(req("SELECT id FROM payments WHERE id = 5"))
        assert down.verdict is Verdict.DENY
        assert down.sqlstate == UNAVAILABLE_SQLSTATE
        assert down.reasons[0].startswith(UNAVAILABLE_REASON)
        await until(lambda: _true(not c.cache.enabled), "the cache to switch off")
        assert (await c.decide(req(sql))).verdict is Verdict.DENY

        async with policyd(opa.url, listen=target):
            async def allowed_again() -> bool:
                return (await c.decide(req(sql))).verdict is Verdict.ALLOW

            await until(allowed_again, "decisions after policyd came back")


async def test_policy_upload_is_not_rewritten(opa: OpaProcess) -> None:
    """opa-python-client's v0->v1 rewrite stays off: v0 Rego is refused."""
    # Uploads recompile every module: a generous deadline on a loaded machine.
    engine = OpaEngine(opa.url, deadline=30.0)
    await engine.start()
    try:
        with pytest.raises(RegoParseError):
            await engine.put_policy("legacy", "package legacy\n\nallow { true }\n")
        assert await engine.query("legacy", {}, rule="allow") is None
        before = await engine.refresh_revision()
        await engine.put_policy("modern", "package modern\n\nallow if true\n")
        assert await engine.query("modern", {}, rule="allow") is True
        assert await engine.refresh_revision() != before
        await engine.delete_policy("modern")
    finally:
        await engine.close()


async def test_undefined_decision_is_deny(opa: OpaProcess, rego_copy: Path) -> None:
    # One write (OPA --watch reloads it): the decision rule no longer exists.
    policy = rego_copy / "pgwarden" / "statement.rego"
    policy.write_text(policy.read_text().replace("\ndecision := {", "\nold_decision := {"))
    async with policyd(opa.url) as server:
        async def gone() -> bool:
            return await server.engine.query("pgwarden.statement", {}) is None

        await until(gone, "OPA to drop the statement policy")
        async with client(server.target) as c:
            d = await c.decide(req("SELECT 1"))
            assert d.verdict is Verdict.DENY
            assert "undefined" in d.reasons[0]


async def test_logs_and_decisions_never_hold_a_pan(opa: OpaProcess,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pan = "4111111111111111"
    async with policyd(opa.url) as server, client(server.target) as c:
        for sql in (f"SELEKT {pan}", f"SELECT * FROM payments WHERE card_number = '{pan}'",
                    f"DROP DATABASE shop; SELECT '{pan}'"):
            d = await c.decide(req(sql))
            assert pan not in repr(d)
    out = capsys.readouterr()
    assert pan not in out.out and pan not in out.err


async def test_decisions_are_counted(opa: OpaProcess) -> None:
    from prometheus_client import REGISTRY

    def count(verdict: str) -> float:
        value = REGISTRY.get_sample_value("pgwarden_policyd_decisions_total",
                                          {"verdict": verdict})
        return value or 0.0

    async with policyd(opa.url) as server, client(server.target) as c:
        before = count("deny")
        await c.decide(req("DROP DATABASE shop"))
        assert count("deny") == before + 1


async def test_other_services_can_be_hosted(opa: OpaProcess) -> None:
    hosted: list[object] = []
    server = PolicyServer("127.0.0.1:0", opa.url, extra_services=[hosted.append])
    await server.start()
    try:
        assert hosted == [server.server]
    finally:
        await server.stop(grace=0)
