"""Forged jobs at a real worker process on Redis, counted by the real collector on PostgreSQL.

Someone with the broker's address pushes job messages straight into an honest worker's queue:
unsigned, signed with another key, tampered after signing (reusing a genuine job's id and seal),
expired, addressed to another worker, and a second copy of a genuine message the worker already
ran. Each is refused before the worker opens any file it names (an audit hook in the worker
records every open under the test's folder), reported, and stored by `tokenfarm collector` as
a refusal that is not held against the worker and changes no job; the genuine job is stored.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, select

from farm import jobsign
from farm.broker import RUN_JOB_TASK, create_app, worker_queue
from farm.contract import utc_now
from farm.settings import Settings
from orchestrator import keys
from orchestrator.db import REFUSED_JOB, JobRow, RejectionRow, ResultRow, WorkerRow, session_scope
from orchestrator.dispatch import job_args
from orchestrator.lifecycle import lease, record
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from orchestrator.workers import list_workers
from tests.integration.conftest import at_head, service_env, tokenfarm, wait_until, worker_process

pytestmark = pytest.mark.integration

WATCHED_WORKER = [str(Path(__file__).with_name("watched_worker.py"))]
FORGERIES = ("unsigned", "other_key", "tampered", "expired", "misaddressed")


def test_forged_jobs_are_refused_before_any_file_is_touched_and_counted(tmp_path, pg_url, redis_url, smollm2):
    data_dir = tmp_path / "data"
    env = at_head(service_env(data_dir, database_url=pg_url, broker_url=redis_url))
    watched = tmp_path / "watched"
    (watched / "forged").mkdir(parents=True)
    honest_model = watched / "honest.gguf"
    honest_model.symlink_to(smollm2)
    # Each forgery names a model file of its own that would run fine: only a refusal keeps it unopened.
    for kind in FORGERIES:
        (watched / "forged" / f"{kind}.gguf").symlink_to(smollm2)
    opens_log = tmp_path / "opens.log"
    public_key = tokenfarm(env, "keys", "show").stdout.strip()
    worker_env = {**env, "TF_TEST_WATCHED_DIR": str(watched), "TF_TEST_OPENS_LOG": str(opens_log),
                  "TOKENFARM_JOBS_PUBLIC_KEY": public_key}

    spec = SweepSpec(name="forged", models=[str(honest_model)], n_prompt=[16], n_gen=[], repetitions=1, n_warmup=0)
    (honest,) = plan(spec)
    engine = create_engine(pg_url)
    with session_scope(engine) as s:
        record(s, spec, [honest])
        honest = lease(s.get(JobRow, honest.job_id), "target")  # as the scheduler grants it
    # The orchestrator's own app and key, as `sweep submit` would use them.
    app = create_app(Settings(broker_url=redis_url, data_dir=data_dir))
    genuine_args = job_args(app, honest, "target")

    def forged(kind: str) -> tuple[str, list]:
        job_json = honest.model_copy(update={"job_id": f"forged-{kind}", "model": str(watched / "forged" / f"{kind}.gguf")}
                                     ).model_dump(mode="json")
        if kind == "unsigned":
            return job_json["job_id"], [job_json]
        if kind == "other_key":
            return job_json["job_id"], [job_json, jobsign.seal(job_json, Ed25519PrivateKey.generate(), utc_now() + timedelta(hours=1))]
        if kind == "tampered":  # the genuine job's id and seal, another file
            job_json = dict(genuine_args[0], model=job_json["model"])
            return job_json["job_id"], [job_json, genuine_args[1]]
        key = keys.signing_key(data_dir)
        if kind == "expired":  # a copy captured long ago, signed by this farm's key
            return job_json["job_id"], [job_json, jobsign.seal(job_json, key, utc_now() - timedelta(seconds=1))]
        return job_json["job_id"], [job_json, jobsign.seal(job_json, key, utc_now() + timedelta(hours=1), "another-worker")]

    def push(task_id: str, args: list) -> None:
        # What a stranger with the broker's address can do: a message straight into the worker's own queue.
        app.send_task(RUN_JOB_TASK, args=args, task_id=task_id, queue=worker_queue("target"))

    log = tmp_path / "target.log"
    forged_ids = {}
    for kind in FORGERIES:
        job_id, args = forged(kind)
        forged_ids[kind] = job_id
        push(job_id, args)
    push(honest.job_id, genuine_args)
    with worker_process(worker_env, "target", log, entry=WATCHED_WORKER) as proc:
        assert wait_until(lambda: f"job {honest.job_id}: ok" in log.read_text(), timeout=240), log.read_text()[-3000:]
        n_honest_opens = opens_log.read_text().splitlines().count(str(honest_model))
        push(honest.job_id, genuine_args)  # the same message again: a replay
        assert wait_until(lambda: "replayed" in log.read_text(), timeout=60), log.read_text()[-3000:]
        assert proc.poll() is None, "the worker died"
    collected = tokenfarm(env, "collector", "--once", timeout=120)
    assert collected.returncode == 0, collected.stderr

    opened = opens_log.read_text().splitlines()
    assert str(honest_model) in opened  # the hook sees what the worker opens...
    assert not [p for p in opened if "/forged/" in p]  # ...and no forged job's file was opened
    assert opened.count(str(honest_model)) == n_honest_opens  # nor the replayed job's, a second time
    with session_scope(engine) as s:
        refusals = {(r.job_id, r.reason.removeprefix(REFUSED_JOB).split(":")[0])
                    for r in s.scalars(select(RejectionRow).where(RejectionRow.reason.startswith(REFUSED_JOB)))}
        assert refusals == {*((forged_ids[k] if k != "tampered" else honest.job_id, k) for k in FORGERIES),
                            (honest.job_id, "replayed")}
        others = s.scalars(select(RejectionRow.reason).where(~RejectionRow.reason.startswith(REFUSED_JOB))).all()
        assert others == []  # nothing held against the worker: no "started" or result for a forged job
        assert s.get(WorkerRow, "target").n_rejected == 0
        (stored,) = s.scalars(select(ResultRow)).all()
        assert stored.job_id == honest.job_id and stored.status == "ok" and stored.model == str(honest_model)
        row = s.get(JobRow, honest.job_id)
        assert (row.state, row.attempts) == ("done", 1)
        (view,) = list_workers(s)  # what `tokenfarm workers` prints
        assert (view.n_jobs_refused, view.n_rejected, view.n_done) == (6, 0, 1)
    engine.dispose()


def test_a_worker_that_cannot_check_jobs_does_not_start(tmp_path, redis_url):
    env = service_env(tmp_path / "data", broker_url=redis_url)
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--name", "keyless"], capture_output=True, text=True, timeout=60,
        env={**env, "TOKENFARM_WORKER_TOKEN": "t" * 64})
    assert proc.returncode != 0
    assert "no jobs public key" in proc.stderr and "TOKENFARM_JOBS_PUBLIC_KEY" in proc.stderr


def test_a_genuine_job_refused_as_expired_is_sent_again_freshly_sealed(tmp_path, pg_url, redis_url, smollm2):
    from orchestrator.dispatch import BrokerAudit, send

    data_dir = tmp_path / "data"
    env = at_head(service_env(data_dir, database_url=pg_url, broker_url=redis_url))
    spec = SweepSpec(name="late", models=["smollm2-135m"], n_prompt=[16], n_gen=[], repetitions=1, n_warmup=0)
    (job,) = plan(spec)
    engine = create_engine(pg_url)
    with session_scope(engine) as s:
        record(s, spec, [job])
        job = lease(s.get(JobRow, job.job_id), "patient")
    # A job that waited in its queue past its allowance: sealed to expire at once.
    hasty = create_app(Settings(broker_url=redis_url, data_dir=data_dir, job_queue_allowance_s=0.001,
                                job_timeout_s=0.001))
    send(hasty, [(job, "patient")])
    log = tmp_path / "patient.log"
    with worker_process(env, "patient", log):
        assert wait_until(lambda: "expired" in log.read_text(), timeout=120), log.read_text()[-3000:]
        assert tokenfarm(env, "collector", "--once", timeout=120).returncode == 0
        app = create_app(Settings(broker_url=redis_url, data_dir=data_dir))
        audit = BrokerAudit(grace_s=0.0)
        assert audit.run(engine, app) == 0  # the first look only suspects
        assert audit.run(engine, app) == 1  # the second sends it again, with a new seal
        assert wait_until(lambda: f"job {job.job_id}: ok" in log.read_text(), timeout=120), log.read_text()[-3000:]
    assert tokenfarm(env, "collector", "--once", timeout=120).returncode == 0
    with session_scope(engine) as s:
        assert s.get(JobRow, job.job_id).state == "done"
        (refusal,) = s.scalars(select(RejectionRow.reason)).all()
        assert refusal.startswith(REFUSED_JOB + "expired")
    engine.dispose()
