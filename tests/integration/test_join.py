"""The join line and revocation with real processes: `tokenfarm workers add` prints a line, a
worker box with nothing but its own data dir runs it and serves a sweep on Redis and PostgreSQL;
after `tokenfarm workers revoke`, what it sends is refused and its job is not stored."""

from __future__ import annotations

import stat
import subprocess

import pytest
from sqlalchemy import create_engine, select

from farm.join import JoinCode, read_env_file
from orchestrator.db import JobRow, RejectionRow, ResultRow, session_scope
from tests.integration.conftest import TOKENFARM, at_head, service_env, stop_process, tokenfarm, wait_until

pytestmark = pytest.mark.integration

SWEEP = "name: {name}\nmodels: [smollm2-135m]\nn_prompt: [16]\nn_gen: []\nrepetitions: 1\nn_warmup: 0\n"


def test_a_worker_joins_with_the_printed_line_and_is_shut_out_when_revoked(tmp_path, pg_url, redis_url, smollm2):
    env = at_head(service_env(tmp_path / "orchestrator", database_url=pg_url, broker_url=redis_url))
    added = tokenfarm(env, "workers", "add", "joiner", "--broker-address", redis_url)
    assert added.returncode == 0, added.stderr
    (line,) = [l.strip() for l in added.stdout.splitlines() if l.strip().startswith("tokenfarm worker join ")]
    code = line.split()[-1]
    assert JoinCode.decode(code).jobs_public_key == tokenfarm(env, "keys", "show").stdout.strip()

    # The worker's box: its own data dir, no broker URL, token or key but what the line carries.
    box = {k: v for k, v in service_env(tmp_path / "box").items()
           if k not in ("TOKENFARM_BROKER_URL", "TOKENFARM_DATABASE_URL")}
    env_file = tmp_path / "box" / "joiner.env"
    log = tmp_path / "joiner.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([TOKENFARM, *line.split()[1:], "--env-file", str(env_file)], env=box,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until(env_file.exists, timeout=60), log.read_text()
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        settings = read_env_file(env_file)
        assert settings["TOKENFARM_WORKER_NAME"] == "joiner" and settings["TOKENFARM_BROKER_URL"] == redis_url
        first = tmp_path / "first.yaml"
        first.write_text(SWEEP.format(name="first"))
        done = tokenfarm(env, "sweep", "submit", str(first), "--wait", "--timeout", "300")
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()[-3000:]

        assert tokenfarm(env, "workers", "revoke", "joiner").returncode == 0
        second = tmp_path / "second.yaml"
        second.write_text(SWEEP.format(name="second"))
        assert tokenfarm(env, "sweep", "submit", str(second)).returncode == 0
        engine = create_engine(pg_url)
        with session_scope(engine) as s:
            (later,) = s.scalars(select(JobRow.id).where(JobRow.state == "queued")).all()
        # The revoked worker is never leased a job; its heartbeats are refused as revoked.
        n_before = len(log.read_text())
        assert wait_until(lambda: tokenfarm(env, "collector", "--once", timeout=120).returncode == 0 and
                          _revoked_rejections(engine) >= 1, timeout=60)
        assert proc.poll() is None
        assert f"job {later}" not in log.read_text()[n_before:]
    finally:
        stop_process(proc)
    with session_scope(engine) as s:
        assert s.get(JobRow, later).state == "queued" and s.get(JobRow, later).worker is None
        assert s.get(ResultRow, later) is None
        assert len(s.scalars(select(ResultRow)).all()) == 1  # the first sweep's, from before the revocation
    engine.dispose()


def _revoked_rejections(engine) -> int:
    with session_scope(engine) as s:
        return len([r for r in s.scalars(select(RejectionRow.reason)).all() if "revoked" in r])
