#!/bin/sh
# Runs once, when the PostgreSQL volume is created: a login role for the dashboard that can
# only read, including tables Alembic creates later (default privileges of the owner role).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE tokenfarm_ro LOGIN PASSWORD '${DASHBOARD_DB_PASSWORD}';
GRANT CONNECT ON DATABASE ${POSTGRES_DB} TO tokenfarm_ro;
GRANT USAGE ON SCHEMA public TO tokenfarm_ro;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO tokenfarm_ro;
ALTER DEFAULT PRIVILEGES FOR ROLE ${POSTGRES_USER} IN SCHEMA public GRANT SELECT ON TABLES TO tokenfarm_ro;
ALTER ROLE tokenfarm_ro SET default_transaction_read_only = on;
SQL
