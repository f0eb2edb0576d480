"""statement results; seeded chain head

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_statement_results",
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
    with op.batch_alter_table("audit_statement_results", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_audit_statement_results_session_id"), ["session_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_audit_statement_results_ts"), ["ts"], unique=False)
    # Seed the chain head so the first appenders lock an existing row
    # (SELECT ... FOR UPDATE locks nothing when the row is missing).
    op.execute(
        "INSERT INTO audit_chain_head (id, seq, hash) SELECT 1, 0, '"
        + "0" * 64
        + "' WHERE NOT EXISTS (SELECT 1 FROM audit_chain_head)"
    )


def downgrade() -> None:

    with op.batch_alter_table("audit_statement_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_statement_results_ts"))
        batch_op.drop_index(batch_op.f("ix_audit_statement_results_session_id"))

    op.drop_table("audit_statement_results")
