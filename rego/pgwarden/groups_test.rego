package pgwarden.groups_test

import rego.v1

import data.pgwarden.fixtures_test as f
import data.pgwarden.groups

permits(group, stmt) if {
	[group, 0] in groups.permitted with input as f.message([group], [stmt])
}

approvals(group, stmt) := {r |
	some entry in groups.approval with input as f.message([group], [stmt])
	entry[0] == group
	r := entry[2]
}

bounded_select := f.statement({"relations": [f.rel("public.payments", "read", ["id"], true)]})

# --- fraud-readers

test_reader_select if permits("fraud-readers", bounded_select)

test_reader_housekeeping if permits("fraud-readers", f.statement({"command": "transaction", "transaction_control": true}))

test_reader_plain_set if permits("fraud-readers", f.statement({"command": "set"}))

test_reader_search_path if permits("fraud-readers", f.statement({"command": "set", "setting": "search_path", "search_path": ["pg_catalog", "public"]}))

test_reader_search_path_shadowing_catalog if not permits("fraud-readers", f.statement({"command": "set", "setting": "search_path", "search_path": ["evil", "pg_catalog"]}))

copy_out := f.statement({
	"command": "copy", "copy_direction": "to", "copy_stdio": true, "copy_program": false,
	"relations": [f.rel("public.payments", "read", ["id", "card_number"], true)],
})

test_reader_copy_to_stdout if permits("fraud-readers", copy_out)

test_reader_no_copy_from if not permits("fraud-readers", object.union(copy_out, {"copy_direction": "from", "relations": [f.rel("public.payments", "write", ["*"], false)]}))

test_reader_no_copy_to_file if not permits("fraud-readers", object.union(copy_out, {"copy_stdio": false}))

test_reader_no_copy_program if not permits("fraud-readers", object.union(copy_out, {"copy_program": true}))

test_reader_no_write if not permits("fraud-readers", f.statement({"command": "update", "relations": [f.rel("public.payments", "write", ["amount"], true)]}))

test_reader_no_ddl if not permits("fraud-readers", f.statement({"command": "ddl"}))

test_reader_no_select_into if not permits("fraud-readers", f.statement({"command": "select_into", "select_into": true}))

test_reader_no_dml_cte if not permits("fraud-readers", f.statement({"data_modifying_cte": true}))

test_reader_unknown_function if not permits("fraud-readers", f.statement({"functions": [{"schema": "evil", "name": "f", "qualified": true}]}))

test_reader_admin_function if not permits("fraud-readers", f.statement({"functions": [{"schema": "pg_catalog", "name": "pg_terminate_backend", "qualified": false}]}))

test_reader_allowed_function if {
	s := f.statement({"functions": [{"schema": "app", "name": "score", "qualified": true}]})
	p := groups.permitted with input as f.message(["fraud-readers"], [s])
		with data.pgwarden_data.rules.allowed_functions as ["app.score"]
	["fraud-readers", 0] in p
}

test_reader_builtin_function if permits("fraud-readers", f.statement({"functions": [{"schema": "pg_catalog", "name": "lower", "qualified": false}]}))

test_reader_explain if permits("fraud-readers", f.statement({"command": "explain", "explain_analyze": false}))

test_reader_explain_analyze if not permits("fraud-readers", f.statement({"command": "explain", "explain_analyze": true}))

test_reader_prepare_select if permits("fraud-readers", f.statement({"command": "prepare", "prepared_command": "select"}))

test_reader_prepare_delete if not permits("fraud-readers", f.statement({"command": "prepare", "prepared_command": "delete"}))

test_reader_execute_known if permits("fraud-readers", f.statement({"command": "execute"}))

test_reader_execute_opaque if not permits("fraud-readers", f.statement({"command": "execute", "opaque_sql": true}))

test_reader_bounded_no_approval if count(approvals("fraud-readers", bounded_select)) == 0

test_reader_unbounded_needs_approval if {
	r := approvals("fraud-readers", f.select_payments([], false))
	r == {"unbounded read of cardholder table public.payments (no WHERE on it, no LIMIT)"}
}

large := {"read of public.payments.amount above 10000"}

test_amount_above_threshold if approvals("fraud-readers", f.select_payments([f.cmp("public.payments.amount", ">", 10000)], true)) == large

test_amount_lower_bound_uncapped if approvals("fraud-readers", f.select_payments([f.cmp("public.payments.amount", ">=", 5)], true)) == large

test_amount_capped_range if {
	s := f.select_payments([f.cmp("public.payments.amount", ">", 5), f.cmp("public.payments.amount", "<=", 5000)], true)
	count(approvals("fraud-readers", s)) == 0
}

test_amount_cap_in_other_level if {
	upper := object.union(f.cmp("public.payments.amount", "<", 100), {"level": 2})
	s := f.select_payments([f.cmp("public.payments.amount", ">", 20000), upper], true)
	approvals("fraud-readers", s) == large
}

test_amount_cap_under_or if {
	upper := object.union(f.cmp("public.payments.amount", "<", 100), {"disjunctive": true})
	s := f.select_payments([f.cmp("public.payments.amount", ">", 20000), upper], true)
	approvals("fraud-readers", s) == large
}

test_amount_equal_small if count(approvals("fraud-readers", f.select_payments([f.cmp("public.payments.amount", "=", 50)], true))) == 0

test_amount_equal_large if approvals("fraud-readers", f.select_payments([f.cmp("public.payments.amount", "=", "20000")], true)) == large

test_amount_unknown if {
	c := object.union(f.cmp("public.payments.amount", "=", null), {"known": false, "param": 1})
	approvals("fraud-readers", f.select_payments([c], true)) == large
}

test_amount_negated if {
	c := object.union(f.cmp("public.payments.amount", "<=", 10000), {"negated": true})
	approvals("fraud-readers", f.select_payments([c], true)) == large
}

test_amount_not_equal if approvals("fraud-readers", f.select_payments([f.cmp("public.payments.amount", "<>", 1)], true)) == large

test_amount_non_numeric if approvals("fraud-readers", f.select_payments([f.cmp("public.payments.amount", "=", "lots")], true)) == large

test_amount_upper_only if count(approvals("fraud-readers", f.select_payments([f.cmp("public.payments.amount", "<", 100)], true))) == 0

# --- payments-writers

insert_payment := f.statement({"command": "insert", "relations": [f.rel("public.payments", "write", ["amount"], true)]})

test_writer_insert if permits("payments-writers", insert_payment)

test_writer_update if permits("payments-writers", object.union(insert_payment, {"command": "update"}))

test_writer_delete_needs_approval if {
	d := object.union(insert_payment, {"command": "delete"})
	permits("payments-writers", d)
	approvals("payments-writers", d) == {"DELETE on payments needs an approval"}
}

test_writer_other_table if not permits("payments-writers", f.statement({"command": "insert", "relations": [f.rel("public.orders", "write", [], true)]}))

test_writer_insert_select_reads if {
	s := f.statement({"command": "insert", "relations": [f.rel("public.payments", "write", [], true), f.rel("public.customers", "read", ["card_number"], true)]})
	not permits("payments-writers", s)
}

test_writer_no_select if not permits("payments-writers", bounded_select)

test_writer_select_without_tables if permits("payments-writers", f.statement({}))

test_writer_housekeeping if permits("payments-writers", f.statement({"command": "show"}))

# --- dba and approvers

test_dba_anything if permits("dba", f.statement({"command": "ddl"}))

test_approvers_nothing if not permits("approvers", bounded_select)

# An unqualified user function is reported in pg_catalog by the analysis
# (the search order); only names PostgreSQL ships there count as built-ins.
test_reader_unqualified_user_function if not permits("fraud-readers", f.statement({"functions": [{"schema": "pg_catalog", "name": "wrap_anything", "qualified": false}]}))

test_reader_builtin_names_are_case_insensitive if permits("fraud-readers", f.statement({"functions": [{"schema": "pg_catalog", "name": "LOWER", "qualified": false}]}))
