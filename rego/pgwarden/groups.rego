# METADATA
# title: What each group may do
# description: |
#   `permitted` holds [group, i] when the group may run statement i of the
#   message; `approval` holds [group, i, reason] when it may only after a
#   human approval. A statement no member group permits is refused
#   (deny by default). The always-blocked list (pgwarden.blocked) applies on
#   top, to every group.
package pgwarden.groups

import rego.v1

import data.pgwarden.lib.classification as cls

rules := data.pgwarden_data.rules

statements := input.analysis.statements

# --- shared helpers ----------------------------------------------------------

# Rules of a group only run for its members (and cost nothing otherwise).
member(group) if group in input.identity.groups

# Session housekeeping any querying group may do.
session_commands := {"transaction", "show", "discard", "deallocate", "fetch", "close", "empty", "listen"}

housekeeping(s) if s.command in session_commands

housekeeping(s) if {
	s.command == "set"
	not s.set_role
	not s.session_authorization
	not shadows_catalog(s)
}

# `SET search_path = evil, pg_catalog` makes an unqualified lower() run
# evil.lower(): built-ins must stay first for non-administrators.
shadows_catalog(s) if {
	s.setting == "search_path"
	some i, schema in s.search_path
	schema == "pg_catalog"
	i > 0
}

read_only(s) if {
	every r in s.relations {
		r.access == "read"
	}
	not s.data_modifying_cte
	not s.select_into
}

# A function the pack knows to be harmless for a non-administrator: a
# built-in (pg_catalog) that is not on the administrative list, or one named
# in data.pgwarden_data.rules.allowed_functions. User functions may wrap
# anything and are refused by default.
function_known(f) if {
	f.schema == "pg_catalog"
	builtin(f.name)
	not lower(f.name) in rules.admin_functions
}

function_known(f) if concat(".", [f.schema, f.name]) in rules.allowed_functions

# The analysis does not see the catalog: an unqualified call resolves through
# pg_catalog first, so it reports pg_catalog for any name. Only a name
# PostgreSQL ships there is a built-in (rego/pgwarden_data/builtin_functions.json,
# from scripts/gen_builtin_functions.py); `wrap_anything()` from public is not.
builtin(name) if data.pgwarden_data.builtin_functions.names[lower(name)]

functions_known(s) if {
	every f in s.functions {
		function_known(f)
	}
}

# --- fraud-readers: read cardholder data, masked -----------------------------

reader_commands := {"select", "declare_cursor"}

reader_statement(s) if {
	s.command in reader_commands
	read_only(s)
	functions_known(s)
}

reader_statement(s) if {
	s.command == "explain"
	not s.explain_analyze
	read_only(s)
	functions_known(s)
}

reader_statement(s) if {
	s.command == "prepare"
	s.prepared_command == "select"
	read_only(s)
	functions_known(s)
}

# COPY ... TO STDOUT: the same read, delivered as COPY data (masked by the
# gateway like rows). Never to a file or a program on the server.
reader_statement(s) if {
	s.command == "copy"
	s.copy_direction == "to"
	s.copy_stdio
	not s.copy_program
	read_only(s)
	functions_known(s)
}

# EXECUTE of a statement prepared in the same message (judged there).
reader_statement(s) if {
	s.command == "execute"
	not s.opaque_sql
	functions_known(s)
}

permitted contains ["fraud-readers", i] if {
	member("fraud-readers")
	some i, s in statements
	housekeeping(s)
}

permitted contains ["fraud-readers", i] if {
	member("fraud-readers")
	some i, s in statements
	reader_statement(s)
}

approval contains ["fraud-readers", i, reason] if {
	member("fraud-readers")
	some i, s in statements
	some r in s.relations
	r.access == "read"
	cls.is_cardholder(r)
	not r.bounded
	reason := sprintf("unbounded read of cardholder table %s.%s (no WHERE on it, no LIMIT)", [r.schema, r.name])
}

approval contains ["fraud-readers", i, reason] if {
	member("fraud-readers")
	some i, s in statements
	large_amount_read(s)
	reason := sprintf("read of %s above %v", [rules.approval.amount_column, rules.approval.large_amount])
}

# --- the large-amount rule ---------------------------------------------------
# A read "with amount > threshold" is any WHERE that can select rows above the
# threshold through a condition on the amount column: a lower bound not
# capped by an upper bound at or below the threshold, an equality above it, a
# value the gateway does not know (unbound parameter, expression), or a
# negated condition. Conservative on purpose: when unsure, ask a human.

amount_terms(s) := [c |
	some c in s.comparisons
	rules.approval.amount_column in c.sources
]

num(v) := v if is_number(v)

num(v) := to_number(v) if {
	is_string(v)
	regex.match(`^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$`, v)
}

capped(s, level) if {
	some c in amount_terms(s)
	c.level == level
	c.op in {"<", "<="}
	c.known
	not c.negated
	not c.disjunctive
	num(c.value) <= rules.approval.large_amount
}

large_amount_term(s, c) if {
	c.op in {">", ">="}
	not capped(s, c.level)
}

large_amount_term(_, c) if {
	c.op == "="
	num(c.value) > rules.approval.large_amount
}

large_amount_term(_, c) if not c.known

large_amount_term(_, c) if c.negated

large_amount_term(_, c) if c.op in {"<>", "!=", "~~", "!~~", "~~*", "!~~*"}

large_amount_term(_, c) if {
	c.known
	c.value != null
	not num(c.value)
}

large_amount_read(s) if {
	some c in amount_terms(s)
	large_amount_term(s, c)
}

# --- payments-writers: INSERT/UPDATE on payments, DELETE after approval -----

payments_table := "public.payments"

writes_only_payments(s) if {
	count(s.relations) > 0
	every r in s.relations {
		r.access == "write"
		cls.is_table(r, payments_table)
	}
	not s.data_modifying_cte
}

writer_statement(s) if {
	s.command in {"insert", "update", "delete"}
	writes_only_payments(s)
	functions_known(s)
}

permitted contains ["payments-writers", i] if {
	member("payments-writers")
	some i, s in statements
	housekeeping(s)
}

permitted contains ["payments-writers", i] if {
	member("payments-writers")
	some i, s in statements
	writer_statement(s)
}

# `SELECT 1`, `SELECT now()`: drivers and pools check connections this way.
permitted contains ["payments-writers", i] if {
	member("payments-writers")
	some i, s in statements
	s.command == "select"
	count(s.relations) == 0
	functions_known(s)
}

approval contains ["payments-writers", i, "DELETE on payments needs an approval"] if {
	member("payments-writers")
	some i, s in statements
	s.command == "delete"
	writer_statement(s)
}

# --- dba: everything but the always-blocked list, unmasked, recorded --------

permitted contains ["dba", i] if {
	member("dba")
	some i, _ in statements
}

# --- approvers: approve holds, run nothing -----------------------------------
# (no rule: an approver's statements are refused by default)
