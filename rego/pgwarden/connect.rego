# METADATA
# title: The connection decision
# description: |
#   data.pgwarden.connect.decision: may this identity open a session on this
#   database, and as which upstream role (PCI DSS 7.2: group -> least
#   privileged role, from data.pgwarden_data.groups). With several groups
#   the first one in data.pgwarden_data.role_priority wins.
package pgwarden.connect

import rego.v1

group_table := data.pgwarden_data.groups

eligible := {g |
	some g in input.identity.groups
	group_table[g].may_query
	input.database in group_table[g].databases
	group_table[g].upstream_role != ""
}

chosen := [g | some g in data.pgwarden_data.role_priority; g in eligible][0]

default allowed := false

allowed if chosen

upstream_role := group_table[chosen].upstream_role

reasons contains msg if {
	allowed
	msg := sprintf("group %s connects as %s", [chosen, upstream_role])
}

reasons contains "no group of this identity may connect to this database" if not allowed

default decision := {"allowed": false, "upstream_role": "", "reasons": ["no decision"]}

decision := {"allowed": true, "upstream_role": upstream_role, "reasons": sort([r | some r in reasons])} if allowed

decision := {"allowed": false, "upstream_role": "", "reasons": sort([r | some r in reasons])} if not allowed
