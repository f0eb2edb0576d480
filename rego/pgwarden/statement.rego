# METADATA
# title: The statement decision
# description: |
#   data.pgwarden.statement.decision is what policyd asks for each message.
#   It combines the always-blocked list, the identity's groups and their
#   grants. Groups add up: a statement runs when one of the member groups
#   permits it, needs an approval only when every permitting group asks for
#   one, and is unmasked only for a group that reads raw data.
package pgwarden.statement

import rego.v1

import data.pgwarden.blocked
import data.pgwarden.groups
import data.pgwarden.lib.classification as cls

rules := data.pgwarden_data.rules

group_table := data.pgwarden_data.groups

statements := input.analysis.statements

member_groups := {g | some g in input.identity.groups; group_table[g]}

querying_groups := {g | some g in member_groups; group_table[g].may_query}

# statement index -> the member groups that permit it
permitting := {i: gs |
	some i, _ in statements
	gs := {g | some g in querying_groups; [g, i] in groups.permitted}
}

approval_keys := {[g, i] | some entry in groups.approval; g := entry[0]; i := entry[1]}

deny_reasons contains "no group of this identity may run statements" if count(querying_groups) == 0

deny_reasons contains msg if {
	count(querying_groups) > 0
	not database_allowed
	msg := sprintf("database %q is not allowed for groups %v", [input.session.database, sort_set(querying_groups)])
}

deny_reasons contains msg if {
	count(querying_groups) > 0
	some i, s in statements
	count(permitting[i]) == 0
	msg := sprintf("statement %d (%s) is not permitted for groups %v", [i + 1, s.command, sort_set(querying_groups)])
}

deny_reasons contains msg if some msg in blocked.reasons

database_allowed if {
	some g in querying_groups
	input.session.database in group_table[g].databases
}

sort_set(s) := sort([x | some x in s])

# Statement i needs an approval when no permitting group runs it without one.
approval_reasons contains reason if {
	some i, _ in statements
	p := permitting[i]
	count(p) > 0
	every g in p {
		[g, i] in approval_keys
	}
	some entry in groups.approval
	entry[0] in p
	entry[1] == i
	reason := entry[2]
}

default allow := false

allow if {
	input.analysis.parseable
	count(deny_reasons) == 0
}

needs_approval if {
	allow
	count(approval_reasons) > 0
}

verdict := "deny" if not allow

verdict := "hold" if needs_approval

verdict := "allow" if {
	allow
	not needs_approval
}

# Raw data only for a group with `unmasked` that permits every statement.
unmasked if {
	some g in querying_groups
	group_table[g].unmasked
	every i, _ in statements {
		[g, i] in groups.permitted
	}
}

mask_columns contains c if {
	some s in statements
	some r in s.relations
	some c in cls.pan_columns_of(r)
}

# A FETCH names a cursor, not what it reads: its rows get every PAN column's
# rule (by the column identity PostgreSQL sends with them), not only the
# content detection that misses a card number failing the Luhn check.
mask_columns contains c if {
	some s in statements
	s.command == "fetch"
	some c in cls.all_pan_columns
}

derived_columns contains o.position if {
	some s in statements
	some o in s.outputs
	derived_from_pan(o)
}

# An output computed from a PAN column, or from a whole row that has one.
derived_from_pan(o) if {
	o.kind == "expression"
	carries_pan(o)
}

# A card number reshaped past content detection (translate(), encode(),
# substr(), arithmetic) is hidden only by masking its column as a whole.
reshaped_pan(o) if {
	derived_from_pan(o)
	o.reshaped
}

# A table's `*` stands for as many columns as the table has, which the
# analysis does not know: the position of a reshaped card number after it
# is not the one the result has.
deny_reasons contains msg if {
	not unmasked
	some i, s in statements
	some star in s.outputs
	star.kind == "star"
	some o in s.outputs
	o.position > star.position
	reshaped_pan(o)
	msg := sprintf("statement %d: output %s is computed from a card number and follows a *; name the columns instead of * so the gateway can mask it", [i + 1, o.name])
}

# A reshaped card number is masked as a whole by its position in the
# result. COPY data carries no columns, and a cursor's or prepared
# statement's rows come back to a FETCH or EXECUTE whose text does not say
# what they are: there they are only content-scanned, which finds a cast or
# a JSON-wrapped card number but not a reshaped one. So those are refused
# for masked identities.
deny_reasons contains msg if {
	not unmasked
	some i, s in statements
	s.command in {"copy", "declare_cursor", "prepare"}
	some o in s.outputs
	reshaped_pan(o)
	msg := sprintf("statement %d (%s): output column %d (%s) reshapes a card number, which only a plain SELECT can mask as a whole", [i + 1, s.command, o.position + 1, o.name])
}

# A condition on a card number answers a question about its digits with a
# row or none, however the output is masked: `substr(card_number, 7, 1) =
# '3'`, LIKE '411111%', a range, a list of guesses (IN, = ANY, OR), a join
# with generated guesses. Repeated, or over many guesses at once, that
# rebuilds the number. A masked identity may compare a card number only
# for equality with one given value (a literal or a parameter: looking up
# a card it already holds) or with another card number column (a join),
# and test whether it is there at all (IS NULL, IS NOT NULL).
# The analysis reports the conditions of WHERE, JOIN (ON, USING, NATURAL)
# and HAVING, and expressions in ORDER BY, GROUP BY, DISTINCT ON and
# WINDOW keys, in subqueries and CTEs too.
deny_reasons contains msg if {
	not unmasked
	some i, s in statements
	some c in s.comparisons
	some src in c.sources
	pan_source(src)
	not single_value_lookup(c)
	not pan_join(c)
	not c.op in {"is_null", "is_not_null"}
	msg := sprintf("statement %d: a condition on %s other than equality with one value would reveal its digits; look a card up with card_number = <value>", [i + 1, src])
}

# Each lookup by value asks whether one guess is a card number. Enough of
# them enumerate what the mask hides (the middle six digits of a card whose
# first six and last four are known are some 10^5 candidates), so a masked
# identity has a budget of lookups per window. OPA keeps no state: the
# decision says how many lookups the message makes (card_lookups, every
# lookup term of every statement: ten lookups in one message, or joined by
# UNION ALL, count ten), policyd adds them up per identity and passes the
# count of the window in input.history. Such a decision depends on that
# count, which no cache key holds, so it is never reused (cacheable: false).
lookup_terms := {[i, j] |
	not unmasked
	some i, s in statements
	some j, c in s.comparisons
	lookup_term(c)
}

lookup_term(c) if {
	some src in c.sources
	pan_source(src)
	single_value_lookup(c)
}

card_lookup if count(lookup_terms) > 0

deny_reasons contains msg if {
	card_lookup
	used := input.history.card_lookups
	used + count(lookup_terms) > rules.card_lookups_per_window
	msg := sprintf("this message looks up %d card numbers by value and this identity looked up %d in the last %d seconds, the limit is %d; lookups resume as the window moves on (every one is in the audit trail)", [count(lookup_terms), used, input.history.window_seconds, rules.card_lookups_per_window])
}

# A prepared lookup runs again and again with new values: it is decided
# with its value at each execution. At a protocol Parse the value is not
# known yet; a hold there makes the gateway prepare the statement and ask
# again at every Bind, with the value (as for a large-amount read by
# parameter). SQL-level PREPARE is decided at each EXECUTE, whose analysis
# carries the arguments.
approval_reasons contains "a card lookup by parameter is decided at each execution, with its value" if lookup_awaits_value

lookup_awaits_value if {
	input.request.path == "parse"
	some [i, j] in lookup_terms
	c := statements[i].comparisons[j]
	is_number(c.param)
	not c.known
}

# What policyd counts: the lookups that run with this decision (none for the
# hold of a Parse that waits for its values).
default counted_lookups := 0

counted_lookups := count(lookup_terms) if not lookup_awaits_value

# Without the count the budget cannot be checked: fail closed.
deny_reasons contains "the policy input carries no count of this identity's card lookups (input.history); a lookup cannot be checked against its limit" if {
	card_lookup
	not is_number(object.get(input, ["history", "card_lookups"], null))
}

# UNION, INTERSECT and EXCEPT compare rows and sort them together: with
# chosen values on one side they answer the same questions.
deny_reasons contains msg if {
	not unmasked
	some i, s in statements
	some src in object.get(s, "set_operation_sources", [])
	pan_source(src)
	msg := sprintf("statement %d: UNION, INTERSECT or EXCEPT over %s would compare it with other values; query the card numbers without a set operation", [i + 1, src])
}

# A PAN column, or a whole row of a table that has one.
pan_source(src) if cls.is_column(src, "pan")

pan_source(src) if {
	endswith(src, ".*")
	count(cls.table_columns(trim_suffix(src, ".*"), "pan")) > 0
}

# Equality with another card number column as stored (a join of two
# cardholder tables), not with a column computed in a subquery (which could
# be a guess: CASE WHEN ... THEN '4111...' ELSE card_number END). An
# unqualified name has a candidate in each schema of the search path.
pan_join(c) if {
	c.op == "="
	object.get(c, "other_plain", false)
	other := object.get(c, "other_sources", [])
	pans := {o | some o in other; cls.is_column(o, "pan")}
	count(pans) > 0
	every o in other {
		some p in pans
		table_column(o) == table_column(p)
	}
}

table_column(src) := concat(".", array.slice(split(src, "."), 1, 3))

single_value_lookup(c) if {
	c.op == "="
	not c.negated
	not c.disjunctive
	given_value(c)
}

# A literal or a bind parameter: not an expression, which can range over
# every guess at once (card_number = '411111' || lpad(g::text, 6, '0') ||
# '1111' with g from generate_series returns the middle digits as g).
given_value(c) if c.known

given_value(c) if is_number(c.param)

# Binary COPY data carries neither column identities nor types
# (CopyOutResponse has formats only): the gateway masks a card number there
# by its position, which the plan gives (column_positions, and
# derived_columns for computed ones). A table's `*` has no known width, so
# a card number in it or after it has no position: refused for a masked
# identity. Text and CSV COPY mask every long digit run instead.
deny_reasons contains msg if {
	not unmasked
	some i, s in statements
	binary_copy(s)
	some o in s.outputs
	carries_pan(o)
	unknown_position(s, o)
	msg := sprintf("statement %d (copy): binary COPY of a card number (output %s) needs the columns named, not *, so the gateway can mask it by position", [i + 1, o.name])
}

binary_copy(s) if {
	s.command == "copy"
	object.get(s, "copy_format", "text") == "binary"
}

unknown_position(_, o) if o.kind == "star"

unknown_position(s, o) if {
	some star in s.outputs
	star.kind == "star"
	o.position > star.position
}

column_positions contains {"position": o.position, "column": src} if {
	some s in statements
	binary_copy(s)
	some o in s.outputs
	o.kind == "column"
	not unknown_position(s, o)
	some src in o.sources
	cls.is_column(src, "pan")
}

# An output that holds a card number: a PAN column, a table's `*` or whole
# row with one, or anything computed from them.
carries_pan(o) if {
	some src in o.sources
	pan_source(src)
}

# PostgreSQL quotes the value it failed on in an error (a cast, a date, a
# JSON token, a violated constraint's row), and an expression can first
# reshape a card number past any detector:
# translate(card_number, '0123456789', 'abcdefghij')::int. So the server's
# error text is withheld from a masked identity for a statement that reads
# rows of a cardholder table, or reads a cursor or a prepared statement
# whose query it does not show (FETCH, EXECUTE). An INSERT of the client's
# own values (no read, no DO UPDATE) keeps it: its errors quote those.
default withhold_errors := false

withhold_errors if {
	some s in statements
	some r in s.relations
	cls.is_cardholder(r)
	not inserts_given_values(s)
}

withhold_errors if {
	some s in statements
	s.command in {"fetch", "execute"}
}

inserts_given_values(s) if {
	s.command == "insert"
	object.get(s, "on_conflict", "") != "update"
	every r in s.relations {
		r.access == "write"
	}
}

default mask := {"rules": [], "derived_columns": [], "scan_content": true, "unmasked": false, "withhold_errors": true, "column_positions": []}

mask := {"rules": [], "derived_columns": [], "scan_content": false, "unmasked": true, "withhold_errors": false, "column_positions": []} if unmasked

mask := {
	"rules": [{"column": c, "style": data.pgwarden_data.classification.pan_mask_style} | some c in sort_set(mask_columns)],
	"derived_columns": sort_set(derived_columns),
	"scan_content": true,
	"unmasked": false,
	"withhold_errors": withhold_errors,
	"column_positions": sort_set(column_positions),
} if not unmasked

record_rows := "masked_rows" if {
	some g in querying_groups
	group_table[g].record_rows == "masked_rows"
	every i, _ in statements {
		[g, i] in groups.permitted
	}
} else := "count"

# Bytes of DataRow and CopyData one execution may return: the most generous
# of the identity's querying groups (groups add up), where a group without
# `max_result_bytes` sets no limit. null: no limit from the policy (the
# gateway's tap.max_result_bytes may still set one; the smaller applies).
result_limits := [n | some g in querying_groups; n := object.get(group_table[g], "max_result_bytes", null)]

default max_result_bytes := null

max_result_bytes := max(result_limits) if {
	count(result_limits) > 0
	every n in result_limits {
		is_number(n)
	}
}

allow_reasons contains msg if {
	allow
	some i, _ in statements
	msg := sprintf("statement %d permitted for %v", [i + 1, sort_set(permitting[i])])
}

decision := {
	"allow": allow,
	"verdict": verdict,
	"reasons": array.concat(sort_set(deny_reasons), array.concat(sort_set(approval_reasons), sort_set(allow_reasons))),
	"approval": {
		"required": needs_approval,
		"reason": concat("; ", sort_set(approval_reasons)),
		"approver_groups": rules.approval.approver_groups,
		"hold_seconds": rules.approval.hold_seconds,
	},
	"mask": mask,
	"record_rows": record_rows,
	"sqlstate": rules.sqlstate,
	"max_result_bytes": max_result_bytes,
	"card_lookups": counted_lookups,
	"cacheable": count(lookup_terms) == 0,
}

default needs_approval := false
