"""Faults with real processes: a worker killed mid-job, the collector restarted, the broker down.

The collector restart, the broker that forgets and the database outage run twice: on plain-text
Redis, and on a TLS-only Redis where each worker has its own confined user (the worker kill and
the broker outage under TLS and ACLs are in test_confined_broker.py).

Real Redis and PostgreSQL on 127.0.0.1 (a private redis-server where the test stops it), real
worker processes killed by pid. What must hold: every job ends stored exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
from sqlalchemy import create_engine, func, select

from orchestrator.db import JobRow, ResultRow, session_scope
from tests.integration.conftest import (
    TOKENFARM,
    at_head,
    service_env,
    tokenfarm,
    wait_until,
    worker_process,
)

pytestmark = pytest.mark.integration

# One job long enough to be killed in the middle of: 6 runs of 96 decode steps.
SLOW = "name: {name}\nmodels: [smollm2-135m]\nn_prompt: []\nn_gen: [96]\nrepetitions: 5\nn_warmup: 1\n"
FAST = "name: {name}\nmodels: [smollm2-135m]\nn_prompt: [16, 24, 32]\nn_gen: [4, 6]\nrepetitions: 1\nn_warmup: 0\n"


def chaos_env(tmp_path: Path, database_url: str, broker_url: str) -> dict[str, str]:
    env = at_head(service_env(tmp_path / "data", database_url=database_url, broker_url=broker_url))
    # Short liveness windows so a dead worker is noticed in seconds, not the default 30 s.
    env.update(TOKENFARM_HEARTBEAT_S="1", TOKENFARM_WORKER_DEAD_AFTER_S="5")
    return env


def sweep_file(tmp_path: Path, template: str, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(template.format(name=name))
    return path


def job_rows(url: str) -> list[JobRow]:
    engine = create_engine(url)
    with session_scope(engine) as s:
        rows = list(s.scalars(select(JobRow)))
    engine.dispose()
    return rows


def n_results(url: str) -> int:
    engine = create_engine(url)
    with session_scope(engine) as s:
        n = s.scalar(select(func.count()).select_from(ResultRow))
    engine.dispose()
    return n


def test_a_job_of_a_worker_killed_mid_job_is_redone_elsewhere_and_stored_once(tmp_path, pg_url, redis_url, smollm2):
    env = chaos_env(tmp_path, pg_url, redis_url)
    sweep = sweep_file(tmp_path, SLOW, "slow")
    assert tokenfarm(env, "sweep", "submit", str(sweep)).returncode == 0
    # Nobody collects yet, so run a collector that records "started" while worker A works.
    collector = subprocess.Popen([TOKENFARM, "collector"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with worker_process(env, "victim", tmp_path / "victim.log") as victim:
            assert wait_until(lambda: any(j.state == "running" and j.worker == "victim" for j in job_rows(pg_url)), 120)
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            victim.wait(timeout=30)
            # The kill struck mid-job: nothing was stored and the job is still the victim's.
            assert n_results(pg_url) == 0
            assert [(j.state, j.worker) for j in job_rows(pg_url)] == [("running", "victim")]
            assert results_waiting(redis_url) == 0, "the victim finished before it was killed"
    finally:
        collector.terminate()
        collector.wait(timeout=30)
    with worker_process(env, "rescuer", tmp_path / "rescuer.log"):
        waited = tokenfarm(env, "sweep", "wait", "slow", "--timeout", "300")
        redone_after_s = time.monotonic() - killed_at
    assert waited.returncode == 0, waited.stdout + waited.stderr
    (job,) = job_rows(pg_url)
    assert job.state == "done" and job.worker == "rescuer" and job.attempts == 2
    assert n_results(pg_url) == 1
    print(f"job redone and stored {redone_after_s:.1f} s after the kill")


@pytest.fixture(params=["plain", "tls+acl"])
def broker(request, tmp_path) -> "Broker":
    """The shared plain-text Redis (a database of this test worker's own), or a TLS-only
    redis-server whose workers each have their own confined Redis user."""
    if request.param == "plain":
        return Broker(request.getfixturevalue("redis_url"), {}, None)
    server = request.getfixturevalue("confined_redis")
    return Broker(server.admin_url, {"TOKENFARM_BROKER_CA_FILE": str(server.ca_file),
                                     "TOKENFARM_BROKER_CONFINED": "1"}, server)


class Broker:
    def __init__(self, url: str, env: dict[str, str], server) -> None:
        self.url, self.env, self.server = url, env, server

    def results_waiting(self) -> int:
        """Result messages no collector has taken yet: in the results queue, and on a confined
        broker also in the workers' own results lists, before the relay moves them."""
        if self.server is None:
            return results_waiting(self.url)
        from farm.broker import RESULTS_QUEUE

        client = self.server.client()
        try:
            return client.llen(RESULTS_QUEUE) + sum(client.llen(k) for k in client.scan_iter(f"tf:w:*:{RESULTS_QUEUE}"))
        finally:
            client.close()


def test_the_collector_restarted_mid_sweep_loses_nothing(tmp_path, pg_url, broker, smollm2):
    env = chaos_env(tmp_path, pg_url, broker.url)
    env.update(broker.env)
    sweep = sweep_file(tmp_path, FAST, "fast")
    with worker_process(env, "steady", tmp_path / "steady.log"):
        first = subprocess.Popen([TOKENFARM, "sweep", "submit", str(sweep), "--wait"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: n_results(pg_url) >= 1, 120)
        first.kill()  # the orchestrator dies mid-sweep; results keep arriving in the queue
        first.wait()
        n_stored_at_kill = n_results(pg_url)
        assert n_stored_at_kill < 5, "every job was stored before the collector was killed"
        # A result that arrives while nobody collects: the restarted collector must pick it up.
        assert wait_until(lambda: broker.results_waiting() >= 1 or n_results(pg_url) == 5, 120)
        waited = tokenfarm(env, "sweep", "wait", "fast", "--timeout", "300")
    assert waited.returncode == 0, waited.stderr
    assert n_results(pg_url) == 5
    assert {j.state for j in job_rows(pg_url)} == {"done"}


def results_waiting(broker_url: str) -> int:
    """Result messages in the queue that no collector has taken yet."""
    import redis

    from farm.broker import RESULTS_QUEUE

    client = redis.Redis.from_url(broker_url)
    try:
        return client.llen(RESULTS_QUEUE)
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private_redis(data_dir: Path, persistent: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """A redis-server of the test's own: (its URL, a function that stops and restarts it).
    persistent: appendonly keeps the queues across a restart, as a production Redis does;
    without it a restart starts empty."""
    port = _free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "yes" if persistent else "no", "--dir", str(data_dir)]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0, 20)
        return proc

    procs = [start()]

    def restart() -> None:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", *([] if persistent else ["nosave"])], capture_output=True)
        procs[0].wait(timeout=20)
        time.sleep(4.0)
        procs[0] = start()

    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        procs[0].terminate()
        procs[0].wait(timeout=20)


needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to run a private broker")


@needs_redis_server
def test_the_broker_down_for_seconds_mid_sweep_loses_nothing(tmp_path, pg_url, smollm2):
    with private_redis(tmp_path, persistent=True) as (broker_url, restart):
        env = chaos_env(tmp_path, pg_url, broker_url)
        sweep = sweep_file(tmp_path, FAST, "outage")
        with worker_process(env, "patient", tmp_path / "patient.log"):
            waiter = subprocess.Popen([TOKENFARM, "sweep", "submit", str(sweep),
                                       "--wait", "--timeout", "400"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            assert wait_until(lambda: n_results(pg_url) >= 1, 120)
            n_stored_before = n_results(pg_url)
            restart()
            assert n_stored_before < 5, "every job was stored before the broker went down"
            out, errs = waiter.communicate(timeout=420)
        assert waiter.returncode == 0, out + errs
        assert n_results(pg_url) == 5


@contextmanager
def amnesiac_broker(kind: str, tmp_path: Path, request) -> Iterator[tuple[str, dict[str, str], Callable[[], None]]]:
    """(URL, env, restart) of a broker of the test's own that forgets every message on a restart:
    plain, or TLS-only with per-worker users (which survive in its ACL file)."""
    if kind == "plain":
        with private_redis(tmp_path, persistent=False) as (url, restart):
            yield url, {}, restart
        return
    server = request.getfixturevalue("confined_redis")
    yield server.admin_url, {"TOKENFARM_BROKER_CA_FILE": str(server.ca_file), "TOKENFARM_BROKER_CONFINED": "1"}, \
        lambda: server.restart(empty=True)


@needs_redis_server
@pytest.mark.parametrize("kind", ["plain", "tls+acl"])
def test_jobs_a_broker_restarted_without_its_data_lost_are_sent_again(tmp_path, pg_url, smollm2, kind, request):
    with amnesiac_broker(kind, tmp_path, request) as (broker_url, broker_env, restart):
        env = chaos_env(tmp_path, pg_url, broker_url)
        env.update(broker_env)
        # Long enough for the worker to stay live across the restart, so its jobs keep their lease.
        env["TOKENFARM_WORKER_DEAD_AFTER_S"] = "15"
        sweep = sweep_file(tmp_path, FAST, "amnesia")
        with worker_process(env, "patient", tmp_path / "patient.log") as first:
            assert wait_until(lambda: " ready." in (tmp_path / "patient.log").read_text(errors="replace"), 120)
        del first  # stopped: what it announced is taken in below, and its jobs wait in its queue
        assert "hello" in tokenfarm(env, "collector", "--once").stdout
        submitted = tokenfarm(env, "sweep", "submit", str(sweep))
        assert submitted.returncode == 0 and "2 sent to workers now" in submitted.stdout, submitted.stdout
        restart()  # the two sent jobs' messages are gone; the database still has them sent to patient
        started = time.monotonic()
        with worker_process(env, "patient", tmp_path / "patient.log"):
            waited = tokenfarm(env, "sweep", "wait", "amnesia", "--timeout", "300")
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert waited.stderr.count("its message was lost by the broker; sent again") == 2, waited.stderr
        assert n_results(pg_url) == 5
        assert {(j.state, j.attempts) for j in job_rows(pg_url)} == {("done", 1)}  # the same lease, sent again
        print(f"2 lost jobs sent again and all 5 stored in {time.monotonic() - started:.1f} s")


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


def _as_postgres(args: list[str]) -> list[str]:
    # The server refuses to run as root; CI runs as root, a developer may run as themselves.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.mark.skipif(_postgres_bin() is None, reason="needs PostgreSQL's server binaries to run a private database")
def test_the_database_down_for_seconds_mid_sweep_loses_nothing(tmp_path, broker, smollm2):
    bin_dir = _postgres_bin()
    port = _free_port()
    # Outside pytest's tmp_path: the postgres user cannot enter root's private temp folders.
    pg_dir = Path(tempfile.mkdtemp(prefix="tokenfarm-pg-"))
    if os.geteuid() == 0:
        shutil.chown(pg_dir, "postgres", "postgres")
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(pg_dir / "data"), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(pg_dir / "data"), "-l", str(pg_dir / "log"),
              "-o", f"-p {port} -k {pg_dir} -c listen_addresses=127.0.0.1"]

    def pg(action: str) -> None:
        subprocess.run(_as_postgres([*pg_ctl, "-w", "-m", "fast", action]), check=True, capture_output=True)

    pg("start")
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    env = chaos_env(tmp_path, url, broker.url)
    env.update(broker.env)
    sweep = sweep_file(tmp_path, FAST, "db-outage")
    try:
        with worker_process(env, "patient", tmp_path / "patient.log"):
            waiter = subprocess.Popen([TOKENFARM, "sweep", "submit", str(sweep), "--wait", "--timeout", "400"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert wait_until(lambda: n_results(url) >= 1, 120)
            pg("stop")
            # Results keep arriving in the queue while the only writer cannot write: the outage
            # lasts until one does, so the collector has something to catch up on.
            assert wait_until(lambda: broker.results_waiting() >= 1, 120), "no result arrived during the outage"
            pg("start")
            out, errs = waiter.communicate(timeout=420)
        assert waiter.returncode == 0, out + errs
        assert n_results(url) == 5
        assert {j.state for j in job_rows(url)} == {"done"}
    finally:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(pg_dir, ignore_errors=True)
