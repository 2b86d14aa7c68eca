"""Shared fixtures: an isolated tokenfarm data dir per test, and the repo root."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """Point every TOKENFARM_* default at a fresh folder (embedded database and broker)."""
    d = tmp_path / "tokenfarm-data"
    monkeypatch.setenv("TOKENFARM_DATA_DIR", str(d))
    for var in ("TOKENFARM_DATABASE_URL", "TOKENFARM_BROKER_URL", "TOKENFARM_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    return d
