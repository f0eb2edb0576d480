"""A statement whose plan has column rules is not run before the catalog of
its database is loaded: the rules apply by the column identity the catalog
gives (table OID, attribute number), and without it only content detection
would look, which misses a stored value that fails the Luhn check."""

from __future__ import annotations

import asyncio

from tap.catalog import Catalog
from tap.hooks import (
    ColumnRule,
    Decision,
    Identity,
    MaskPlan,
    SessionInfo,
    StatementRequest,
    Verdict,
)
from tap.runtime import Runtime

RULED = Decision(verdict=Verdict.ALLOW, mask=MaskPlan(
    rules=(ColumnRule("public.payments.card_number"),)))
CONTENT_ONLY = Decision(verdict=Verdict.ALLOW, mask=MaskPlan(scan_content=True))
RAW = Decision(verdict=Verdict.ALLOW, mask=MaskPlan(
    rules=(ColumnRule("public.payments.card_number"),), unmasked=True))
REQUEST = StatementRequest(identity=Identity(), session=SessionInfo("s", database="shop"),
                           sql="select card_number from payments where id = 1")
Rows = tuple[list[tuple[int, int, str, str, str]], list[tuple[int, str, str, int]]]


def _runtime(decision: Decision, loader_gate: asyncio.Event | None, *,
             fails: bool = False, wait: float = 5.0) -> Runtime:
    async def loader(database: str) -> Rows:
        if fails:
            raise OSError("catalog role cannot connect")
        if loader_gate is not None:
            await loader_gate.wait()
        return [(16384, 2, "public", "payments", "card_number")], []

    async def decider(_request: StatementRequest) -> Decision:
        return decision

    runtime = Runtime(decider=decider, catalog_wait=wait)
    runtime.catalog = Catalog(loader)
    return runtime


def test_a_ruled_decision_waits_for_the_first_catalog_load() -> None:
    async def scenario() -> tuple[bool, Decision, bool]:
        gate = asyncio.Event()
        runtime = _runtime(RULED, gate)
        # Before the load a cached ruled decision is not used (slow path).
        cached_usable = not runtime.needs_catalog(RULED, "shop")
        pending = asyncio.ensure_future(runtime.decide(REQUEST))
        await asyncio.sleep(0.05)
        waiting = not pending.done()
        gate.set()
        decision = await pending
        return cached_usable or not waiting, decision, runtime.needs_catalog(RULED, "shop")

    wrong, decision, still_needed = asyncio.run(scenario())
    assert not wrong
    assert decision.verdict is Verdict.ALLOW
    assert not still_needed  # loaded: cached decisions are used again


def test_without_a_catalog_the_ruled_statement_is_refused() -> None:
    async def scenario() -> Decision:
        return await _runtime(RULED, None, fails=True, wait=0.2).decide(REQUEST)

    decision = asyncio.run(scenario())
    assert decision.verdict is Verdict.DENY and decision.sqlstate == "55000"
    assert any("catalog" in r for r in decision.reasons)


def test_decisions_without_column_rules_do_not_wait() -> None:
    async def scenario() -> list[Verdict]:
        out = []
        for d in (CONTENT_ONLY, RAW, Decision(verdict=Verdict.DENY, mask=RULED.mask)):
            runtime = _runtime(d, asyncio.Event(), wait=30.0)  # the load never ends
            assert not runtime.needs_catalog(d, "shop")
            out.append((await asyncio.wait_for(runtime.decide(REQUEST), 5)).verdict)
        return out

    assert asyncio.run(scenario()) == [Verdict.ALLOW, Verdict.ALLOW, Verdict.DENY]
