"""correlation and recovery: a call id and attempt per API call (and the recovery strategy that shaped it), the model
that answered each stage, the last answer of a quarantined item

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("call_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("attempt", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("recovery", sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f("ix_api_calls_call_id"), ["call_id"], unique=False)
    with op.batch_alter_table("stage_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(length=200), nullable=True))
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_answer", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("last_answer")
    with op.batch_alter_table("stage_results", schema=None) as batch_op:
        batch_op.drop_column("model")
    with op.batch_alter_table("api_calls", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_calls_call_id"))
        batch_op.drop_column("recovery")
        batch_op.drop_column("attempt")
        batch_op.drop_column("call_id")
