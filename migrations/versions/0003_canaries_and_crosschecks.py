"""canaries and cross-checks: checks, canary_references, worker trust and check counts

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_WORKER_COUNTS = ('n_canary_passed', 'n_canary_failed', 'n_crosscheck_agreed', 'n_crosscheck_disagreed')


def upgrade() -> None:
    # server defaults so workers registered before this revision read as untrusted with no checks.
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('trusted', sa.Boolean(), nullable=False, server_default=sa.false()))
        for name in _WORKER_COUNTS:
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default='0'))
    op.create_table(
        'checks',
        sa.Column('job_id', sa.String(length=36), nullable=False),
        sa.Column('sweep_id', sa.String(length=36), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('origin_job_id', sa.String(length=36), nullable=True),
        sa.Column('vote_of', sa.String(length=36), nullable=True),
        sa.Column('tolerance', sa.Float(), nullable=False),
        sa.Column('excluded_workers', sa.JSON(), nullable=False),
        sa.Column('target_worker', sa.String(length=200), nullable=True),
        sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('worker', sa.String(length=200), nullable=True),
        sa.Column('hardware_class', sa.String(length=300), nullable=False),
        sa.Column('greedy_key', sa.String(length=64), nullable=False),
        sa.Column('output_sha256', sa.String(length=64), nullable=False),
        sa.Column('expected_sha256', sa.String(length=64), nullable=False),
        sa.Column('verdict', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('result', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
        sa.ForeignKeyConstraint(['sweep_id'], ['sweeps.id']),
        sa.PrimaryKeyConstraint('job_id'),
    )
    with op.batch_alter_table('checks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_checks_sweep_id'), ['sweep_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_checks_origin_job_id'), ['origin_job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_checks_worker'), ['worker'], unique=False)
        batch_op.create_index(batch_op.f('ix_checks_verdict'), ['verdict'], unique=False)
    op.create_table(
        'canary_references',
        sa.Column('greedy_key', sa.String(length=64), nullable=False),
        sa.Column('hardware_class', sa.String(length=300), nullable=False),
        sa.Column('output_sha256', sa.String(length=64), nullable=False),
        sa.Column('model', sa.String(length=500), nullable=False),
        sa.Column('model_sha256', sa.String(length=64), nullable=False),
        sa.Column('quant', sa.String(length=16), nullable=False),
        sa.Column('engine', sa.String(length=32), nullable=False),
        sa.Column('test', sa.String(length=64), nullable=False),
        sa.Column('source', sa.String(length=300), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('greedy_key', 'hardware_class'),
    )


def downgrade() -> None:
    op.drop_table('canary_references')
    with op.batch_alter_table('checks', schema=None) as batch_op:
        for name in ('verdict', 'worker', 'origin_job_id', 'sweep_id'):
            batch_op.drop_index(batch_op.f(f'ix_checks_{name}'))
    op.drop_table('checks')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        for name in reversed(_WORKER_COUNTS):
            batch_op.drop_column(name)
        batch_op.drop_column('trusted')
