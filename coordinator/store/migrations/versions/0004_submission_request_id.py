"""idempotent submission: a job's request id (unique per submitter) and the digest of its request

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("request_digest", sa.String(length=64), nullable=False, server_default=""))
    # An index, not a table constraint: SQLite adds it in place, without copying the table its foreign keys guard.
    op.create_index("ix_jobs_submitted_by_request_id", "jobs", ["submitted_by", "request_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_jobs_submitted_by_request_id", table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("request_digest")
        batch_op.drop_column("request_id")
