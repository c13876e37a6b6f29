"""chat, sign-off and audit

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 15:25:30.906349
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('user_name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('client', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_study_instance_uid'), ['study_instance_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_user_name'), ['user_name'], unique=False)

    op.create_table('conversations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('user_name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversations_study_id'), ['study_id'], unique=False)

    op.create_table('exchanges',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('conversation_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('question', sa.Text(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=True),
    sa.Column('boxes', sa.JSON(), nullable=True),
    sa.Column('malformed', sa.Text(), nullable=True),
    sa.Column('state', sa.Enum('queued', 'answering', 'answered', 'failed', name='exchangestate', native_enum=False, length=32), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('model_id', sa.String(length=200), nullable=True),
    sa.Column('model_revision', sa.String(length=64), nullable=True),
    sa.Column('asked_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('answered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('conversation_id', 'position')
    )
    with op.batch_alter_table('exchanges', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_exchanges_conversation_id'), ['conversation_id'], unique=False)

    op.create_table('sign_offs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('user_name', sa.String(length=64), nullable=False),
    sa.Column('observer_name', sa.String(length=324), nullable=False),
    sa.Column('report', sa.Text(), nullable=False),
    sa.Column('findings', sa.JSON(), nullable=False),
    sa.Column('edited', sa.Boolean(), nullable=False),
    sa.Column('sr_uid', sa.String(length=64), nullable=False),
    sa.Column('signed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sr_uid')
    )
    with op.batch_alter_table('sign_offs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sign_offs_job_id'), ['job_id'], unique=True)
        batch_op.create_index(batch_op.f('ix_sign_offs_study_id'), ['study_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('sign_offs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sign_offs_study_id'))
        batch_op.drop_index(batch_op.f('ix_sign_offs_job_id'))

    op.drop_table('sign_offs')
    with op.batch_alter_table('exchanges', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_exchanges_conversation_id'))

    op.drop_table('exchanges')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversations_study_id'))

    op.drop_table('conversations')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_user_name'))
        batch_op.drop_index(batch_op.f('ix_audit_events_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_audit_events_at'))

    op.drop_table('audit_events')
