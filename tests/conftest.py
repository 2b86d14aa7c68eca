"""Shared fixtures: an isolated tokenfarm data dir per test, and the repo root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Under `pytest -n N`, each test worker (and every process it starts: workers, CLIs) runs on
    its own share of the cores. Engines size their thread pools by the CPU affinity, and two
    llama.cpp jobs spinning two threads each on two cores slow each other several times over (a
    worker-kill chaos test took 134 s in the suite and 23 s alone); pinned, each runs as on a
    machine of its own, as llama-bench's --cpu-mask would have it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    n_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or n_workers < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < n_workers:
        return
    os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) % n_workers::n_workers])


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """Point every TOKENFARM_* default at a fresh folder (embedded database and broker)."""
    d = tmp_path / "tokenfarm-data"
    monkeypatch.setenv("TOKENFARM_DATA_DIR", str(d))
    for var in ("TOKENFARM_DATABASE_URL", "TOKENFARM_BROKER_URL", "TOKENFARM_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    return d
