"""cache sizes, counters and run metrics

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 15:52:07.054425
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
        "cache_counters",
        sa.Column("cache_type", sa.String(length=16), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.Column("misses", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("cache_type"),
    )
    with op.batch_alter_table("cache_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("raw_bytes", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("stored_bytes", sa.Integer(), nullable=False, server_default="0"))
        batch_op.alter_column(
            "codec", existing_type=sa.VARCHAR(length=16), type_=sa.String(length=32), existing_nullable=False
        )

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("metrics_json", sa.Text(), nullable=True))

    with op.batch_alter_table("stage_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_stage_results_cache_key"), ["cache_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("stage_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stage_results_cache_key"))

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("metrics_json")

    with op.batch_alter_table("cache_entries", schema=None) as batch_op:
        batch_op.alter_column(
            "codec", existing_type=sa.String(length=32), type_=sa.VARCHAR(length=16), existing_nullable=False
        )
        batch_op.drop_column("stored_bytes")
        batch_op.drop_column("raw_bytes")

    op.drop_table("cache_counters")
