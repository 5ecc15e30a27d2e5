"""Per-user limits (storage quota, request rate), soft-deleted models and datasets, and an
index for the retention query.

Revision ID: 0003_limits_soft_delete
Revises: 0002_prep_code
Create Date: 2026-12-01 20:30:00

Only ADD/DROP COLUMN and an index: no table is rebuilt. (A SQLite batch rebuild of `models` or
`datasets` drops the old table, and with foreign keys on that sets every job's model_id /
dataset_id to NULL.)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_limits_soft_delete"
down_revision = "0002_prep_code"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("storage_quota_bytes", sa.BigInteger(), nullable=True))
    op.add_column("users", sa.Column("requests_per_minute", sa.Integer(), nullable=True))
    op.add_column("models", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("datasets", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_status_finished", "jobs", ["status", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_finished", table_name="jobs")
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 and PostgreSQL), not a batch rebuild.
    op.drop_column("datasets", "deleted_at")
    op.drop_column("models", "deleted_at")
    op.drop_column("users", "requests_per_minute")
    op.drop_column("users", "storage_quota_bytes")
