"""Datasets record their preprocessing; models may be the team's own code.

Revision ID: 0002_prep_code
Revises: i11a_progress_sweeps
Create Date: 2026-11-25 18:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_prep_code"
down_revision = "i11a_progress_sweeps"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("datasets", sa.Column("preprocessing", sa.JSON(), nullable=True))
    op.add_column("models", sa.Column("kind", sa.String(length=20), nullable=False,
                                      server_default="zoo"))
    op.add_column("models", sa.Column("code_store_key", sa.String(length=500), nullable=True))
    op.add_column("models", sa.Column("factory", sa.String(length=300), nullable=True))
    op.add_column("models", sa.Column("factory_kwargs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("factory_kwargs")
        batch.drop_column("factory")
        batch.drop_column("code_store_key")
        batch.drop_column("kind")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("preprocessing")
