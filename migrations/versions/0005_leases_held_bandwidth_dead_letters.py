"""leases on jobs, bandwidth held per worker, rejection sizes, dead letters

Revision ID: 0005
Revises: 0004

The orchestrator now assigns each job to one worker (a lease: worker, attempt, lease id, when),
holds the memory bandwidth a worker announced when it joined, and moves messages it cannot
decode to dead_letters. The dashboard role keeps reading every column of workers but the token
(0004 granted columns one by one): the new ones are granted here.
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

DASHBOARD_ROLE = 'tokenfarm_ro'
_HELD = ('host_bandwidth_gbps', 'device_bandwidth_gbps')


def _role_exists(bind) -> bool:
    return bind.dialect.name == 'postgresql' and bind.execute(
        sa.text('SELECT 1 FROM pg_roles WHERE rolname = :r'), {'r': DASHBOARD_ROLE}).first() is not None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('leased_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('not_before', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_worker'), ['worker'], unique=False)
    with op.batch_alter_table('workers', schema=None) as batch_op:
        for name in _HELD:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))
    with op.batch_alter_table('rejections', schema=None) as batch_op:
        batch_op.add_column(sa.Column('size_bytes', sa.Integer(), nullable=False, server_default='0'))
    op.create_table(
        'dead_letters',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('content_type', sa.String(length=200), nullable=False),
        sa.Column('size_bytes', sa.Integer(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('head', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    bind = op.get_bind()
    if _role_exists(bind):
        op.execute(f'GRANT SELECT ({", ".join(_HELD)}) ON workers TO {DASHBOARD_ROLE}')


def downgrade() -> None:
    op.drop_table('dead_letters')
    with op.batch_alter_table('rejections', schema=None) as batch_op:
        batch_op.drop_column('size_bytes')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        for name in _HELD:
            batch_op.drop_column(name)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_worker'))
        for name in ('not_before', 'leased_at', 'lease_id'):
            batch_op.drop_column(name)
