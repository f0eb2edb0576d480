package pgwarden.statement_test

import rego.v1

import data.pgwarden.fixtures_test as f
import data.pgwarden.statement

decide(groups, statements) := d if {
	d := statement.decision with input as f.message(groups, statements)
}

read_pan := f.statement({
	"relations": [f.rel("public.payments", "read", ["card_number", "id"], true)],
	"outputs": [
		{"position": 0, "name": "id", "sources": ["public.payments.id"], "kind": "column"},
		{"position": 1, "name": "x", "sources": ["public.payments.card_number"], "kind": "expression"},
		{"position": 2, "name": "y", "sources": ["public.payments.*"], "kind": "expression"},
	],
})

test_reader_allowed_masked if {
	d := decide(["fraud-readers"], [read_pan])
	d.allow
	d.verdict == "allow"
	d.mask.rules == [{"column": "public.payments.card_number", "style": "last4"}]
	d.mask.derived_columns == [1, 2]
	d.mask.scan_content
	not d.mask.unmasked
	d.record_rows == "count"
	d.sqlstate == "42501"
}

test_large_amount_is_hold if {
	d := decide(["fraud-readers"], [f.select_payments([f.cmp("public.payments.amount", ">", 10000)], true)])
	d.verdict == "hold"
	d.approval.required
	d.approval.approver_groups == ["approvers"]
	d.approval.hold_seconds == 120
	d.approval.reason == "read of public.payments.amount above 10000"
}

test_dba_unmasked_and_recorded if {
	d := decide(["dba"], [f.select_payments([f.cmp("public.payments.amount", ">", 10000)], true)])
	d.verdict == "allow"
	d.mask.unmasked
	not d.mask.scan_content
	d.record_rows == "masked_rows"
}

test_groups_add_up if {
	d := decide(["fraud-readers", "dba"], [f.select_payments([f.cmp("public.payments.amount", ">", 10000)], true)])
	d.verdict == "allow"
}

test_approvers_may_not_query if {
	d := decide(["approvers"], [read_pan])
	d.verdict == "deny"
	d.reasons == ["no group of this identity may run statements"]
}

test_unknown_group if decide(["strangers"], [read_pan]).verdict == "deny"

test_wrong_database if {
	msg := object.union(f.message(["fraud-readers"], [read_pan]), {"session": {"database": "postgres"}})
	d := statement.decision with input as msg
	d.verdict == "deny"
	d.reasons == [`database "postgres" is not allowed for groups ["fraud-readers"]`]
}

test_one_denied_statement_denies_message if {
	d := decide(["fraud-readers"], [read_pan, f.statement({"command": "delete", "relations": [f.rel("public.payments", "write", [], true)]})])
	d.verdict == "deny"
	d.reasons == [`statement 2 (delete) is not permitted for groups ["fraud-readers"]`]
}

test_blocked_beats_dba if {
	d := decide(["dba"], [f.statement({"command": "drop_database", "drop_database": true})])
	d.verdict == "deny"
	d.reasons == ["DROP DATABASE is always blocked"]
}

test_unparseable_denied if {
	msg := object.union(f.message(["dba"], []), {"analysis": {"parseable": false, "statements": []}})
	d := statement.decision with input as msg
	d.verdict == "deny"
	not d.allow
}

test_approval_only_if_every_permitting_group_asks if {
	# payments-writers permit the DELETE only with approval; dba without.
	del := f.statement({"command": "delete", "relations": [f.rel("public.payments", "write", [], true)]})
	decide(["payments-writers"], [del]).verdict == "hold"
	decide(["payments-writers", "dba"], [del]).verdict == "allow"
}

test_mixed_groups_masked_unless_unmasked_group_permits_all if {
	ins := f.statement({"command": "insert", "relations": [f.rel("public.payments", "write", ["card_number"], true)]})
	d := decide(["payments-writers"], [ins])
	d.verdict == "allow"
	not d.mask.unmasked
	d.mask.rules == [{"column": "public.payments.card_number", "style": "last4"}]
}

test_result_limit_per_group if {
	decide(["fraud-readers"], [read_pan]).max_result_bytes == 268435456
	decide(["payments-writers"], [f.statement({})]).max_result_bytes == 67108864
	decide(["dba"], [read_pan]).max_result_bytes == null
}

test_result_limit_most_generous_group_wins if {
	# groups add up: the larger limit of two, and no limit when one has none
	decide(["fraud-readers", "payments-writers"], [read_pan]).max_result_bytes == 268435456
	decide(["fraud-readers", "dba"], [read_pan]).max_result_bytes == null
}

test_result_limit_ignores_groups_that_may_not_query if {
	decide(["fraud-readers", "approvers"], [read_pan]).max_result_bytes == 268435456
}

# Error text of statements that read cardholder rows is withheld from masked
# identities (a cast error quotes the reshaped value it failed on).
test_reader_errors_withheld_for_cardholder_reads if {
	decide(["fraud-readers"], [read_pan]).mask.withhold_errors
	decide(["fraud-readers"], [f.select_payments([], true)]).mask.withhold_errors
}

test_errors_kept_without_cardholder_tables if {
	d := decide(["fraud-readers"], [f.statement({"relations": [f.rel("public.merchants", "read", ["name"], true)]})])
	d.verdict == "allow"
	not d.mask.withhold_errors
	not decide(["fraud-readers"], [f.statement({})]).mask.withhold_errors
}

test_errors_withheld_for_cursor_and_prepared_reads if {
	decide(["fraud-readers"], [f.statement({"command": "fetch"})]).mask.withhold_errors
	decide(["fraud-readers"], [f.statement({"command": "execute"})]).mask.withhold_errors
}

test_dba_errors_never_withheld if {
	not decide(["dba"], [read_pan]).mask.withhold_errors
	not decide(["dba"], [f.statement({"command": "fetch"})]).mask.withhold_errors
}

insert_payment(overrides) := f.statement(object.union(
	{"command": "insert", "relations": [f.rel("public.payments", "write", ["card_number"], true)]},
	overrides,
))

test_insert_of_given_values_keeps_errors if {
	not decide(["payments-writers"], [insert_payment({})]).mask.withhold_errors
	not decide(["payments-writers"], [insert_payment({"on_conflict": "nothing"})]).mask.withhold_errors
}

test_insert_reading_rows_withholds_errors if {
	decide(["payments-writers"], [insert_payment({"on_conflict": "update"})]).mask.withhold_errors
	with_read := insert_payment({"relations": [
		f.rel("public.payments", "write", ["card_number"], true),
		f.rel("public.payments", "read", ["card_number"], true),
	]})
	decide(["payments-writers"], [with_read]).mask.withhold_errors
	upd := f.statement({"command": "update", "relations": [f.rel("public.payments", "write", ["amount"], true)]})
	decide(["payments-writers"], [upd]).mask.withhold_errors
}

computed_pan_output := [{"position": 0, "name": "t", "sources": ["public.payments.card_number"], "kind": "expression", "reshaped": true}]

test_computed_card_numbers_refused_where_rows_lose_their_columns if {
	every command in ["copy", "declare_cursor", "prepare"] {
		d := decide(["fraud-readers"], [f.statement({
			"command": command, "copy_direction": "to", "copy_stdio": true, "copy_program": false,
			"prepared_command": "select",
			"relations": [f.rel("public.payments", "read", ["card_number"], true)],
			"outputs": computed_pan_output,
		})])
		d.verdict == "deny"
		d.reasons == [sprintf("statement 1 (%s): output column 1 (t) reshapes a card number, which only a plain SELECT can mask as a whole", [command])]
	}
}

test_cast_card_numbers_in_copy_and_cursors_are_served if {
	# content detection still finds a card number cast or wrapped in JSON
	every command in ["copy", "declare_cursor"] {
		d := decide(["fraud-readers"], [f.statement({
			"command": command, "copy_direction": "to", "copy_stdio": true, "copy_program": false,
			"relations": [f.rel("public.payments", "read", ["card_number"], true)],
			"outputs": [object.union(computed_pan_output[0], {"reshaped": false})],
		})])
		d.verdict == "allow"
	}
}

test_computed_card_numbers_in_a_select_are_masked_not_refused if {
	d := decide(["fraud-readers"], [f.statement({
		"relations": [f.rel("public.payments", "read", ["card_number"], true)],
		"outputs": computed_pan_output,
	})])
	d.verdict == "allow"
	d.mask.derived_columns == [0]
}

test_plain_card_number_columns_in_a_cursor_are_allowed if {
	d := decide(["fraud-readers"], [f.statement({
		"command": "declare_cursor",
		"relations": [f.rel("public.payments", "read", ["card_number"], true)],
		"outputs": [{"position": 0, "name": "card_number", "sources": ["public.payments.card_number"], "kind": "column"}],
	})])
	d.verdict == "allow"
}

test_dba_copies_computed_card_numbers if {
	d := decide(["dba"], [f.statement({
		"command": "copy", "copy_direction": "to", "copy_stdio": true, "copy_program": false,
		"relations": [f.rel("public.payments", "read", ["card_number"], true)],
		"outputs": computed_pan_output,
	})])
	d.verdict == "allow"
}

test_computed_card_number_after_a_star_refused if {
	star := {"position": 0, "name": "*", "sources": ["public.payments.*"], "kind": "star"}
	t := {"position": 1, "name": "t", "sources": ["public.payments.card_number"], "kind": "expression", "reshaped": true}
	stmt := f.statement({"relations": [f.rel("public.payments", "read", ["*"], true)], "outputs": [star, t]})
	d := decide(["fraud-readers"], [stmt])
	d.verdict == "deny"
	d.reasons == ["statement 1: output t is computed from a card number and follows a *; name the columns instead of * so the gateway can mask it"]

	# before the star its position is known
	before := f.statement({"relations": [f.rel("public.payments", "read", ["*"], true)], "outputs": [object.union(t, {"position": 0}), object.union(star, {"position": 1})]})
	decide(["fraud-readers"], [before]).verdict == "allow"
	decide(["dba"], [stmt]).verdict == "allow"
}

test_fetch_rows_get_every_pan_column_rule if {
	d := decide(["fraud-readers"], [f.statement({"command": "fetch"})])
	d.verdict == "allow"
	d.mask.rules == [
		{"column": "public.customers.card_number", "style": "last4"},
		{"column": "public.payments.card_number", "style": "last4"},
	]
	decide(["dba"], [f.statement({"command": "fetch"})]).mask.unmasked
}

binary_copy_of(outputs) := f.statement({
	"command": "copy", "copy_direction": "to", "copy_stdio": true, "copy_program": false,
	"copy_format": "binary",
	"relations": [f.rel("public.payments", "read", ["id", "card_number"], true)],
	"outputs": outputs,
})

id_output := {"position": 0, "name": "id", "sources": ["public.payments.id"], "kind": "column"}

pan_output(position) := {"position": position, "name": "card_number", "sources": ["public.payments.card_number"], "kind": "column"}

star_output := {"position": 0, "name": "*", "sources": ["public.payments.*"], "kind": "star"}

test_binary_copy_masks_card_numbers_by_position if {
	d := decide(["fraud-readers"], [binary_copy_of([id_output, pan_output(1)])])
	d.verdict == "allow"
	d.mask.column_positions == [{"position": 1, "column": "public.payments.card_number"}]
	some rule in d.mask.rules
	rule.column == "public.payments.card_number"
	text := decide(["fraud-readers"], [object.union(binary_copy_of([pan_output(0)]), {"copy_format": "csv"})])
	text.mask.column_positions == []
	decide(["dba"], [binary_copy_of([pan_output(0)])]).mask.column_positions == []
}

test_binary_copy_of_card_numbers_without_a_position_refused if {
	every outputs in [[star_output], [star_output, pan_output(1)]] {
		d := decide(["fraud-readers"], [binary_copy_of(outputs)])
		d.verdict == "deny"
		d.reasons == sort([sprintf("statement 1 (copy): binary COPY of a card number (output %s) needs the columns named, not *, so the gateway can mask it by position", [o.name]) | some o in outputs])
	}
	decide(["dba"], [binary_copy_of([star_output])]).verdict == "allow"
	decide(["fraud-readers"], [object.union(binary_copy_of([star_output]), {"copy_format": "text"})]).verdict == "allow"
}

pan_condition(c) := f.statement({
	"relations": [f.rel("public.payments", "read", ["id", "card_number"], true)],
	"comparisons": [f.cmp("public.payments.id", "=", 5), c],
	"outputs": [id_output],
})

test_conditions_on_a_card_number_that_reveal_digits_refused if {
	every c in [
		f.cmp("public.payments.card_number", "ref", null),
		f.cmp("public.payments.card_number", "like", "4111%"),
		f.cmp("public.payments.card_number", ">", "4"),
		object.union(f.cmp("public.payments.card_number", "=", "1"), {"disjunctive": true}),
		object.union(f.cmp("public.payments.card_number", "=", "1"), {"negated": true}),
		object.union(f.cmp("public.payments.card_number", "=", null), {"known": false}),
		object.union(f.cmp("public.payments.card_number", "=", null), {"known": false, "disjunctive": true, "other_sources": ["v.card_number"]}),
		object.union(f.cmp("public.payments.*", "ref", null), {"column": "*"}),
	] {
		d := decide(["fraud-readers"], [pan_condition(c)])
		d.verdict == "deny"
		d.reasons == [sprintf("statement 1: a condition on %s other than equality with one value would reveal its digits; look a card up with card_number = <value>", [c.sources[0]])]
	}
}

test_a_card_number_lookup_and_unmasked_conditions_are_served if {
	decide(["fraud-readers"], [pan_condition(f.cmp("public.payments.card_number", "=", "[redacted]"))]).verdict == "allow"
	by_param := object.union(f.cmp("public.payments.card_number", "=", null), {"known": false, "param": 1})
	at_parse := statement.decision with input as object.union(f.message(["fraud-readers"], [pan_condition(by_param)]), {"request": {"path": "parse", "statement_name": "", "param_count": null}})
	at_parse.verdict == "hold"
	at_parse.approval.reason == "a card lookup by parameter is decided at each execution, with its value"
	at_parse.card_lookups == 0 # counted at each Bind, not at Parse
	at_parse.cacheable == false
	at_bind := object.union(by_param, {"known": true, "value": "[redacted]"})
	decide(["fraud-readers"], [pan_condition(at_bind)]).verdict == "allow"
	join := object.union(f.cmp("public.payments.card_number", "=", null), {"known": false, "disjunctive": true, "other_plain": true, "other_sources": ["app.customers.card_number", "public.customers.card_number"]})
	decide(["fraud-readers"], [pan_condition(join)]).verdict == "allow"
	computed := object.union(join, {"other_plain": false})
	decide(["fraud-readers"], [pan_condition(computed)]).verdict == "deny"
	mixed := object.union(join, {"other_sources": ["public.customers.card_number", "public.customers.id"]})
	decide(["fraud-readers"], [pan_condition(mixed)]).verdict == "deny"
	decide(["dba"], [pan_condition(f.cmp("public.payments.card_number", "like", "4%"))]).verdict == "allow"
	every op in ["is_null", "is_not_null"] {
		presence := object.union(f.cmp("public.payments.card_number", op, null), {"known": false, "negated": true, "disjunctive": true})
		decide(["fraud-readers"], [pan_condition(presence)]).verdict == "allow"
	}
	decide(["fraud-readers"], [pan_condition(f.cmp("public.payments.merchant", "like", "4%"))]).verdict == "allow"
}

lookup_by_value := pan_condition(f.cmp("public.payments.card_number", "=", "[redacted]"))

with_history(groups, statements, history) := object.union(f.message(groups, statements), {"history": history})

test_card_lookups_are_counted_and_limited if {
	d := decide(["fraud-readers"], [lookup_by_value])
	d.verdict == "allow"
	d.card_lookups == 1
	d.cacheable == false
	limit := data.pgwarden_data.rules.card_lookups_per_window
	spent := statement.decision with input as with_history(["fraud-readers"], [lookup_by_value], {"card_lookups": limit, "window_seconds": 3600})
	spent.verdict == "deny"
	spent.reasons == [sprintf("this message looks up 1 card numbers by value and this identity looked up %d in the last 3600 seconds, the limit is %d; lookups resume as the window moves on (every one is in the audit trail)", [limit, limit])]
	last := statement.decision with input as with_history(["fraud-readers"], [lookup_by_value], {"card_lookups": limit - 1, "window_seconds": 3600})
	last.verdict == "allow"
}

test_every_lookup_of_a_message_counts if {
	two_terms := f.statement({
		"relations": [f.rel("public.payments", "read", ["id", "card_number"], true)],
		"comparisons": [f.cmp("public.payments.card_number", "=", "[redacted]"), f.cmp("public.payments.card_number", "=", "[redacted]")],
		"outputs": [id_output],
	})
	d := decide(["fraud-readers"], [lookup_by_value, lookup_by_value, two_terms])
	d.verdict == "allow"
	d.card_lookups == 4
	limit := data.pgwarden_data.rules.card_lookups_per_window
	over := statement.decision with input as with_history(["fraud-readers"], [lookup_by_value, two_terms], {"card_lookups": limit - 2, "window_seconds": 3600})
	over.verdict == "deny"
}

test_a_card_lookup_without_history_is_refused if {
	msg := object.remove(f.message(["fraud-readers"], [lookup_by_value]), ["history"])
	d := statement.decision with input as msg
	d.verdict == "deny"
	d.reasons == ["the policy input carries no count of this identity's card lookups (input.history); a lookup cannot be checked against its limit"]
}

test_what_is_not_a_card_lookup_is_not_counted if {
	limit := data.pgwarden_data.rules.card_lookups_per_window
	spent := {"card_lookups": limit, "window_seconds": 3600}
	join := object.union(f.cmp("public.payments.card_number", "=", null), {"known": false, "disjunctive": true, "other_plain": true, "other_sources": ["public.customers.card_number"]})
	every st in [pan_condition(join), pan_condition(f.cmp("public.payments.id", "=", 5))] {
		d := statement.decision with input as with_history(["fraud-readers"], [st], spent)
		d.verdict == "allow"
		d.card_lookups == 0
		d.cacheable
	}
	dba := statement.decision with input as with_history(["dba"], [lookup_by_value], spent)
	dba.verdict == "allow"
	dba.card_lookups == 0
}

test_set_operations_over_card_numbers_refused_for_masked_identities if {
	st := f.statement({
		"relations": [f.rel("public.payments", "read", ["card_number"], true)],
		"outputs": [{"position": 0, "name": "card_number", "sources": ["public.payments.card_number"], "kind": "expression"}],
		"set_operation_sources": ["public.payments.card_number"],
	})
	d := decide(["fraud-readers"], [st])
	d.verdict == "deny"
	d.reasons == ["statement 1: UNION, INTERSECT or EXCEPT over public.payments.card_number would compare it with other values; query the card numbers without a set operation"]
	decide(["dba"], [st]).verdict == "allow"
	decide(["fraud-readers"], [object.union(st, {"set_operation_sources": ["public.payments.id"]})]).verdict == "allow"
}
