"""From a statement request to a policy input, and from a decision document
to a :class:`tap.hooks.Decision`.

This is the contract of docs/policy-authors.md (JSON Schema in
docs/policy-input.schema.json). Two rules keep it safe:

* the raw SQL text is *not* in the input: it may hold a PAN, and OPA's
  decision logs would keep it. Policies judge the analysis.
* anything malformed or missing in the decision document is a deny. An
  undefined decision (no ``result``) is a deny.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

from policyd.analysis import Analysis, parse_search_path
from tap.hooks import (
    Approval,
    ColumnRule,
    Decision,
    Identity,
    MaskPlan,
    RecordRows,
    SessionInfo,
    StatementRequest,
    Verdict,
)

#: SQLSTATE when the policy pack refuses (insufficient_privilege).
DENY_SQLSTATE = "42501"
#: SQLSTATE when no decision could be taken (OPA or policyd unavailable):
#: class 58 "system error", an error external to PostgreSQL; retrying later
#: may succeed, unlike 42501.
UNAVAILABLE_SQLSTATE = "58000"

_MASK_STYLES = frozenset({"last4", "first6_last4", "redact", "null", "hmac"})


# Thirteen decimal digits in a row: what a PAN detector starts to look at.
_DIGIT_RUN = re.compile(r"[0-9]{13}")


def new_decision_id(draw: Callable[[], uuid.UUID] = uuid.uuid4) -> str:
    """A random id (32 hex digits) for a decision. Clients see it in error
    messages, which log scanners and the gateway's own scrubber read: about
    one random id in two hundred holds 13 decimal digits in a row, and some
    of those pass the Luhn check with an issuer prefix, so such an id is
    drawn again."""
    while True:
        value = draw().hex
        if _DIGIT_RUN.search(value) is None:
            return value


def identity_input(identity: Identity) -> dict[str, Any]:
    return {
        "subject": identity.subject,
        "groups": list(identity.groups),
        "issuer": identity.issuer,
        "type": identity.kind,
        "actor": identity.actor,
    }


def statement_input(request: StatementRequest, analysis: Analysis, *,
                    history: dict[str, int]) -> dict[str, Any]:
    """The ``input`` document for ``data.pgwarden.statement.decision``;
    ``history`` is what policyd remembers of the identity
    (:meth:`policyd.lookups.LookupLedger.history`)."""
    session = request.session
    return {
        "identity": identity_input(request.identity),
        "session": session_input(session),
        "request": {
            "path": request.path,
            "statement_name": request.statement_name,
            "param_count": None if request.params is None else len(request.params),
        },
        "analysis": analysis.to_input(),
        "history": history,
    }


def session_input(session: SessionInfo) -> dict[str, Any]:
    return {
        "id": session.session_id,
        "database": session.database,
        "user": session.user,
        "upstream_role": session.upstream_role,
        "client_addr": session.client_addr,
        "application_name": session.application_name,
        "tls": session.tls,
        "search_path": parse_search_path(session.search_path),
        "transaction_status": session.transaction_status,
    }


def params_read(analysis: Analysis) -> tuple[int, ...]:
    """Parameter numbers (1-based) whose values reached the policy input.

    The policy can only see a Bind value where the analysis placed it (a
    comparison against ``$n``), so these are exactly the values a cached
    decision must be keyed on.
    """
    seen: set[int] = set()
    for statement in analysis.statements:
        seen.update(statement.get("params_read", ()))
    return tuple(sorted(seen))


def deny(reason: str, *, sqlstate: str = DENY_SQLSTATE, revision: str = "",
         analysis: dict[str, Any] | None = None, decision_id: str = "") -> Decision:
    return Decision(
        verdict=Verdict.DENY,
        reasons=(reason,),
        decision_id=decision_id or new_decision_id(),
        policy_revision=revision,
        sqlstate=sqlstate,
        analysis=analysis or {},
    )


def from_document(doc: Any, *, revision: str, analysis: Analysis,
                  decision_id: str = "") -> Decision:
    """Turn ``data.pgwarden.statement.decision`` into a Decision (fail closed)."""
    summary = analysis.summary()
    decision_id = decision_id or new_decision_id()
    if not isinstance(doc, dict):
        return deny("the policy gave no decision for this statement (undefined is a deny)",
                    revision=revision, analysis=summary, decision_id=decision_id)
    reasons = tuple(str(r) for r in doc.get("reasons", []) if isinstance(r, str))
    raw_state = doc.get("sqlstate")
    sqlstate = raw_state if isinstance(raw_state, str) and len(raw_state) == 5 else DENY_SQLSTATE
    if doc.get("allow") is not True:
        return Decision(verdict=Verdict.DENY,
                        reasons=reasons or ("refused by policy",),
                        decision_id=decision_id, policy_revision=revision,
                        sqlstate=sqlstate, analysis=summary)
    try:
        mask = _mask(doc.get("mask"))
        approval = _approval(doc.get("approval"))
        record_rows = RecordRows(doc.get("record_rows", RecordRows.COUNT.value))
        max_result_bytes = _result_limit(doc.get("max_result_bytes"))
    except (ValueError, TypeError) as exc:
        return deny(f"malformed policy decision: {exc}", revision=revision,
                    analysis=summary, decision_id=decision_id)
    cap = doc.get("record_rows_cap", 100)
    verdict = Verdict.HOLD if approval.required else Verdict.ALLOW
    return Decision(
        verdict=verdict,
        reasons=reasons,
        decision_id=decision_id,
        policy_revision=revision,
        sqlstate=sqlstate,
        mask=mask,
        approval=approval,
        record_rows=record_rows,
        record_rows_cap=cap if isinstance(cap, int) and cap >= 0 else 100,
        analysis=summary,
        max_result_bytes=max_result_bytes,
    )


def _result_limit(value: Any) -> int | None:
    """``max_result_bytes`` of a decision: absent or null is no limit; a
    positive integer is the limit; anything else is a malformed decision
    (a deny: a limit the policy meant to set is never silently dropped)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("max_result_bytes must be a whole number of bytes or null")
    if isinstance(value, float) and not value.is_integer():  # also inf and nan
        raise ValueError("max_result_bytes must be a whole number of bytes or null")
    if not 1 <= value < 2**63:
        raise ValueError("max_result_bytes must be at least 1 (and fit 64 bits)")
    return int(value)


def _mask(doc: Any) -> MaskPlan:
    if doc is None:
        return MaskPlan()  # no instructions: scan content for PANs (safe default)
    if not isinstance(doc, dict):
        raise TypeError("mask must be an object")
    rules = []
    for rule in doc.get("rules", []):
        if not isinstance(rule, dict) or not isinstance(rule.get("column"), str):
            raise TypeError("mask rule needs a column")
        style = rule.get("style", "last4")
        if style not in _MASK_STYLES:
            raise ValueError(f"unknown mask style {style!r}")
        rules.append(ColumnRule(column=rule["column"], style=style))
    derived = tuple(int(p) for p in doc.get("derived_columns", []))
    positions = []
    for item in doc.get("column_positions", []):
        if (not isinstance(item, dict) or not isinstance(item.get("column"), str)
                or not isinstance(item.get("position"), int)):
            raise TypeError("mask.column_positions entries need a position and a column")
        positions.append((item["position"], item["column"]))
    unmasked = doc.get("unmasked", False) is True
    withhold = doc.get("withhold_errors")
    if withhold is None:
        # A pack that does not say: withheld whenever it masks columns.
        withhold = not unmasked and bool(rules or derived)
    elif not isinstance(withhold, bool):
        raise TypeError("mask.withhold_errors must be true or false")
    return MaskPlan(
        rules=tuple(rules),
        derived_columns=derived,
        scan_content=doc.get("scan_content", True) is not False,
        unmasked=unmasked,
        withhold_errors=withhold,
        column_positions=tuple(positions),
    )


def _approval(doc: Any) -> Approval:
    if doc is None:
        return Approval()
    if not isinstance(doc, dict):
        raise TypeError("approval must be an object")
    hold = doc.get("hold_seconds", 60.0)
    if not isinstance(hold, (int, float)) or hold <= 0:
        raise ValueError("approval.hold_seconds must be a positive number")
    return Approval(
        required=doc.get("required", False) is True,
        reason=str(doc.get("reason", "")),
        approver_groups=tuple(str(g) for g in doc.get("approver_groups", [])),
        hold_seconds=float(hold),
    )
