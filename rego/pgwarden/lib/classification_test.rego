package pgwarden.lib.classification_test

import rego.v1

import data.pgwarden.fixtures_test as f
import data.pgwarden.lib.classification as cls

test_payments_is_cardholder if cls.is_cardholder(f.rel("public.payments", "read", ["id"], true))

test_other_table_is_not_cardholder if not cls.is_cardholder(f.rel("public.orders", "read", ["id"], true))

test_any_candidate_counts if {
	r := object.union(f.rel("evil.payments", "read", ["id"], true), {"candidates": ["evil.payments", "public.payments"]})
	cls.is_cardholder(r)
}

test_cvv_is_sad if cls.touches(f.rel("public.customers", "read", ["cvv"], true), "sad")

test_star_on_customers_touches_sad if cls.touches(f.rel("public.customers", "read", ["*"], true), "sad")

test_star_on_payments_touches_no_sad if not cls.touches(f.rel("public.payments", "read", ["*"], true), "sad")

test_pan_columns_of_customers if {
	cls.pan_columns_of(f.rel("public.customers", "read", ["id"], true)) == {"public.customers.card_number"}
}

test_is_column if {
	cls.is_column("public.customers.cvv", "sad")
	not cls.is_column("public.customers.cvv", "pan")
	not cls.is_column("customers.cvv", "sad")
}

test_table_columns if cls.table_columns("public.customers", "pan") == {"card_number"}

test_is_table if cls.is_table(f.rel("public.payments", "write", [], true), "public.payments")
