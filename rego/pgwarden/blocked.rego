# METADATA
# title: Always-blocked statements
# description: |
#   Statements no group may run, whatever its other grants: they change who
#   is who (roles, grants, SET ROLE), reach the server's file system or
#   processes, take the database away, run code PostgreSQL does not sandbox,
#   hide the SQL that would run (dynamic SQL), or read sensitive
#   authentication data (PCI DSS 3.3.1). Each rule adds a reason; one reason
#   refuses the whole message.
package pgwarden.blocked

import rego.v1

import data.pgwarden.lib.classification as cls

rules := data.pgwarden_data.rules

statements := input.analysis.statements

reasons contains msg if {
	not input.analysis.parseable
	msg := "the statement could not be parsed, and what is not understood is refused"
}

# Analysis flags that block a statement whatever the group. One rule walks
# them all: cheaper for OPA than one rule per flag, on every decision.
flag_reasons := {
	"drop_database": "DROP DATABASE is always blocked",
	"role_statement": "role statements (CREATE/ALTER/DROP ROLE, USER or GROUP) are always blocked",
	"grant": "GRANT and REVOKE are always blocked",
	"alter_system": "ALTER SYSTEM is always blocked",
	"copy_program": "COPY ... PROGRAM is always blocked",
	"untrusted_language": "functions in untrusted languages are always blocked",
	"set_role": "SET ROLE and SET SESSION AUTHORIZATION are always blocked: the gateway chooses the role",
	"session_authorization": "SET ROLE and SET SESSION AUTHORIZATION are always blocked: the gateway chooses the role",
}

reasons contains msg if {
	some s in statements
	some flag, msg in flag_reasons
	s[flag] == true
}

reasons contains "COPY to or from a server file is always blocked; use STDIN/STDOUT" if {
	some s in statements
	s.command == "copy"
	not s.copy_program
	not s.copy_stdio
}

reasons contains msg if {
	some s in statements
	some f in s.functions
	lower(f.name) in rules.forbidden_functions
	msg := sprintf("server file access function %s is always blocked", [f.name])
}

reasons contains "LOAD of a server library is always blocked" if {
	some s in statements
	s.command == "load"
}

dynamic_sql_allowed if {
	some g in input.identity.groups
	g in rules.dynamic_sql_groups
}

reasons contains "dynamic SQL (DO, EXECUTE of a statement prepared elsewhere, opaque function bodies) is blocked" if {
	some s in statements
	s.dynamic_sql
	not dynamic_sql_allowed
}

reasons contains "dynamic SQL (DO, EXECUTE of a statement prepared elsewhere, opaque function bodies) is blocked" if {
	some s in statements
	s.opaque_sql
	not dynamic_sql_allowed
}

reasons contains msg if {
	some s in statements
	some f in s.functions
	lower(f.name) in rules.dynamic_sql_functions
	not dynamic_sql_allowed
	msg := sprintf("function %s runs SQL the gateway cannot see and is blocked", [f.name])
}

reasons contains msg if {
	some s in statements
	some r in s.relations
	cls.touches(r, "sad")
	msg := sprintf("%s.%s holds sensitive authentication data, which is never read or stored (PCI DSS 3.3.1)", [r.schema, r.name])
}
