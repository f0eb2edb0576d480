"""Alembic migrations of the audit store (run with ``policyd.audit.store.upgrade``)."""
