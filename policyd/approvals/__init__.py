"""Just-in-time approvals (issue 7): a statement whose decision says HOLD
waits for a human; approvers decide through ``pgwarden approvals`` or the
HTTP API; the tap calls :class:`policyd.approvals.client.ApprovalClient`.
docs/approvals.md describes the flow, the SQLSTATEs and the APIs."""
