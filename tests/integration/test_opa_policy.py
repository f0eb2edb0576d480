"""The evasion corpus against a real OPA running the real rego/ pack.

Each entry of tests/unit/test_policy_corpus.py is analysed, turned into the
policy input and decided by OPA for every group, through the same code
policyd's Decide runs (PolicyService.decide), without the gRPC transport.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from policyd.convert import decision_from_pb, request_to_pb
from policyd.opa import OpaEngine
from policyd.opa_process import OpaProcess
from policyd.server import PolicyService
from tap.hooks import Decision, Identity, SessionInfo, StatementRequest

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parent.parent.parent


def _load_corpus() -> object:
    path = ROOT / "tests" / "unit" / "test_policy_corpus.py"
    spec = importlib.util.spec_from_file_location("pgwarden_policy_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus()
CORPUS = corpus.CORPUS  # type: ignore[attr-defined]
ROLE = {"fraud-readers": "fraud_reader", "payments-writers": "payments_writer",
        "dba": "dba_role", "approvers": ""}


@pytest.fixture(scope="module")
def opa() -> Iterator[OpaProcess]:
    with OpaProcess(paths=[ROOT / "rego"]) as proc:
        yield proc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(opa: OpaProcess) -> AsyncIterator[PolicyService]:
    engine = OpaEngine(opa.url, deadline=5.0)
    await engine.start()
    try:
        yield PolicyService(engine)
    finally:
        await engine.close()


def request(sql: str, group: str, params: tuple[str | None, ...] | None = None,
            search_path: str = '"$user", public') -> StatementRequest:
    return StatementRequest(
        identity=Identity(subject=f"agent-{group}", groups=(group,), issuer="https://idp"),
        session=SessionInfo(session_id="s-1", database="shop", upstream_role=ROLE[group],
                            search_path=search_path),
        sql=sql, params=params)


async def decide(service: PolicyService, req: StatementRequest) -> Decision:
    return decision_from_pb(await service.decide(request_to_pb(req)))


@pytest.mark.parametrize("entry", CORPUS, ids=lambda c: c.id)
async def test_corpus_verdicts(service: PolicyService, entry: object) -> None:
    got = {}
    for group in entry.verdicts:  # type: ignore[attr-defined]
        d = await decide(service, request(entry.sql, group, entry.params,  # type: ignore[attr-defined]
                                          entry.search_path))  # type: ignore[attr-defined]
        got[group] = d.verdict.value
        assert d.policy_revision.startswith("sha256:")
        assert d.reasons, "every decision says why"
    assert got == entry.verdicts  # type: ignore[attr-defined]


async def test_large_amount_read_by_fraud_reader_needs_approval(service: PolicyService) -> None:
    d = await decide(service, request("SELECT * FROM payments WHERE amount > 10000",
                                      "fraud-readers"))
    assert d.verdict.value == "hold"
    assert d.approval.required
    assert d.approval.approver_groups == ("approvers",)
    assert "above 10000" in d.approval.reason
    assert [r.column for r in d.mask.rules] == ["public.payments.card_number"]


async def test_reader_gets_pan_masked_and_derived_columns(service: PolicyService) -> None:
    d = await decide(service, request(
        "SELECT id, card_number, encode(card_number::bytea, 'hex') FROM payments WHERE id = 1",
        "fraud-readers"))
    assert d.verdict.value == "allow"
    assert d.mask.rules[0].column == "public.payments.card_number"
    assert d.mask.rules[0].style == "last4"
    assert d.mask.derived_columns == (2,)
    assert d.mask.scan_content and not d.mask.unmasked


async def test_dba_reads_unmasked_and_is_recorded(service: PolicyService) -> None:
    d = await decide(service, request("SELECT * FROM payments", "dba"))
    assert d.verdict.value == "allow"
    assert d.mask.unmasked
    assert d.record_rows.value == "masked_rows"


async def test_result_limits_come_from_the_groups(service: PolicyService) -> None:
    """rego/pgwarden_data/groups.json: 256 MiB per execution for fraud-readers,
    none for dba; groups add up, so a reader who is also a dba has none."""
    sql = "SELECT id, amount FROM payments WHERE id = 1"
    assert (await decide(service, request(sql, "fraud-readers"))).max_result_bytes == 256 << 20
    assert (await decide(service, request(sql, "dba"))).max_result_bytes is None
    both = request(sql, "fraud-readers")
    both = StatementRequest(identity=Identity(subject="a", groups=("fraud-readers", "dba")),
                            session=both.session, sql=sql)
    assert (await decide(service, both)).max_result_bytes is None


async def test_denials_carry_42501_and_reason(service: PolicyService) -> None:
    d = await decide(service, request("/* x */ dRoP DATABASE shop", "dba"))
    assert d.verdict.value == "deny"
    assert d.sqlstate == "42501"
    assert d.reasons == ("DROP DATABASE is always blocked",)
    assert d.decision_id


async def test_unparseable_reason_never_echoes_a_pan(service: PolicyService) -> None:
    d = await decide(service, request("SELEKT 4111 1111 1111 1111", "dba"))
    assert d.verdict.value == "deny"
    text = repr(d)
    assert "4111 1111 1111 1111" not in text and "4111111111111111" not in text


async def test_wrong_database_denied(service: PolicyService) -> None:
    req = request("SELECT 1", "fraud-readers")
    req = StatementRequest(identity=req.identity, session=SessionInfo(
        session_id="s", database="postgres", upstream_role="fraud_reader"), sql="SELECT 1")
    d = await decide(service, req)
    assert d.verdict.value == "deny"
    assert "postgres" in d.reasons[0]


async def test_decision_documents_match_the_documented_schema(service: PolicyService) -> None:
    import json

    import jsonschema

    from policyd.analysis import analyse
    from policyd.decision import statement_input
    from policyd.opa import CONNECT_PACKAGE, STATEMENT_PACKAGE

    schema = json.loads((ROOT / "docs" / "policy-input.schema.json").read_text())
    decision = jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": "#/$defs/decision"})
    connect = jsonschema.Draft202012Validator(
        {"$defs": schema["$defs"], "$ref": "#/$defs/connect_decision"})
    for entry in CORPUS[::7]:
        for group in ROLE:
            req = request(entry.sql, group, entry.params)
            doc = await service.engine.query(STATEMENT_PACKAGE, statement_input(
                req, analyse(req.sql, user=ROLE[group], params=req.params),
                history={"card_lookups": 0, "window_seconds": 3600}))
            assert not [e.message for e in decision.iter_errors(doc)], (entry.sql, doc)
    for group in ROLE:
        doc = await service.engine.query(CONNECT_PACKAGE, {
            "identity": {"subject": "a", "groups": [group]}, "database": "shop"})
        assert not [e.message for e in connect.iter_errors(doc)], doc
