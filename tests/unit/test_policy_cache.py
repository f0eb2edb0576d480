"""DecisionCache: only ever right, bounded, dropped on a new revision."""

from __future__ import annotations

from dataclasses import replace

from policyd.client import DecisionCache
from tap.hooks import Approval, Decision, Identity, SessionInfo, StatementRequest, Verdict

READER = Identity(subject="bot", groups=("fraud-readers", "x"))
SESSION = SessionInfo(session_id="s1", database="shop", upstream_role="fraud_reader")


def req(sql: str = "select 1", *, identity: Identity = READER, session: SessionInfo = SESSION,
        params: tuple[str | None, ...] | None = None) -> StatementRequest:
    return StatementRequest(identity=identity, session=session, sql=sql, params=params)


def allow(rev: str = "r1") -> Decision:
    return Decision(verdict=Verdict.ALLOW, reasons=("ok",), decision_id="d", policy_revision=rev)


def test_hit_after_put() -> None:
    c = DecisionCache()
    d = allow()
    c.put(req(), d, params_read=())
    assert c.get(req()) is d
    assert (c.hits, c.misses) == (1, 0)


def test_groups_are_a_set_and_part_of_the_key() -> None:
    c = DecisionCache()
    c.put(req(), allow(), params_read=())
    same = replace(READER, groups=("x", "fraud-readers"))
    assert c.get(req(identity=same)) is not None
    assert c.get(req(identity=replace(READER, groups=("dba",)))) is None


def test_everything_the_policy_sees_is_in_the_key() -> None:
    c = DecisionCache()
    c.put(req(), allow(), params_read=())
    variants = [
        req("select 2"), req("SELECT 1"),
        req(identity=replace(READER, kind="human")),
        req(identity=replace(READER, subject="other")),
        req(session=replace(SESSION, database="other")),
        req(session=replace(SESSION, upstream_role="dba_role")),
        req(session=replace(SESSION, search_path="evil, public")),
        req(session=replace(SESSION, transaction_status="E")),
        req(params=()),
    ]
    for v in variants:
        assert c.get(v) is None, v
    # the session id is not: sessions share decisions
    assert c.get(req(session=replace(SESSION, session_id="s2"))) is not None


def test_only_the_parameters_the_policy_read_are_keyed() -> None:
    c = DecisionCache()
    sql = "select * from payments where amount = $1 and note = $2"
    c.put(req(sql, params=("5", "a")), allow(), params_read=(1,))
    assert c.get(req(sql, params=("5", "b"))) is not None  # $2 was not read
    assert c.get(req(sql, params=("20000", "a"))) is None  # $1 was


def test_new_revision_drops_everything() -> None:
    c = DecisionCache()
    c.put(req(), allow("r1"), params_read=())
    c.put(req("select 2"), allow("r2"), params_read=())  # learns r2, drops r1 entries
    assert c.revision == "r2"
    assert c.get(req()) is None
    assert c.get(req("select 2")) is not None
    c.observe_revision("r3")
    assert len(c) == 0


def test_invalidate_and_disable() -> None:
    c = DecisionCache()
    c.put(req(), allow(), params_read=())
    c.invalidate()
    assert c.get(req()) is None
    c.put(req(), allow(), params_read=())
    c.enabled = False
    assert c.get(req()) is None


def test_hold_and_uncacheable_are_never_cached() -> None:
    c = DecisionCache()
    hold = Decision(verdict=Verdict.HOLD, policy_revision="r1",
                    approval=Approval(required=True, reason="big"))
    c.put(req(), hold, params_read=())
    assert c.get(req()) is None
    c.put(req(), allow(), params_read=(), cacheable=False)
    assert c.get(req()) is None
    c.put(req(), Decision(verdict=Verdict.ALLOW), params_read=())  # no revision
    assert c.get(req()) is None


def test_bounded_lru() -> None:
    c = DecisionCache(maxsize=3)
    for i in range(3):
        c.put(req(f"select {i}"), allow(), params_read=())
    assert c.get(req("select 0")) is not None  # now most recent
    c.put(req("select 3"), allow(), params_read=())
    assert len(c) == 3
    assert c.get(req("select 1")) is None  # least recently used went
    assert c.get(req("select 0")) is not None


def test_huge_statements_are_not_cached() -> None:
    c = DecisionCache(max_sql_length=100)
    big = req("select " + "1," * 100 + "1")
    c.put(big, allow(), params_read=())
    assert c.get(big) is None
