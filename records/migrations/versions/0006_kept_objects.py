"""objects the node keeps for its DICOMweb service (QIDO-RS, WADO-RS)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 10:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'kept_objects',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
        sa.Column('payload', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('sop_instance_uid'),
    )
    op.create_index('ix_kept_objects_job_id', 'kept_objects', ['job_id'])
    op.create_index('ix_kept_objects_study_id', 'kept_objects', ['study_id'])
    op.create_index('ix_kept_objects_series_instance_uid', 'kept_objects', ['series_instance_uid'])


def downgrade() -> None:
    op.drop_table('kept_objects')
