"""audit store: record tables and chain heads

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "audit_approvals",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("session_seq", sa.BigInteger(), nullable=False),
        sa.Column("session_prev_hash", sa.String(length=64), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("approval_id", sa.String(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("statement_seq", sa.BigInteger(), nullable=True),
        sa.Column("approver", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_approvals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_approvals_approval_id"), ["approval_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_approvals_session_id"), ["session_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_approvals_ts"), ["ts"], unique=False)

    op.create_table(
        "audit_auth_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("session_seq", sa.BigInteger(), nullable=False),
        sa.Column("session_prev_hash", sa.String(length=64), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("issuer", sa.String(), nullable=False),
        sa.Column("client_addr", sa.String(), nullable=False),
        sa.Column("database", sa.String(), nullable=False),
        sa.Column("user", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_auth_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_auth_events_session_id"), ["session_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_auth_events_ts"), ["ts"], unique=False)

    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_evidence_access",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("session_seq", sa.BigInteger(), nullable=False),
        sa.Column("session_prev_hash", sa.String(length=64), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("accessor", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_evidence_access", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_evidence_access_session_id"), ["session_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_evidence_access_ts"), ["ts"], unique=False)

    op.create_table(
        "audit_gateway_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("session_seq", sa.BigInteger(), nullable=False),
        sa.Column("session_prev_hash", sa.String(length=64), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("component", sa.String(), nullable=False),
        sa.Column("instance", sa.String(), nullable=False),
        sa.Column("policy_revision", sa.String(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_gateway_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_gateway_events_session_id"), ["session_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_gateway_events_ts"), ["ts"], unique=False)

    op.create_table(
        "audit_session_ends",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("session_seq", sa.BigInteger(), nullable=False),
        sa.Column("session_prev_hash", sa.String(length=64), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.String(), nullable=False),
        sa.Column("statements", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_session_ends", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_session_ends_session_id"), ["session_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_session_ends_ts"), ["ts"], unique=False)

    op.create_table(
        "audit_session_heads",
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("session_seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("session_id"),
    )
    op.create_table(
        "audit_sessions",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("session_seq", sa.BigInteger(), nullable=False),
        sa.Column("session_prev_hash", sa.String(length=64), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("issuer", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=True),
        sa.Column("client_addr", sa.String(), nullable=False),
        sa.Column("database", sa.String(), nullable=False),
        sa.Column("user", sa.String(), nullable=False),
        sa.Column("upstream_role", sa.String(), nullable=False),
        sa.Column("tls", sa.Boolean(), nullable=False),
        sa.Column("application_name", sa.String(), nullable=False),
        sa.Column("driver_mode", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_sessions_session_id"), ["session_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_sessions_subject"), ["subject"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_sessions_ts"), ["ts"], unique=False)

    op.create_table(
        "audit_statements",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("session_seq", sa.BigInteger(), nullable=False),
        sa.Column("session_prev_hash", sa.String(length=64), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("statement_seq", sa.BigInteger(), nullable=False),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("sql", sa.String(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("path", sa.String(length=16), nullable=False),
        sa.Column("analysis", sa.JSON(), nullable=False),
        sa.Column("verdict", sa.String(length=8), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("decision_id", sa.String(), nullable=False),
        sa.Column("policy_revision", sa.String(), nullable=False),
        sa.Column("approval_id", sa.String(), nullable=False),
        sa.Column("started_at", sa.String(), nullable=True),
        sa.Column("finished_at", sa.String(), nullable=True),
        sa.Column("command_tag", sa.String(), nullable=False),
        sa.Column("rows_returned", sa.BigInteger(), nullable=True),
        sa.Column("rows_affected", sa.BigInteger(), nullable=True),
        sa.Column("masked_counts", sa.JSON(), nullable=False),
        sa.Column("digest_before", sa.String(), nullable=False),
        sa.Column("digest_after", sa.String(), nullable=False),
        sa.Column("recorded_rows", sa.JSON(), nullable=True),
        sa.Column("rows_truncated", sa.Boolean(), nullable=False),
        sa.Column("error_sqlstate", sa.String(), nullable=False),
        sa.Column("error_message", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_statements", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_statements_session_id"), ["session_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_statements_ts"), ["ts"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_statements_verdict"), ["verdict"], unique=False)

    op.create_table(
        "audit_writer_state",
        sa.Column("writer_id", sa.String(length=200), nullable=False),
        sa.Column("spool_n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("writer_id"),
    )


def downgrade() -> None:

    op.drop_table("audit_writer_state")
    with op.batch_alter_table("audit_statements", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_statements_verdict"))
        batch_op.drop_index(batch_op.f("ix_audit_statements_ts"))
        batch_op.drop_index(batch_op.f("ix_audit_statements_session_id"))

    op.drop_table("audit_statements")
    with op.batch_alter_table("audit_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_sessions_ts"))
        batch_op.drop_index(batch_op.f("ix_audit_sessions_subject"))
        batch_op.drop_index(batch_op.f("ix_audit_sessions_session_id"))

    op.drop_table("audit_sessions")
    op.drop_table("audit_session_heads")
    with op.batch_alter_table("audit_session_ends", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_session_ends_ts"))
        batch_op.drop_index(batch_op.f("ix_audit_session_ends_session_id"))

    op.drop_table("audit_session_ends")
    with op.batch_alter_table("audit_gateway_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_gateway_events_ts"))
        batch_op.drop_index(batch_op.f("ix_audit_gateway_events_session_id"))

    op.drop_table("audit_gateway_events")
    with op.batch_alter_table("audit_evidence_access", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_evidence_access_ts"))
        batch_op.drop_index(batch_op.f("ix_audit_evidence_access_session_id"))

    op.drop_table("audit_evidence_access")
    op.drop_table("audit_chain_head")
    with op.batch_alter_table("audit_auth_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_auth_events_ts"))
        batch_op.drop_index(batch_op.f("ix_audit_auth_events_session_id"))

    op.drop_table("audit_auth_events")
    with op.batch_alter_table("audit_approvals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_approvals_ts"))
        batch_op.drop_index(batch_op.f("ix_audit_approvals_session_id"))
        batch_op.drop_index(batch_op.f("ix_audit_approvals_approval_id"))

    op.drop_table("audit_approvals")
