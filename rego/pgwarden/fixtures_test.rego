# Shared builders for the pack's tests: an analysed statement as policyd
# produces it (see docs/policy-input.schema.json), with every flag false.
package pgwarden.fixtures_test

import rego.v1

base_statement := {
	"command": "select",
	"node": "SelectStmt",
	"relations": [],
	"functions": [],
	"comparisons": [],
	"outputs": [],
	"bounded": true,
	"limited": false,
	"params_read": [],
	"data_modifying_cte": false,
	"select_into": false,
	"dynamic_sql": false,
	"opaque_sql": false,
	"set_role": false,
	"session_authorization": false,
	"alter_system": false,
	"role_statement": false,
	"grant": false,
	"drop_database": false,
	"untrusted_language": false,
	"transaction_control": false,
}

statement(overrides) := object.union(base_statement, overrides)

rel(table, access, columns, bounded) := {
	"schema": split(table, ".")[0],
	"name": split(table, ".")[1],
	"access": access,
	"qualified": false,
	"candidates": [table],
	"columns": columns,
	"bounded": bounded,
}

cmp(column, op, value) := {
	"column": split(column, ".")[2],
	"sources": [column],
	"op": op,
	"value": value,
	"known": true,
	"negated": false,
	"disjunctive": false,
	"level": 1,
	"param": null,
}

message(groups, statements) := {
	"identity": {"subject": "agent-1", "groups": groups, "issuer": "https://idp", "type": "agent", "actor": null},
	"session": {"id": "s1", "database": "shop", "user": "agent", "upstream_role": "fraud_reader", "client_addr": "127.0.0.1", "application_name": "t", "tls": true, "search_path": ["$user", "public"], "transaction_status": "I"},
	"request": {"path": "simple", "statement_name": "", "param_count": null},
	"analysis": {"parseable": true, "error": "", "fingerprint": "f", "statement_count": count(statements), "statements": statements, "params_used": []},
	"history": {"card_lookups": 0, "window_seconds": 3600},
}

select_payments(comparisons, bounded) := statement({
	"relations": [rel("public.payments", "read", ["*", "amount"], bounded)],
	"comparisons": comparisons,
	"outputs": [{"position": 0, "name": "*", "sources": ["public.payments.*"], "kind": "star"}],
})
