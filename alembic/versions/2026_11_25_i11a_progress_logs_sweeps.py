"""Live progress (phase_progress, eta_s), first-class tol and layer units, log lines, sweeps.

Revision ID: i11a_progress_sweeps
Revises: i8a_worker_pid
Create Date: 2026-11-25 17:54:28.370282
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = 'i11a_progress_sweeps'
down_revision = 'i8a_worker_pid'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('sweeps',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('owner_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('model_id', sa.String(length=32), nullable=True),
    sa.Column('dataset_id', sa.String(length=32), nullable=True),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_sweeps_dataset_id_datasets'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_sweeps_model_id_models'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_sweeps_owner_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sweeps'))
    )
    with op.batch_alter_table('sweeps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sweeps_owner_id'), ['owner_id'], unique=False)

    op.create_table('job_log_lines',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('line', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_log_lines_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_log_lines'))
    )
    with op.batch_alter_table('job_log_lines', schema=None) as batch_op:
        batch_op.create_index('ix_job_log_lines_job_id_id', ['job_id', 'id'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sweep_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('phase_progress', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('eta_s', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('tol', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('layer_units', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_sweep_id'), ['sweep_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_jobs_sweep_id_sweeps'), 'sweeps', ['sweep_id'], ['id'], ondelete='SET NULL')




def downgrade() -> None:

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_jobs_sweep_id_sweeps'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_sweep_id'))
        batch_op.drop_column('layer_units')
        batch_op.drop_column('tol')
        batch_op.drop_column('eta_s')
        batch_op.drop_column('phase_progress')
        batch_op.drop_column('sweep_id')

    with op.batch_alter_table('job_log_lines', schema=None) as batch_op:
        batch_op.drop_index('ix_job_log_lines_job_id_id')

    op.drop_table('job_log_lines')
    with op.batch_alter_table('sweeps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sweeps_owner_id'))

    op.drop_table('sweeps')

