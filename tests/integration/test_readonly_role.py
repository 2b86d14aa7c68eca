"""The deployment's dashboard role, created by deploy/postgres's init script, can read and never write."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from orchestrator.db import upgrade
from tests.conftest import REPO
from tests.integration.conftest import PG_ADMIN_URL

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("psql") is None, reason="needs the psql client")]


def test_dashboard_role_reads_tables_created_later_and_cannot_write(pg_empty_url):
    pg_url = pg_empty_url  # the role is made before any table exists
    db = pg_url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP ROLE IF EXISTS tokenfarm_ro"))
    env = {**os.environ, "POSTGRES_USER": "postgres", "POSTGRES_DB": db, "DASHBOARD_DB_PASSWORD": "ro-secret",
           "PGHOST": "127.0.0.1", "PGPORT": "5432"}
    try:
        init = subprocess.run(["sh", str(REPO / "deploy" / "postgres" / "10-dashboard-readonly.sh")], env=env,
                              capture_output=True, text=True)
        assert init.returncode == 0, init.stderr
        upgrade(pg_url)  # tables created after the role, as in a fresh deployment
        ro = create_engine(pg_url.replace("postgres@", "tokenfarm_ro:ro-secret@"))
        with ro.connect() as c:
            assert c.execute(text("SELECT count(*) FROM results")).scalar() == 0
            assert c.execute(text("SELECT count(*) FROM workers WHERE NOT flagged")).scalar() == 0
        # The workers' signing secrets stay with the collector.
        with ro.connect() as c, pytest.raises(DBAPIError, match="permission denied"):
            c.execute(text("SELECT token FROM workers"))
        with ro.connect() as c, pytest.raises(DBAPIError, match="read-only|permission denied"):
            c.execute(text("INSERT INTO workers (name, token, created_at, n_done, n_failed, n_rejected, flagged) "
                           "VALUES ('x', 'y', now(), 0, 0, 0, false)"))
        ro.dispose()
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
            c.execute(text("DROP ROLE IF EXISTS tokenfarm_ro"))
        admin.dispose()
