"""the GPU worker running each job and answering each question, so a sweep can give back a dead worker's work

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('jobs', 'exchanges'):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column('worker', sa.String(200), nullable=True))


def downgrade() -> None:
    for table in ('exchanges', 'jobs'):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column('worker')
