"""Unit fixtures: the embedded SQLite database, migrated by Alembic as the real one is."""

from __future__ import annotations

import pytest

from orchestrator.db import make_engine, upgrade


@pytest.fixture
def engine(data_dir):
    url = f"sqlite:///{data_dir / 'db.sqlite3'}"
    upgrade(url)
    return make_engine(url)
