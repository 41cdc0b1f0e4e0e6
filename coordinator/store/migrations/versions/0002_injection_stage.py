"""injection stage: silo roles and the injections table

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("silos", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=20), nullable=False, server_default="trainer"))

    op.create_table(
        "injections",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("silo_id", sa.String(length=32), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.ForeignKeyConstraint(["silo_id"], ["silos.id"]),
        sa.PrimaryKeyConstraint("job_id", "round_number"),
    )
    with op.batch_alter_table("injections", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_injections_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("injections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_injections_state"))
    op.drop_table("injections")
    with op.batch_alter_table("silos", schema=None) as batch_op:
        batch_op.drop_column("role")
