package pgwarden.connect_test

import rego.v1

import data.pgwarden.connect

conn(groups, database) := d if {
	d := connect.decision with input as {"identity": {"subject": "a", "groups": groups}, "database": database}
}

test_reader_connects_as_fraud_reader if {
	d := conn(["fraud-readers"], "shop")
	d.allowed
	d.upstream_role == "fraud_reader"
	d.reasons == ["group fraud-readers connects as fraud_reader"]
}

test_priority_picks_dba if conn(["fraud-readers", "dba"], "shop").upstream_role == "dba_role"

test_writer_role if conn(["payments-writers"], "shop").upstream_role == "payments_writer"

test_approvers_cannot_connect if {
	d := conn(["approvers"], "shop")
	not d.allowed
	d.upstream_role == ""
}

test_other_database if not conn(["dba"], "postgres").allowed

test_no_groups if conn([], "shop").reasons == ["no group of this identity may connect to this database"]
