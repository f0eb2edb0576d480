# METADATA
# title: Cardholder data classification helpers
# description: |
#   Which relations and columns hold cardholder data, read from
#   data.pgwarden_data.classification.tables ("schema.table" -> cardholder,
#   columns: column -> "pan" | "sad"). A relation from the analysis lists
#   every schema.table it may resolve to (`candidates`); a relation counts as
#   cardholder data when any candidate is classified, so search_path games
#   make a rule stricter, never looser. Lookups are by key, never by scanning
#   the data: these helpers run for every statement.
package pgwarden.lib.classification

import rego.v1

tables := data.pgwarden_data.classification.tables

is_cardholder(rel) if {
	some cand in rel.candidates
	tables[cand].cardholder
}

is_table(rel, table) if table in rel.candidates

# The classified columns of `kind` of one schema.table.
table_columns(table, kind) := {col | some col, k in tables[table].columns; k == kind}

# `source` ("schema.table.column") is classified as `kind`.
is_column(source, kind) if {
	parts := split(source, ".")
	count(parts) == 3
	tables[concat(".", [parts[0], parts[1]])].columns[parts[2]] == kind
}

# The relation names a classified column of `kind` ("pan", "sad"), or reads
# the whole row (`*`) of a table that has one.
touches(rel, kind) if {
	some cand in rel.candidates
	some col in rel.columns
	tables[cand].columns[col] == kind
}

touches(rel, kind) if {
	"*" in rel.columns
	some cand in rel.candidates
	some k in tables[cand].columns
	k == kind
}

# Every classified PAN column ("schema.table.column").
all_pan_columns := {concat(".", [table, col]) |
	some table, t in tables
	some col, k in t.columns
	k == "pan"
}

# Classified PAN columns ("schema.table.column") of the tables a relation may be.
pan_columns_of(rel) := {concat(".", [cand, col]) |
	some cand in rel.candidates
	some col, k in tables[cand].columns
	k == "pan"
}
