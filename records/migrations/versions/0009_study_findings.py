"""each study's findings (the newest draft's, or those signed) for the worklist's urgent-first order

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 05:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

NO_FINDING = 'No Finding'


def upgrade() -> None:
    with op.batch_alter_table('studies') as batch_op:
        batch_op.add_column(sa.Column('findings', sa.JSON(), nullable=True))
    # studies analysed before: the newest finished draft's findings (any image), or the newest sign-off's
    studies = sa.table('studies', sa.column('id', sa.Integer), sa.column('findings', sa.JSON))
    jobs = sa.table('jobs', sa.column('id', sa.Integer), sa.column('study_id', sa.Integer),
                    sa.column('study_version', sa.Integer))
    results = sa.table('results', sa.column('job_id', sa.Integer), sa.column('payload', sa.JSON))
    sign_offs = sa.table('sign_offs', sa.column('id', sa.Integer), sa.column('study_id', sa.Integer),
                         sa.column('findings', sa.JSON))
    bind = op.get_bind()
    order: dict[int, list[str]] = {}  # each study's labels in CheXpert's order, as its results store them
    found: dict[int, list[str]] = {}
    drafts = bind.execute(sa.select(jobs.c.study_id, results.c.payload).join(results, results.c.job_id == jobs.c.id)
                          .order_by(jobs.c.study_version, jobs.c.id)).all()
    for study_id, payload in drafts:  # the newest last
        labels = [image['labels'] for image in payload['images']]
        order[study_id] = [label for label in labels[0] if label != NO_FINDING]
        found[study_id] = [label for label in order[study_id] if any(each.get(label) for each in labels)]
    for study_id, signed in bind.execute(sa.select(sign_offs.c.study_id, sign_offs.c.findings)
                                         .order_by(sign_offs.c.id)).all():
        found[study_id] = [label for label in order.get(study_id, sorted(signed)) if label in signed]
    for study_id, findings in found.items():
        bind.execute(studies.update().where(studies.c.id == study_id).values(findings=findings))


def downgrade() -> None:
    with op.batch_alter_table('studies') as batch_op:
        batch_op.drop_column('findings')
