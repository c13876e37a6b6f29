"""the findings each signed-off draft named, beside those signed (radvlm-pacs agreement, GET /agreement)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 04:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sign_offs') as batch_op:
        batch_op.add_column(sa.Column('drafted', sa.JSON(), nullable=True))
    # earlier sign-offs: the findings of the draft's first image, as the page showed them, from the stored result
    sign_offs = sa.table('sign_offs', sa.column('id', sa.Integer), sa.column('job_id', sa.Integer),
                         sa.column('drafted', sa.JSON))
    results = sa.table('results', sa.column('job_id', sa.Integer), sa.column('payload', sa.JSON))
    bind = op.get_bind()
    rows = bind.execute(sa.select(sign_offs.c.id, results.c.payload)
                        .join(results, results.c.job_id == sign_offs.c.job_id)).all()
    for sign_off_id, payload in rows:
        labels = payload['images'][0]['labels']
        drafted = sorted(label for label, present in labels.items() if present and label != 'No Finding')
        bind.execute(sign_offs.update().where(sign_offs.c.id == sign_off_id).values(drafted=drafted))
    with op.batch_alter_table('sign_offs') as batch_op:
        batch_op.alter_column('drafted', existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('sign_offs') as batch_op:
        batch_op.drop_column('drafted')
