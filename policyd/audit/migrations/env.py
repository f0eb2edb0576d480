"""Alembic environment for the audit store.

Only run programmatically (``policyd.audit.store.upgrade(url)``), which hands
over an open connection; the version table is ``audit_alembic_version`` so the
audit store can share a database with other pgwarden tables.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import policyd.audit.models  # noqa: F401  (registers the tables for autogenerate)

VERSION_TABLE = "audit_alembic_version"


def _include(obj: object, name: str | None, type_: str, *_: object) -> bool:
    return type_ != "table" or bool(name and name.startswith("audit_"))


connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    version_table=VERSION_TABLE,
    include_object=_include,
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
