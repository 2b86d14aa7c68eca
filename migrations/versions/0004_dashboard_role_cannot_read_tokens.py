"""the dashboard's read-only role reads every column of workers but the token

Revision ID: 0004
Revises: 0003

A worker's token is the secret its results are signed with. The deployment's init script
(deploy/postgres/10-dashboard-readonly.sh) lets the dashboard role read every table created
later, which would include it: a dashboard compromise must not let anyone sign as any worker.
Column privileges replace the table privilege. A later migration that adds a column to
workers grants it here too, or the dashboard does not see it.
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

DASHBOARD_ROLE = 'tokenfarm_ro'
SECRET_COLUMNS = ('token',)


def _role_exists(bind) -> bool:
    return bind.dialect.name == 'postgresql' and bind.execute(
        sa.text('SELECT 1 FROM pg_roles WHERE rolname = :r'), {'r': DASHBOARD_ROLE}).first() is not None


def upgrade() -> None:
    bind = op.get_bind()
    if not _role_exists(bind):
        return  # SQLite, or a PostgreSQL without the deployment's dashboard role
    readable = [c['name'] for c in sa.inspect(bind).get_columns('workers') if c['name'] not in SECRET_COLUMNS]
    op.execute(f'REVOKE SELECT ON workers FROM {DASHBOARD_ROLE}')
    op.execute(f'GRANT SELECT ({", ".join(readable)}) ON workers TO {DASHBOARD_ROLE}')


def downgrade() -> None:
    bind = op.get_bind()
    if _role_exists(bind):
        op.execute(f'GRANT SELECT ON workers TO {DASHBOARD_ROLE}')
