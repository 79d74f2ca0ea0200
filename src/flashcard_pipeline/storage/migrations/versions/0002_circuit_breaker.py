"""circuit breaker: operator commands, transitions, and each process's view of its circuits

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 16:21:36.492369
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
        "circuit_breaker_commands",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("circuit", sa.String(length=240), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("circuit_breaker_commands", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_circuit_breaker_commands_circuit"), ["circuit"], unique=False)

    op.create_table(
        "circuit_breaker_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("circuit", sa.String(length=240), nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=False),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("manual", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=True),
        sa.Column("failure_count", sa.Integer(), nullable=False),
        sa.Column("throughput", sa.Integer(), nullable=False),
        sa.Column("failure_ratio", sa.Float(), nullable=False),
        sa.Column("break_duration", sa.Float(), nullable=True),
        sa.Column("half_open_attempts", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("circuit_breaker_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_circuit_breaker_events_circuit"), ["circuit"], unique=False)

    op.create_table(
        "circuit_breaker_states",
        sa.Column("circuit", sa.String(length=240), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("open_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failure_count", sa.Integer(), nullable=False),
        sa.Column("success_count", sa.Integer(), nullable=False),
        sa.Column("rejected_count", sa.Integer(), nullable=False),
        sa.Column("stats_json", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("circuit", "owner"),
    )


def downgrade() -> None:
    op.drop_table("circuit_breaker_states")
    with op.batch_alter_table("circuit_breaker_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_circuit_breaker_events_circuit"))

    op.drop_table("circuit_breaker_events")
    with op.batch_alter_table("circuit_breaker_commands", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_circuit_breaker_commands_circuit"))

    op.drop_table("circuit_breaker_commands")
