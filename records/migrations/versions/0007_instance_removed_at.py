"""when a received file was removed under the retention setting (node.keep_images_days)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 23:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances') as batch_op:
        batch_op.add_column(sa.Column('removed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances') as batch_op:
        batch_op.drop_column('removed_at')
