"""Real services and real models: PostgreSQL and Redis on 127.0.0.1, SmolLM2 from PyPI, worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO

MODELS_DIR = Path(os.environ.get("TOKENFARM_TEST_MODELS_DIR", REPO / ".tokenfarm" / "models"))
PG_ADMIN_URL = os.environ.get("TOKENFARM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("TOKENFARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
TOKENFARM = str(Path(sys.executable).parent / "tokenfarm")



@pytest.fixture(scope="session")
def smollm2() -> Path:
    from worker.models import fetch

    return fetch("smollm2-135m", MODELS_DIR)


@pytest.fixture
def pg_url():
    from sqlalchemy import create_engine, text

    name = f"tokenfarm_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


def service_env(data_dir: Path, database_url: str = "", broker_url: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFARM_")}
    env.update(TOKENFARM_DATA_DIR=str(data_dir), TOKENFARM_MODELS_DIR=str(MODELS_DIR))
    # No extra check jobs unless a test asks for them (tests/integration/test_checks.py does),
    # so the other tests can count their jobs.
    env.update(TOKENFARM_CANARY_FRACTION="0", TOKENFARM_CROSSCHECK_FRACTION="0")
    if database_url:
        env["TOKENFARM_DATABASE_URL"] = database_url
    if broker_url:
        env["TOKENFARM_BROKER_URL"] = broker_url
    return env


def tokenfarm(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([TOKENFARM, *args], env=env, capture_output=True, text=True, timeout=timeout)


def at_head(env: dict[str, str]) -> dict[str, str]:
    """The env's database migrated: only `tokenfarm db upgrade` migrates, every other command checks."""
    proc = tokenfarm(env, "db", "upgrade", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return env


def register_worker(env: dict[str, str], name: str) -> str:
    proc = tokenfarm(env, "workers", "add", name, "--rotate", "--quiet", timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@contextmanager
def worker_process(env: dict[str, str], name: str, log_path: Path, entry: list[str] | None = None):
    """A real worker process with its own token; a worker never gets the database URL.
    entry: what to run instead of `python -m worker` (a test's dishonest worker)."""
    token = register_worker(env, name)
    worker_env = {k: v for k, v in env.items() if k != "TOKENFARM_DATABASE_URL"}
    worker_env["TOKENFARM_WORKER_TOKEN"] = token
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, *(entry or ["-m", "worker"]), "--name", name], env=worker_env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM (a worker finishes its job, a server closes), then SIGKILL if it does not end in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
