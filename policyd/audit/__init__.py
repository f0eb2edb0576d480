"""The audit trail: what the tap and policyd saw and decided, kept as PCI DSS
evidence (requirement 10).

Public entry points:

- :mod:`policyd.audit.events` -- the event models the tap and policyd emit.
- :class:`policyd.audit.writer.AuditWriter` -- accepts batches of events,
  spools them to a local file first, writes them to the store in batches.
- :mod:`policyd.audit.chain` -- signed checkpoints, ``verify`` and ``prune``.
- :mod:`policyd.audit.cli` -- ``pgwarden sessions|replay|audit`` commands.
"""
