package pgwarden.blocked_test

import rego.v1

import data.pgwarden.blocked
import data.pgwarden.fixtures_test as f

blocked_for(stmt) := r if {
	r := blocked.reasons with input as f.message(["dba"], [stmt])
}

test_plain_select_not_blocked if count(blocked_for(f.statement({}))) == 0

test_unparseable if {
	msg := object.union(f.message(["dba"], []), {"analysis": {"parseable": false, "statements": []}})
	count(blocked.reasons) == 1 with input as msg
}

test_drop_database if "DROP DATABASE is always blocked" in blocked_for(f.statement({"command": "drop_database", "drop_database": true}))

test_role_statement if count(blocked_for(f.statement({"command": "role", "role_statement": true}))) == 1

test_grant if "GRANT and REVOKE are always blocked" in blocked_for(f.statement({"command": "grant", "grant": true}))

test_alter_system if "ALTER SYSTEM is always blocked" in blocked_for(f.statement({"command": "alter_system", "alter_system": true}))

test_copy_program if {
	r := blocked_for(f.statement({"command": "copy", "copy_program": true, "copy_stdio": false}))
	"COPY ... PROGRAM is always blocked" in r
	count(r) == 1
}

test_copy_server_file if count(blocked_for(f.statement({"command": "copy", "copy_program": false, "copy_stdio": false}))) == 1

test_copy_stdout_not_blocked if count(blocked_for(f.statement({"command": "copy", "copy_program": false, "copy_stdio": true}))) == 0

test_file_function if {
	s := f.statement({"functions": [{"schema": "pg_catalog", "name": "pg_read_file", "qualified": true}]})
	"server file access function pg_read_file is always blocked" in blocked_for(s)
}

test_file_function_any_case if {
	s := f.statement({"functions": [{"schema": "evil", "name": "LO_EXPORT", "qualified": true}]})
	count(blocked_for(s)) == 1
}

test_untrusted_language if count(blocked_for(f.statement({"command": "create_function", "untrusted_language": true}))) == 1

test_set_role if count(blocked_for(f.statement({"command": "set", "set_role": true}))) == 1

test_session_authorization if count(blocked_for(f.statement({"command": "set", "session_authorization": true}))) == 1

test_load if count(blocked_for(f.statement({"command": "load"}))) == 1

test_dynamic_sql if count(blocked_for(f.statement({"command": "do", "dynamic_sql": true}))) == 1

test_opaque_sql if count(blocked_for(f.statement({"command": "execute", "opaque_sql": true}))) == 1

test_dynamic_sql_allowed_by_data if {
	r := blocked.reasons with input as f.message(["dba"], [f.statement({"command": "do", "dynamic_sql": true})])
		with data.pgwarden_data.rules.dynamic_sql_groups as ["dba"]
	count(r) == 0
}

test_dynamic_sql_function if {
	s := f.statement({"functions": [{"schema": "pg_catalog", "name": "query_to_xml", "qualified": false}]})
	count(blocked_for(s)) == 1
}

test_sad_read if {
	s := f.statement({"relations": [f.rel("public.customers", "read", ["cvv"], true)]})
	count(blocked_for(s)) == 1
}
