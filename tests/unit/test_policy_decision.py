"""Decision documents -> tap.hooks.Decision, and back over the wire: fail closed."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from pgwarden._proto import policy_pb2 as pb
from policyd.analysis import analyse
from policyd.convert import decision_from_pb, decision_to_pb, request_from_pb, request_to_pb
from policyd.decision import from_document, new_decision_id, params_read, statement_input
from tap.hooks import (
    ColumnRule,
    Decision,
    Identity,
    MaskPlan,
    RecordRows,
    SessionInfo,
    StatementRequest,
    Verdict,
)

ANALYSIS = analyse("select card_number from payments where id = 1")


def doc(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"allow": True, "reasons": ["ok"], "sqlstate": "42501",
                            "mask": {"rules": [{"column": "public.payments.card_number",
                                                "style": "last4"}],
                                     "derived_columns": [], "scan_content": True,
                                     "unmasked": False},
                            "approval": {"required": False, "reason": "",
                                         "approver_groups": [], "hold_seconds": 60},
                            "record_rows": "count"}
    base.update(kw)
    return base


@pytest.mark.parametrize("document", [None, [], "allow", {}, {"allow": "true"},
                                      {"allow": 1}])
def test_undefined_or_odd_documents_deny(document: Any) -> None:
    d = from_document(document, revision="r", analysis=ANALYSIS)
    assert d.verdict is Verdict.DENY and d.sqlstate == "42501" and d.reasons


def test_allow() -> None:
    d = from_document(doc(), revision="r", analysis=ANALYSIS)
    assert d.verdict is Verdict.ALLOW and d.policy_revision == "r" and d.decision_id
    assert d.mask.rules == (ColumnRule("public.payments.card_number", "last4"),)
    assert d.analysis["commands"] == ["select"]


def test_withhold_errors_as_the_policy_says_or_whenever_it_masks_columns() -> None:
    def mask(**kw: Any) -> MaskPlan:
        return from_document(doc(mask={**doc()["mask"], **kw}), revision="r",
                             analysis=ANALYSIS).mask

    assert mask(withhold_errors=True).withhold_errors
    assert not mask(withhold_errors=False).withhold_errors
    # A pack that does not say: withheld when it masks a column ...
    assert mask().withhold_errors
    assert mask(rules=[], derived_columns=[2]).withhold_errors
    # ... not when nothing is classified, nor for raw data.
    assert not mask(rules=[]).withhold_errors
    assert not mask(unmasked=True).withhold_errors


def test_column_positions_from_the_policy() -> None:
    positions = [{"position": 1, "column": "public.payments.card_number"}]
    d = from_document(doc(mask={**doc()["mask"], "column_positions": positions}), revision="r",
                      analysis=ANALYSIS)
    assert d.mask.column_positions == ((1, "public.payments.card_number"),)
    for bad in ([{"position": "1", "column": "x"}], [{"position": 1}], ["x"]):
        d = from_document(doc(mask={**doc()["mask"], "column_positions": bad}), revision="r",
                          analysis=ANALYSIS)
        assert d.verdict is Verdict.DENY, bad


def test_a_malformed_withhold_errors_denies() -> None:
    d = from_document(doc(mask={**doc()["mask"], "withhold_errors": "yes"}), revision="r",
                      analysis=ANALYSIS)
    assert d.verdict is Verdict.DENY


def test_approval_makes_a_hold() -> None:
    d = from_document(doc(approval={"required": True, "reason": "big", "approver_groups":
                                    ["approvers"], "hold_seconds": 30}),
                      revision="r", analysis=ANALYSIS)
    assert d.verdict is Verdict.HOLD and d.approval.hold_seconds == 30.0


@pytest.mark.parametrize("bad", [
    {"mask": {"rules": [{"column": "x", "style": "rot13"}]}},
    {"mask": {"rules": [{"style": "last4"}]}},
    {"mask": "none"},
    {"approval": {"required": True, "hold_seconds": -1}},
    {"record_rows": "everything"},
    {"max_result_bytes": 0},
    {"max_result_bytes": -5},
    {"max_result_bytes": 2.5},
    {"max_result_bytes": "1MB"},
    {"max_result_bytes": True},
    {"max_result_bytes": 2**63},
])
def test_malformed_allow_is_a_deny(bad: dict[str, Any]) -> None:
    d = from_document(doc(**bad), revision="r", analysis=ANALYSIS)
    assert d.verdict is Verdict.DENY and "malformed" in d.reasons[0]


def test_the_result_limit_of_a_decision() -> None:
    assert from_document(doc(), revision="r", analysis=ANALYSIS).max_result_bytes is None
    assert from_document(doc(max_result_bytes=None), revision="r",
                         analysis=ANALYSIS).max_result_bytes is None
    d = from_document(doc(max_result_bytes=1048576), revision="r", analysis=ANALYSIS)
    assert d.verdict is Verdict.ALLOW and d.max_result_bytes == 1048576
    assert from_document(doc(max_result_bytes=1e6), revision="r",
                         analysis=ANALYSIS).max_result_bytes == 1_000_000
    # on the wire 0 means "no limit from the policy"
    assert decision_from_pb(decision_to_pb(d)).max_result_bytes == 1048576
    no_limit = Decision(verdict=Verdict.ALLOW)
    assert decision_from_pb(decision_to_pb(no_limit)).max_result_bytes is None
    assert decision_from_pb(pb.DecideResponse(verdict=pb.VERDICT_ALLOW, max_result_bytes=-1)
                            ).max_result_bytes is None


def test_bad_sqlstate_falls_back() -> None:
    d = from_document({"allow": False, "sqlstate": "nope"}, revision="r", analysis=ANALYSIS)
    assert d.sqlstate == "42501"


def test_params_read_and_input_have_no_sql_text() -> None:
    req = StatementRequest(identity=Identity(groups=("g",)), session=SessionInfo("s"),
                           sql="select * from payments where amount > $1 -- 4111111111111111",
                           params=("10",))
    a = analyse(req.sql, params=req.params)
    assert params_read(a) == (1,)
    doc_in = statement_input(req, a, history={"card_lookups": 0, "window_seconds": 3600})
    assert "sql" not in doc_in["request"] and "4111111111111111" not in repr(doc_in)
    assert doc_in["identity"]["groups"] == ["g"]


def test_request_round_trip() -> None:
    req = StatementRequest(
        identity=Identity(subject="s", groups=("a", "b"), issuer="i", kind="human",
                          actor="x<-y", expires_at=12.5),
        session=SessionInfo("sid", database="db", user="u", upstream_role="r",
                            client_addr="1.2.3.4", application_name="app", tls=True,
                            search_path="a, b", transaction_status="T"),
        sql="select $1", path="parse", statement_name="st", params=("1", None))
    assert request_from_pb(request_to_pb(req)) == req
    no_params = StatementRequest(identity=Identity(), session=SessionInfo("s"), sql="x")
    assert request_from_pb(request_to_pb(no_params)).params is None


def test_decision_round_trip() -> None:
    d = Decision(verdict=Verdict.HOLD, reasons=("r",), decision_id="id", policy_revision="rev",
                 mask=MaskPlan(rules=(ColumnRule("a.b.c"),), derived_columns=(1,),
                               scan_content=False, unmasked=True, withhold_errors=True,
                               column_positions=((2, "a.b.c"),)),
                 record_rows=RecordRows.MASKED_ROWS, record_rows_cap=7,
                 analysis={"commands": ["select"]}, max_result_bytes=4096)
    assert decision_from_pb(decision_to_pb(d)) == d


def test_unknown_verdict_on_the_wire_is_a_deny() -> None:
    d = decision_from_pb(pb.DecideResponse(reasons=["?"]))
    assert d.verdict is Verdict.DENY


async def test_client_refuses_text_it_cannot_send() -> None:
    from policyd.client import PolicyClient

    async with PolicyClient("127.0.0.1:1", watch_revision=False) as client:
        d = await client.decide(StatementRequest(identity=Identity(), session=SessionInfo("s"),
                                                 sql="select '\udcff'"))
    assert d.verdict is Verdict.DENY


async def test_client_without_policyd_denies_with_58000() -> None:
    from policyd.client import UNAVAILABLE_REASON, PolicyClient

    async with PolicyClient("127.0.0.1:1", deadline=0.5, watch_revision=False) as client:
        d = await client.decide(StatementRequest(identity=Identity(), session=SessionInfo("s"),
                                                 sql="select 1"))
    assert d.verdict is Verdict.DENY and d.sqlstate == "58000"
    assert d.reasons[0].startswith(UNAVAILABLE_REASON)


def test_decision_ids_never_hold_a_card_number_length_digit_run() -> None:
    """Clients see the id in error messages, where a scanner would take 13
    digits in a row for a card number (a test once found one: the refusal
    looked like a leak)."""
    draws = iter([uuid.UUID("4111111111111111" + "1" * 16), uuid.UUID("ab" * 16)])
    assert new_decision_id(lambda: next(draws)) == "ab" * 16
    assert all(not re.search("[0-9]{13}", new_decision_id()) for _ in range(2000))
