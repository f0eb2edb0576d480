# METADATA
# title: Cardholder data classification helpers
# description: |
#   Which relations and columns hold cardholder data, read from
#   data.pgwarden_data.classification. A relation from the analysis lists every
#   schema.table it may resolve to (`candidates`); a relation counts as
#   cardholder data when any candidate is classified, so search_path games
#   make a rule stricter, never looser.
package pgwarden.lib.classification

import rego.v1

columns := data.pgwarden_data.classification.columns

cardholder_tables := {t | some t in data.pgwarden_data.classification.cardholder_tables}

pan_columns := {c | some c, kind in columns; kind == "pan"}

sad_columns := {c | some c, kind in columns; kind == "sad"}

# schema.table -> kind -> its classified columns, computed once per query.
classified := {table: kinds |
	some c, _ in columns
	parts := split(c, ".")
	table := concat(".", [parts[0], parts[1]])
	kinds := {kind: cols |
		some _, kind in columns
		cols := {col |
			some col, k in columns
			k == kind
			startswith(col, concat("", [table, "."]))
		}
	}
}

# The classified columns of one schema.table.
table_columns(table, kind) := object.get(classified, [table, kind], set())

is_cardholder(rel) if {
	some cand in rel.candidates
	cand in cardholder_tables
}

is_table(rel, table) if table in rel.candidates

# The relation names a classified column of `kind` ("pan", "sad"), or reads
# the whole row (`*`) of a table that has one.
touches(rel, kind) if {
	some cand in rel.candidates
	some col in rel.columns
	col != "*"
	columns[concat(".", [cand, col])] == kind
}

touches(rel, kind) if {
	"*" in rel.columns
	some cand in rel.candidates
	count(table_columns(cand, kind)) > 0
}

# Classified PAN columns of every table the statement names.
pan_columns_of(rel) := {c |
	some cand in rel.candidates
	some c in table_columns(cand, "pan")
}
