"""A confined broker (issue 18): each worker's own Redis user, over TLS, reaches only its own keys.

On a redis-server of the test's own (TLS only, ACL file, loopback): an honest worker runs a sweep
through its confined user, the real collector storing what it sends; meanwhile a registered
stranger, with its own valid user and token, tries what a worker must not do, and Redis refuses
each. The sweep still ends with every job stored once, and Redis's ACL log names only the stranger.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, select

from farm.broker import RESULTS_QUEUE, signed_body, worker_keyprefix, worker_queue
from farm.contract import Envelope
from farm.settings import Settings
from orchestrator.db import JobRow, RejectionRow, ResultRow, WorkerRow, session_scope
from tests.integration.conftest import (
    MODELS_DIR,
    TOKENFARM,
    at_head,
    enrol_worker,
    service_env,
    tokenfarm,
    wait_until,
    worker_process,
)

pytestmark = pytest.mark.integration

SWEEP = """\
name: confined
models:
  - name: smollm2-135m
    quants: [Q4_1]
n_prompt: [32]
n_gen: [8, 16]
repetitions: 2
n_warmup: 1
"""


def confined_env(tmp_path: Path, pg_url: str, server) -> dict[str, str]:
    env = service_env(tmp_path / "data", pg_url, server.admin_url)
    env.update(TOKENFARM_BROKER_CA_FILE=str(server.ca_file), TOKENFARM_BROKER_CONFINED="1")
    return at_head(env)


def add_worker(env: dict[str, str], name: str) -> tuple[str, str]:
    """(token, broker URL) from `tokenfarm workers add NAME --quiet` on a confined farm."""
    token, url = enrol_worker(env, name)
    assert url.startswith("rediss://w%3A" + name + ":")
    return token, url


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(database_url=env["TOKENFARM_DATABASE_URL"], broker_url=env["TOKENFARM_BROKER_URL"],
                    broker_ca_file=Path(env["TOKENFARM_BROKER_CA_FILE"]), broker_confined=True,
                    data_dir=Path(env["TOKENFARM_DATA_DIR"]), models_dir=MODELS_DIR)


def submit_to(env: dict[str, str], tmp_path: Path, worker: str, sweep: str = SWEEP) -> tuple[str, list[str]]:
    """`tokenfarm sweep submit`: the orchestrator's scheduler leases each job to a live worker."""
    path = tmp_path / "confined.yaml"
    path.write_text(sweep)
    proc = tokenfarm(env, "sweep", "submit", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    engine = create_engine(env["TOKENFARM_DATABASE_URL"])
    with session_scope(engine) as session:
        rows = session.scalars(select(JobRow)).all()
        sweep_id, job_ids = rows[0].sweep_id, [r.id for r in rows]
    engine.dispose()
    return sweep_id, job_ids


def attempts(honest: str, mallory: str, script_sha: str) -> list[tuple[str, tuple]]:
    """What a registered worker must not be able to do, as the Redis commands that would do it."""
    queue = worker_keyprefix(honest) + worker_queue(honest)
    own = worker_keyprefix(mallory)
    job = json.dumps({"body": "", "headers": {"task": "tokenfarm.run_job"}, "properties": {}})
    return [
        ("read another worker's queue", ("LRANGE", queue, 0, -1)),
        ("read another worker's queue's length", ("LLEN", queue)),
        ("pop another worker's queue", ("RPOP", queue)),
        ("pop another worker's queue, blocking", ("BRPOP", queue, 1)),
        ("move another worker's job into its own queue", ("LMOVE", queue, own + "stolen", "RIGHT", "LEFT")),
        ("delete another worker's queue", ("DEL", queue)),
        ("read another worker's unacked messages", ("HGETALL", worker_keyprefix(honest) + "unacked")),
        ("read one of another worker's unacked messages", ("HGET", worker_keyprefix(honest) + "unacked", "tag")),
        ("read another worker's unacked index", ("ZRANGE", worker_keyprefix(honest) + "unacked_index", 0, -1)),
        ("take another worker's restore mutex", ("SET", worker_keyprefix(honest) + "unacked_mutex", "x", "NX")),
        ("push a job into another worker's queue", ("LPUSH", queue, job)),
        ("push a job into a shared class queue", ("LPUSH", "tokenfarm.jobs", job)),
        ("push a result under another worker's prefix", ("LPUSH", worker_keyprefix(honest) + RESULTS_QUEUE, "{}")),
        ("push a result past the relay, onto the collector's queue", ("LPUSH", RESULTS_QUEUE, "{}")),
        ("list every key", ("KEYS", "*")),
        ("scan every key", ("SCAN", 0)),
        ("erase every database", ("FLUSHALL",)),
        ("erase the database", ("FLUSHDB",)),
        ("change the server's configuration", ("CONFIG", "SET", "maxmemory", "1")),
        ("read the server's configuration", ("CONFIG", "GET", "requirepass")),
        ("watch every command sent", ("MONITOR",)),
        ("list the clients", ("CLIENT", "LIST")),
        ("kill another client", ("CLIENT", "KILL", "USER", f"w:{honest}")),
        ("read the users", ("ACL", "LIST")),
        ("widen its own user", ("ACL", "SETUSER", f"w:{mallory}", "~*", "+@all")),
        ("delete another worker's user", ("ACL", "DELUSER", f"w:{honest}")),
        ("run a script on another worker's queue", ("EVAL", "return redis.call('rpop', KEYS[1])", 1, queue)),
        ("run a loaded script on another worker's queue", ("EVALSHA", script_sha, 1, queue)),
        ("flush the loaded scripts", ("SCRIPT", "FLUSH")),
        ("subscribe to another worker's channel", ("SUBSCRIBE", worker_keyprefix(honest) + "/0.celery.pidbox")),
        ("subscribe to every channel", ("PSUBSCRIBE", "*")),
        ("publish on a channel", ("PUBLISH", "/0.celery.pidbox", "{}")),
        ("switch to another database", ("SELECT", 1)),
        ("rename its own key over another worker's queue", ("RENAME", own + "x", queue)),
        ("read the server's state", ("INFO",)),
        ("shut the server down", ("SHUTDOWN", "NOSAVE")),
    ]


def test_an_honest_confined_worker_runs_its_sweep_and_a_stranger_is_refused_everything(
        tmp_path, pg_url, confined_redis, smollm2):
    env = confined_env(tmp_path, pg_url, confined_redis)
    _, mallory_url = add_worker(env, "mallory")
    admin = confined_redis.client()
    admin.execute_command("ACL", "LOG", "RESET")
    mallory = confined_redis.client(mallory_url)
    # A script that pops another worker's queue without declaring the key: Redis checks the
    # keys a script touches against the caller's user, not only those it declares.
    sneaky_sha = mallory.script_load("return redis.call('rpop', 'tf:w:honest:tokenfarm.worker.honest')")
    with worker_process(env, "honest", tmp_path / "honest.log"):
        sweep_id, job_ids = submit_to(env, tmp_path, "honest")
        answers = []
        for what, command in attempts("honest", "mallory", sneaky_sha):
            try:
                reply = mallory.execute_command(*command)
            except redis.exceptions.NoPermissionError as exc:
                answers.append((what, command, f"NOPERM {exc}"))
                continue
            except redis.exceptions.ResponseError as exc:
                answers.append((what, command, f"ERR {exc}"))
                continue
            answers.append((what, command, f"ALLOWED: {reply!r}"))
        try:
            mallory.evalsha(sneaky_sha, 0)
            script_answer = "ALLOWED"
        except redis.exceptions.ResponseError as exc:
            script_answer = str(exc)
        # What it may do: its own keys, and a message forged under the honest worker's name sent
        # from there reaches the collector, which refuses it (it is not signed with honest's token).
        forged = signed_body(Envelope(kind="heartbeat", worker="honest"), "not-honest's-token")
        from kombu import Connection

        with Connection(mallory_url, transport="farm.broker:RedisTransport",
                        ssl={"ssl_cert_reqs": "required", "ssl_ca_certs": str(confined_redis.ca_file)},
                        transport_options={"global_keyprefix": worker_keyprefix("mallory")}) as conn:
            from farm.broker import publish_results

            publish_results(conn.Producer(), forged)
        waited = tokenfarm(env, "sweep", "wait", sweep_id, "--timeout", "400", timeout=450)
    report = "\n".join(f"{what}: {' '.join(map(str, command))[:90]} -> {answer[:140]}" for what, command, answer in answers)
    print("\nattempted violations and Redis's answers:\n" + report + f"\nscript popping an undeclared key: {script_answer}")
    assert waited.returncode == 0, waited.stdout + waited.stderr + (tmp_path / "honest.log").read_text()[-3000:]
    refused = [a for a in answers if not a[2].startswith("NOPERM")]
    assert refused == [], refused
    assert "can't access at least one of the keys" in script_answer
    engine = create_engine(env["TOKENFARM_DATABASE_URL"])
    with session_scope(engine) as s:
        rows = s.scalars(select(ResultRow)).all()
        assert sorted(r.job_id for r in rows) == sorted(job_ids)  # every job once
        assert {(r.status, r.worker) for r in rows} == {("ok", "honest")}
        assert {j.state for j in s.scalars(select(JobRow))} == {"done"}
        reasons = list(s.scalars(select(RejectionRow.reason)))
        assert any("bad signature" in r for r in reasons), reasons
        assert s.get(WorkerRow, "honest").n_done == len(job_ids)
    engine.dispose()
    # Every refusal was Mallory's: the honest worker's transport needs nothing outside its grant.
    log = admin.acl_log()
    assert log and {entry["username"] for entry in log} == {"w:mallory"}, log
    assert admin.llen(worker_keyprefix("honest") + worker_queue("honest")) == 0


def test_revoking_a_worker_closes_its_connection_and_its_password_stops_working(tmp_path, pg_url, confined_redis):
    env = confined_env(tmp_path, pg_url, confined_redis)
    _, url = add_worker(env, "leaver")
    client = confined_redis.client(url)
    assert client.lpush(worker_keyprefix("leaver") + "own", "x") == 1
    proc = tokenfarm(env, "workers", "revoke", "leaver")
    assert proc.returncode == 0, proc.stderr
    admin = confined_redis.client()
    assert wait_until(lambda: "user=w:leaver" not in admin.execute_command("CLIENT", "LIST").decode(), 5)
    fresh = confined_redis.client(url)
    with pytest.raises(redis.exceptions.AuthenticationError):
        fresh.ping()
    again = tokenfarm(env, "workers", "revoke", "leaver")
    assert again.returncode == 0 and "already revoked" in again.stdout


def test_a_worker_checks_the_brokers_certificate(tmp_path, pg_url, confined_redis):
    """A certificate from another CA is refused: TLS without the check would let a man in the
    middle read every job and result."""
    from orchestrator.brokercerts import make_certs

    env = confined_env(tmp_path, pg_url, confined_redis)
    _, url = add_worker(env, "careful")
    other = make_certs(tmp_path / "other-ca", ["127.0.0.1"])
    client = redis.Redis.from_url(url, ssl_ca_certs=str(other.ca_cert), ssl_cert_reqs="required")
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        client.ping()


FAST = "name: outage\nmodels: [smollm2-135m]\nn_prompt: [16, 24, 32]\nn_gen: [4, 6]\nrepetitions: 1\nn_warmup: 0\n"


def test_the_confined_broker_down_for_seconds_mid_sweep_loses_nothing(tmp_path, pg_url, confined_redis, smollm2):
    """test_chaos's broker outage, under TLS and per-worker users: Redis shut down and started
    again mid-sweep; the worker logs in again with its own user (kept in the ACL file by ACL SAVE),
    the collector with the admin user, and every job is stored once."""
    env = confined_env(tmp_path, pg_url, confined_redis)
    env.update(TOKENFARM_HEARTBEAT_S="1", TOKENFARM_WORKER_DEAD_AFTER_S="5")

    engine = create_engine(env["TOKENFARM_DATABASE_URL"])

    def n_stored() -> int:
        with session_scope(engine) as s:
            return len(s.scalars(select(ResultRow.job_id)).all())

    with worker_process(env, "patient", tmp_path / "patient.log"):
        sweep_id, job_ids = submit_to(env, tmp_path, "patient", FAST)
        waiter = subprocess.Popen([TOKENFARM, "sweep", "wait", sweep_id, "--timeout", "400"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_until(lambda: n_stored() >= 1, 120)
        n_before = n_stored()
        confined_redis.restart()
        out, errs = waiter.communicate(timeout=420)
    assert waiter.returncode == 0, out + errs + (tmp_path / "patient.log").read_text()[-3000:]
    assert n_before < len(job_ids), "every job was stored before the broker went down"
    with session_scope(engine) as s:
        assert sorted(s.scalars(select(ResultRow.job_id))) == sorted(job_ids)
    engine.dispose()
    assert b"w:patient" in confined_redis.client().execute_command("ACL", "USERS")


def test_a_job_of_a_confined_worker_killed_mid_job_is_redone_elsewhere_and_stored_once(
        tmp_path, pg_url, confined_redis, smollm2):
    import os
    import signal
    import time

    env = confined_env(tmp_path, pg_url, confined_redis)
    env.update(TOKENFARM_HEARTBEAT_S="1", TOKENFARM_WORKER_DEAD_AFTER_S="5")
    slow = "name: slow\nmodels: [smollm2-135m]\nn_prompt: []\nn_gen: [96]\nrepetitions: 5\nn_warmup: 1\n"
    engine = create_engine(env["TOKENFARM_DATABASE_URL"])

    def jobs():
        with session_scope(engine) as s:
            return [(j.state, j.worker) for j in s.scalars(select(JobRow))]

    collector = subprocess.Popen([TOKENFARM, "collector"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=open(tmp_path / "collector.log", "wb"))
    try:
        with worker_process(env, "victim", tmp_path / "victim.log") as victim:
            assert wait_until(lambda: subprocess.run([TOKENFARM, "workers"], env=env, capture_output=True,
                                                     text=True).stdout.count("victim") and _announced(engine, "victim"), 60)
            submit_to(env, tmp_path, "victim", slow)
            assert wait_until(lambda: jobs() == [("running", "victim")], 120), jobs()
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            victim.wait(timeout=30)
            with session_scope(engine) as s:
                assert s.scalar(select(ResultRow.job_id)) is None
    finally:
        collector.terminate()
        collector.wait(timeout=30)
    with worker_process(env, "rescuer", tmp_path / "rescuer.log"):
        with session_scope(engine) as s:
            sweep_id = s.scalar(select(JobRow.sweep_id))
        waited = tokenfarm(env, "sweep", "wait", sweep_id, "--timeout", "300")
        redone_after_s = time.monotonic() - killed_at
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert jobs() == [("done", "rescuer")]
    with session_scope(engine) as s:
        assert len(s.scalars(select(ResultRow)).all()) == 1
    engine.dispose()
    print(f"confined: job redone and stored {redone_after_s:.1f} s after the kill")


def _announced(engine, name: str) -> bool:
    with session_scope(engine) as s:
        row = s.get(WorkerRow, name)
        return row is not None and row.capabilities is not None
