"""policyd.analysis: what the policy is told about SQL."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.analysis import analyse, parse_search_path, scrub_pan


def one(sql: str, **kw: Any) -> dict[str, Any]:
    a = analyse(sql, **kw)
    assert a.parseable, a.error
    assert len(a.statements) == 1
    return a.statements[0]


def rel(stmt: dict[str, Any], name: str, access: str | None = None) -> dict[str, Any]:
    found = [r for r in stmt["relations"] if r["name"] == name
             and (access is None or r["access"] == access)]
    assert found, stmt["relations"]
    return found[0]


def test_commands() -> None:
    assert one("select 1")["command"] == "select"
    assert one("insert into t values (1)")["command"] == "insert"
    assert one("update t set a = 1")["command"] == "update"
    assert one("delete from t")["command"] == "delete"
    assert one("merge into t using s on t.id = s.id when matched then delete")["command"] == "merge"
    assert one("create table t (a int)")["command"] == "ddl"
    assert one("vacuum")["command"] == "maintenance"
    assert one("begin")["command"] == "transaction"
    assert one("commit")["transaction"] == "commit"
    assert one("set x = 1")["command"] == "set"
    assert one("copy t to stdout")["command"] == "copy"
    assert one("select 1 into t2")["command"] == "select_into"


def test_search_path_resolution_like_postgres() -> None:
    s = one("select * from payments", search_path='"$user", public', user="fraud_reader")
    r = rel(s, "payments")
    assert r["candidates"] == ["fraud_reader.payments", "public.payments"]
    assert r["schema"] == "public"  # the $user schema is listed, not shown
    assert not r["qualified"]
    # system catalogs: pg_catalog is searched first
    assert rel(one("select * from pg_authid"), "pg_authid")["candidates"][0] == "pg_catalog.pg_authid"
    # qualified names are taken as written
    assert rel(one('select * from "Evil".payments'), "payments")["candidates"] == ["Evil.payments"]


def test_set_search_path_applies_to_later_statements_of_the_message() -> None:
    a = analyse("SET search_path = evil, public; SELECT * FROM payments")
    assert rel(a.statements[1], "payments")["candidates"] == ["evil.payments", "public.payments"]


def test_unqualified_function_schema() -> None:
    assert one("select lower('a')")["functions"] == [
        {"schema": "pg_catalog", "name": "lower", "qualified": False}]
    # pg_catalog placed after evil: an unqualified name may resolve to evil.
    fn = one("select lower('a')", search_path="evil, pg_catalog")["functions"][0]
    assert fn["schema"] == "evil"
    assert one("select evil.lower('a')")["functions"][0]["qualified"]


def test_columns_and_star() -> None:
    s = one("select p.id, c.name from payments p join customers c on c.id = p.customer_id "
            "where p.id = 1")
    assert rel(s, "payments")["columns"] == ["customer_id", "id"]
    assert rel(s, "customers")["columns"] == ["id", "name"]
    assert rel(one("select * from payments"), "payments")["columns"] == ["*"]


def test_unqualified_column_in_a_join_is_attributed_to_every_table() -> None:
    s = one("select cvv from payments, customers")
    assert "cvv" in rel(s, "payments")["columns"] and "cvv" in rel(s, "customers")["columns"]


def test_lineage_through_expressions_subqueries_and_ctes() -> None:
    s = one("select encode(card_number::bytea, 'hex') as h, id from payments where id = 1")
    assert s["outputs"][0] == {"position": 0, "name": "h", "kind": "expression",
                               "sources": ["public.payments.card_number"], "reshaped": True}
    assert s["outputs"][1]["kind"] == "column"
    s = one("with x as (select card_number as cn from customers) select upper(cn) from x")
    assert s["outputs"][0]["sources"] == ["public.customers.card_number"]
    s = one("select (select card_number from payments limit 1) as c")
    assert s["outputs"][0]["sources"] == ["public.payments.card_number"]
    s = one("select card_number from payments union select card_number from customers")
    assert s["outputs"][0]["sources"] == ["public.customers.card_number",
                                          "public.payments.card_number"]
    s = one("select 1 as one")
    assert s["outputs"][0]["kind"] == "constant"


TRANSLATED = "translate(card_number, '0123456789', 'abcdefghij')"


@pytest.mark.parametrize("sql", [
    f"with x as (select {TRANSLATED} as t from payments) select t from x",
    f"with x (t) as (select {TRANSLATED} from payments) select x.t from x",
    f"select t from (select {TRANSLATED} as t from payments) s",
    f"select a from (select {TRANSLATED} as t from payments) s(a)",
    f"select * from (select {TRANSLATED} from payments) s",
    f"select s.* from (select {TRANSLATED} from payments) s",
    f"with x as (select {TRANSLATED} as t from payments), y as (select t as u from x) "
    "select u from y",
    f"select t from (select card_number as t from payments union select {TRANSLATED} "
    "from payments) u",
    "select t from payments p, translate(p.card_number, '0', 'a') as t",
    "select l.t from payments p, lateral (select reverse(p.card_number) as t) l",
    f"select s from (select {TRANSLATED} as t from payments) s",
    "select p from payments p",
])
def test_a_computed_column_stays_computed_when_selected_by_name(sql: str) -> None:
    """PostgreSQL gives such a column no identity (table OID 0), so only
    masking it as a whole (an "expression" output) hides a reshaped PAN."""
    out = one(sql)["outputs"][0]
    assert out["kind"] == "expression"
    assert any(src.startswith("public.payments.") for src in out["sources"])


@pytest.mark.parametrize(("sql", "reshaped"), [
    ("select card_number::bigint from payments", False),
    ("select json_build_object('c', card_number) from payments", False),
    ("select 'card ' || card_number from payments", False),
    ("select x from (select card_number from payments) x", False),
    ("select u from payments p, unnest(array[p.card_number]) u", False),
    (f"select {TRANSLATED} from payments", True),
    ("select encode(card_number::bytea, 'base64') from payments", True),
    ("select substr(card_number, 1, 8) from payments", True),
    ("select card_number::bigint / 1000000 from payments", True),
    ("select md5(card_number) from payments", True),
    ("select card_number::varchar(12) from payments", True),
    ("select cast(card_number as char(8)) from payments", True),
    ("select card_number::bigint::money from payments", True),
    ("select card_number::bigint::float8 from payments", True),
    ("select card_number::text[] from payments", False),
    ("select \"varchar\"(card_number::varchar, 16, true) from payments", True),
    ("select pg_catalog.numeric(card_number::numeric, 655366) from payments", True),
    ("select card_number::jsonb from payments", False),
    ("select public.upper(card_number) from payments", True),
    (f"with x as (select {TRANSLATED} as t from payments) select t from x", True),
    (f"select x from (select {TRANSLATED} from payments) x", True),
    ("select g from payments p, generate_series(1, length(p.card_number)) g", True),
    (f"select t from (select card_number as t from payments union select {TRANSLATED} "
     "from payments) u", True),
])
def test_reshaped_says_whether_content_detection_can_still_see_the_digits(
        sql: str, reshaped: bool) -> None:
    out = one(sql)["outputs"][0]
    assert out["kind"] == "expression" and out["reshaped"] is reshaped


def test_where_clauses_do_not_reshape_what_is_returned() -> None:
    outs = one("select (select card_number from payments where id + 1 = 2), card_number "
               "from payments where card_number::bigint % 7 = 0")["outputs"]
    assert [o["reshaped"] for o in outs] == [False, False]


def test_columns_renamed_by_a_table_alias_may_be_any_column() -> None:
    s = one("select i, translate(c, '0', 'a') from payments as p(i, c) where i = 1")
    assert [o["sources"] for o in s["outputs"]] == [["public.payments.*"]] * 2
    assert s["outputs"][1]["reshaped"] and s["bounded"]


def test_a_plain_column_through_a_subquery_stays_a_column() -> None:
    for sql in ("select c from (select card_number as c from payments) s",
                "with x as (select card_number from payments) select card_number from x",
                "select s.id from (select id, card_number from payments) s"):
        assert one(sql)["outputs"][0]["kind"] == "column", sql


def test_cursor_and_prepared_statement_outputs_are_listed() -> None:
    """What a FETCH or an EXECUTE will return, for the policy to judge."""
    for sql in (f"declare c cursor for select id, {TRANSLATED} from payments",
                f"prepare p as select id, {TRANSLATED} from payments"):
        outs = one(sql)["outputs"]
        assert [o["kind"] for o in outs] == ["column", "expression"], sql


def test_returning_is_an_output() -> None:
    s = one("update payments set amount = 1 where id = 1 returning card_number")
    assert s["outputs"][0]["sources"] == ["public.payments.card_number"]


def test_data_modifying_cte_and_select_into() -> None:
    s = one("with d as (delete from payments returning *) select * from d")
    assert s["data_modifying_cte"]
    assert rel(s, "payments", "write")
    s = one("select * into copy_of from payments")
    assert s["select_into"] and rel(s, "copy_of", "write")


def test_copy_details() -> None:
    s = one("copy payments (id, card_number) to program 'gzip > /tmp/x'")
    assert s["copy_program"] and s["copy_direction"] == "to"
    assert rel(s, "payments", "read")["columns"] == ["card_number", "id"]
    s = one("copy payments from '/tmp/in.csv'")
    assert s["copy_direction"] == "from" and s["copy_filename"] == "/tmp/in.csv"
    assert rel(s, "payments", "write")
    assert one("copy payments to stdout")["copy_stdio"]


@pytest.mark.parametrize(("sql", "fmt"), [
    ("copy payments to stdout", "text"),
    ("copy payments to stdout with csv header", "csv"),
    ("copy (select card_number from payments) to stdout (format csv)", "csv"),
    ("copy payments to stdout binary", "binary"),
    ("copy payments to stdout with (format binary)", "binary"),
    ("copy payments to stdout with (format binary, format text)", "binary"),
])
def test_copy_format(sql: str, fmt: str) -> None:
    """The policy refuses a binary COPY of card numbers: its data has no
    column types for the gateway to mask by."""
    assert one(sql)["copy_format"] == fmt


def test_bounded_reads() -> None:
    assert not rel(one("select * from payments"), "payments")["bounded"]
    assert rel(one("select * from payments where id = 1"), "payments")["bounded"]
    assert rel(one("select * from payments limit 5"), "payments")["bounded"]
    assert not rel(one("select * from payments limit all"), "payments")["bounded"]
    assert not rel(one("select * from payments where 1 = 1"), "payments")["bounded"]
    # a WHERE on another table does not bound this one
    s = one("select * from payments p, customers c where c.id = 1")
    assert not rel(s, "payments")["bounded"] and rel(s, "customers")["bounded"]


def _terms(sql: str, column: str) -> list[tuple[str, bool, list[str] | None]]:
    """(op, disjunctive, other_sources) of the terms on ``column``."""
    return [(c["op"], c["disjunctive"], c.get("other_sources"))
            for c in one(sql)["comparisons"] if column in c["sources"]]


PAN = "public.payments.card_number"


def test_conditions_outside_where_are_terms_too() -> None:
    """JOIN ON, USING, NATURAL, HAVING and key expressions answer questions
    about a column like a WHERE does (a policy refuses them on a card
    number); a join's terms bound nothing (outer joins)."""
    guesses = ("select g from payments p join generate_series(0, 9) g "
               "on p.card_number = '41111111111111' || lpad(g::text, 2, '0') where p.id = 5")
    assert _terms(guesses, PAN) == [("=", True, None)]
    assert _terms("select v.n from payments p join (values ('1', 1)) v(card_number, n) "
                  "using (card_number) where p.id = 5", PAN) == [("ref", True, None)]
    natural = one("select 1 from payments p natural join (values ('1')) v(card_number) "
                  "where p.id = 5")
    assert any(c["sources"] == ["public.payments.*"] and c["op"] == "ref"
               for c in natural["comparisons"])
    assert _terms("select card_number from payments where id < 9 group by card_number "
                  "having max(card_number) > '4'", PAN) == [("ref", True, None)]
    assert _terms("select id from payments where id < 9 "
                  "order by substr(card_number, 1, 1) = '4' limit 1", PAN) == [("ref", True, None)]
    for plain in ("order by card_number", "order by 1", "group by card_number"):
        assert _terms(f"select card_number from payments where id < 9 {plain}", PAN) == []


def test_null_tests_on_a_column_say_so() -> None:
    """Whether a card number is there reveals none of its digits: the
    policy tells IS [NOT] NULL on the column from a test on an expression
    of it (substr(...)::date IS NULL can fail on the digits)."""
    assert _terms("select id from payments where card_number is null", PAN) == [
        ("is_null", False, None)]
    assert _terms("select id from payments where id = 1 or card_number::text is not null",
                  PAN) == [("is_not_null", True, None)]
    assert _terms("select id from payments where substr(card_number, 1, 8)::date is null",
                  PAN) == [("ref", True, None)]
    # IS [NOT] DISTINCT FROM compares values: not a null test
    assert _terms("select id from payments p join customers c "
                  "on c.card_number is not distinct from p.card_number where p.id = 1",
                  PAN) == [("ref", True, None)]


def test_column_equality_carries_the_other_side() -> None:
    on = _terms("select 1 from payments p join customers c on c.card_number = p.card_number "
                "where p.id = 1", PAN)
    assert on == [("=", True, ["public.customers.card_number"])]
    where = _terms("select 1 from payments p, customers c where p.card_number = c.card_number "
                   "and p.id = 1", PAN)
    assert where == [("=", False, ["public.customers.card_number"])]
    assert _terms("select 1 from payments where card_number = $1", PAN) == [("=", False, None)]
    plain = [c.get("other_plain") for c in one(
        "select 1 from payments p join customers c on c.card_number = p.card_number "
        "where p.id = 1")["comparisons"] if PAN in c["sources"]]
    assert plain == [True]
    guess = ("select 1 from payments p join (select case when id = 1 then '4111111111111111' "
             "else card_number end as card_number from customers) c "
             "on c.card_number = p.card_number where p.id = 1")
    assert [c.get("other_plain") for c in one(guess)["comparisons"]
            if "other_sources" in c] == [False, False]


def test_set_operation_sources() -> None:
    s = one("select card_number from payments where id = 5 intersect select '4111111111111111'")
    assert s["set_operation_sources"] == [PAN]
    s = one("select * from (select id from payments except select 1) t")
    assert s["set_operation_sources"] == ["public.payments.id"]
    assert "set_operation_sources" not in one("select card_number from payments where id = 1")


def test_comparisons_literals_params_and_negation() -> None:
    s = one("select * from payments where amount > 10000")
    assert s["comparisons"][0] | {} == {
        "column": "amount", "sources": ["public.payments.amount"], "op": ">",
        "value": 10000, "known": True, "negated": False, "disjunctive": False, "level": 1,
        "param": None}
    s = one("select * from payments where 10000 < amount")
    assert s["comparisons"][0]["op"] == ">"
    s = one("select * from payments where not amount <= 5 or id = 2")
    assert s["comparisons"][0]["negated"] and s["comparisons"][0]["disjunctive"]
    s = one("select * from payments where amount > $2", params=("a", "42"))
    c = s["comparisons"][0]
    assert (c["param"], c["value"], c["known"]) == (2, 42, True)
    assert s["params_read"] == [2]
    s = one("select * from payments where amount > $1")
    assert s["comparisons"][0]["known"] is False and s["params_read"] == []


def test_pan_literals_never_reach_the_analysis() -> None:
    a = analyse("select * from payments where card_number = '4111 1111 1111 1111'")
    assert "4111" not in repr(a.to_input())
    assert a.statements[0]["comparisons"][0]["redacted"]
    bad = analyse("selekt 4111111111111111")
    assert not bad.parseable or "4111111111111111" not in bad.error


def test_unparseable_is_flagged() -> None:
    a = analyse("SELEKT * FROM payments")
    assert not a.parseable and a.error.startswith("unparseable SQL")
    assert a.statements == []


def test_dynamic_and_special_statements() -> None:
    assert one("do $$ begin perform 1; end $$")["dynamic_sql"]
    assert one("execute p(1)")["opaque_sql"]
    two = analyse("prepare p as select 1; execute p").statements
    assert not two[1]["opaque_sql"]
    assert one("set role postgres")["set_role"]
    assert one("set session authorization postgres")["session_authorization"]
    assert one("alter system set work_mem = '1GB'")["alter_system"]
    assert one("create user x")["role_statement"]
    assert one("revoke select on t from x")["grant"]
    assert one("drop database shop")["drop_database"]
    s = one("create function f() returns int language plpython3u as $$ return 1 $$")
    assert s["untrusted_language"] and s["language"] == "plpython3u"


def test_fingerprint_normalises_constants() -> None:
    assert analyse("select * from t where id = 1").fingerprint == analyse(
        "SELECT * FROM t WHERE id = 2").fingerprint


def test_multi_statement_message() -> None:
    a = analyse("begin; select 1; commit")
    assert [s["command"] for s in a.statements] == ["transaction", "select", "transaction"]
    assert a.summary()["commands"] == ["transaction", "select", "transaction"]


def test_parse_search_path() -> None:
    assert parse_search_path('"$user", public') == ["$user", "public"]
    assert parse_search_path('Evil, "Mixed""Case"') == ["evil", 'Mixed"Case']


def test_scrub_pan() -> None:
    assert scrub_pan("near 4111111111111111 here") == "near [redacted] here"
    assert scrub_pan("order 1234567890123") == "order 1234567890123"  # not Luhn-valid


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_never_raises_on_any_text(sql: str) -> None:
    a = analyse(sql)
    assert a.parseable or a.error


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    "select", "*", "from", "payments", "where", "amount", ">", "1", "(", ")", ",", ";",
    "with", "x", "as", "delete", "returning", "union", "not", "or", "and", "$1", "join",
    "on", "=", "limit", "pg_read_file('a')", "lateral", "values"]), max_size=25))
def test_never_raises_on_sql_like_tokens(tokens: list[str]) -> None:
    a = analyse(" ".join(tokens), params=("5",))
    assert a.parseable or a.error


def test_bind_places_values_without_reanalysing() -> None:
    parsed = analyse("select * from payments where amount > $1 and id = $2")
    assert [c["known"] for c in parsed.statements[0]["comparisons"]] == [False, False]
    bound = parsed.bind(("20000", None))
    comps = bound.statements[0]["comparisons"]
    assert (comps[0]["value"], comps[0]["known"]) == (20000, True)
    assert (comps[1]["value"], comps[1]["known"]) == (None, True)  # NULL is a known value
    assert bound.statements[0]["params_read"] == [1, 2]
    assert parsed.statements[0]["params_read"] == []  # the parsed analysis is untouched
    assert analyse("select 1").bind(("x",)).statements[0]["params_read"] == []
    redacted = parsed.bind(("4111111111111111", "1")).statements[0]["comparisons"][0]
    assert redacted["value"] == "[redacted]" and redacted["redacted"]


def test_qualified_and_unqualified_names_never_merge() -> None:
    a = analyse("SET search_path = evil, public; SELECT * FROM evil.payments, payments")
    candidates = sorted(r["candidates"] for r in a.statements[1]["relations"])
    assert candidates == [["evil.payments"], ["evil.payments", "public.payments"]]


def test_lineage_through_a_star_subquery() -> None:
    s = one("select x.card_number from (select * from payments where id = 1) x")
    assert s["outputs"][0]["sources"] == ["public.payments.card_number"]


def test_passwords_never_reach_the_analysis() -> None:
    a = analyse("ALTER USER app PASSWORD 'hunter2-secret'; CREATE ROLE r PASSWORD 'p4ss-secret'")
    text = repr(a.to_input()) + repr(a.summary())
    assert "hunter2" not in text and "p4ss" not in text
    assert all(s["role_statement"] for s in a.statements)


@pytest.mark.parametrize(("sql", "statements", "portals"), [
    ("PREPARE p1 AS SELECT 1; EXECUTE p1", ["p1"], []),
    ("DEALLOCATE p1", ["p1"], []),
    ("DEALLOCATE PREPARE ALL", ["*"], []),
    ("DECLARE c1 CURSOR FOR SELECT 1", [], ["c1"]),
    ("CLOSE c1; CLOSE ALL", [], ["*", "c1"]),
    ("DISCARD ALL", ["*"], ["*"]),
])
def test_sql_level_names_a_message_creates_or_drops(sql: str, statements: list[str],
                                                    portals: list[str]) -> None:
    """The protocol shares these names with SQL: the tap forgets what it knew
    under them (tests/unit/test_sql_level_names.py)."""
    assert analyse(sql).summary()["sql_names"] == {"statements": statements, "portals": portals}


def test_ordinary_statements_change_no_sql_level_names() -> None:
    assert "sql_names" not in analyse("SELECT 1; DISCARD PLANS; FETCH ALL FROM c1").summary()


def test_insert_on_conflict_says_whether_it_reads_the_existing_row() -> None:
    base = "insert into payments (id, card_number) values (1, 'x')"
    assert "on_conflict" not in one(base)
    assert one(base + " on conflict do nothing")["on_conflict"] == "nothing"
    upsert = one(base + " on conflict (id) do update set amount = "
                 "translate(payments.card_number, '0', 'a')::numeric")
    assert upsert["on_conflict"] == "update"
