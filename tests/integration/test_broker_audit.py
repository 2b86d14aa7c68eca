"""BrokerAudit on real Redis and PostgreSQL: a sent job whose message the broker lost is sent
again under the same lease, one taken by a worker that never ran it is put back, a taken copy
no live lease answers to is dropped, and nothing else is touched."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import redis
from kombu import Queue
from sqlalchemy import create_engine, select

from farm.broker import RESULTS_QUEUE, create_app, publish_envelope, worker_queue
from farm.contract import Envelope, utc_now
from farm.settings import Settings
from orchestrator.broker_audit import broker_snapshot
from orchestrator.db import JobRow, WorkerRow, session_scope, upgrade
from orchestrator.workers import add_worker
from orchestrator.dispatch import BrokerAudit
from orchestrator.dispatch import send as dispatch_send
from orchestrator.lifecycle import lease, record
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from tests.integration.conftest import service_env, tokenfarm

pytestmark = pytest.mark.integration


@pytest.fixture
def farm(pg_url, redis_url):
    upgrade(pg_url)
    engine = create_engine(pg_url)
    spec = SweepSpec(name="audit", models=["smollm2-135m"], n_prompt=[16, 24], n_gen=[4], repetitions=1)
    jobs = plan(spec)
    with session_scope(engine) as s:
        record(s, spec, jobs)
        add_worker(s, "w1")
        s.flush()
        s.get(WorkerRow, "w1").last_seen = utc_now()  # alive: its jobs stay leased to it
    with session_scope(engine) as s:
        leased = [lease(s.get(JobRow, j.job_id), "w1") for j in jobs]  # all to one worker: one queue to look in
    yield engine, create_app(Settings(broker_url=redis_url)), leased
    engine.dispose()


QUEUE = worker_queue("w1")


def send(app, jobs):
    dispatch_send(app, [(j, "w1") for j in jobs])


def waiting_ids(client: redis.Redis, queue: str) -> Counter:
    return Counter(json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1))


def updated_at(engine, job_id: str):
    with session_scope(engine) as s:
        return s.scalar(select(JobRow.updated_at).where(JobRow.id == job_id))


def test_a_lost_message_is_sent_again_after_two_audits_and_nothing_else_is(farm, redis_url):
    engine, app, jobs = farm
    send(app, jobs)
    client = redis.Redis.from_url(redis_url)
    lost, queue = jobs[0].lease_id, QUEUE
    # What Redis going down between a worker's BRPOP and kombu's bookkeeping leaves: no trace.
    (message,) = [m for m in client.lrange(queue, 0, -1) if json.loads(m)["headers"]["id"] == lost]
    assert client.lrem(queue, 1, message) == 1
    audit = BrokerAudit(grace_s=0.0)
    assert audit.run(engine, app) == 0  # one look is not proof: a message in motion can be missed
    assert lost not in waiting_ids(client, queue)
    before = updated_at(engine, jobs[0].job_id)
    assert audit.run(engine, app) == 1
    assert updated_at(engine, jobs[0].job_id) > before  # sent anew, so not judged again for grace_s
    assert waiting_ids(client, queue) == Counter(j.lease_id for j in jobs)  # each exactly once, same lease
    assert audit.run(engine, app) == 0 and audit.run(engine, app) == 0
    assert waiting_ids(client, queue) == Counter(j.lease_id for j in jobs)


def test_nothing_is_judged_while_results_wait_for_a_collector(farm, redis_url):
    engine, app, jobs = farm
    send(app, jobs[1:])  # the first job was taken and acknowledged: its "started" waits below
    publish_envelope(app, Envelope(kind="started", job_id=jobs[0].job_id, worker="w1"), "t" * 64)
    audit = BrokerAudit(grace_s=0.0)
    assert audit.run(engine, app) == 0 and audit.run(engine, app) == 0
    assert broker_snapshot(app).n_results_waiting == 1
    # With the queue empty the audits judge again: nothing will store that "started" here, so
    # the job's message is gone as far as the database can tell, and it is sent again.
    redis.Redis.from_url(redis_url).delete(RESULTS_QUEUE)
    assert audit.run(engine, app) == 0
    assert audit.run(engine, app) == 1


def test_a_job_sent_less_than_the_grace_period_is_not_judged(farm, redis_url):
    engine, app, jobs = farm
    audit = BrokerAudit(grace_s=3600.0)  # nothing reached the broker, but everything was sent just now
    assert audit.run(engine, app) == 0 and audit.run(engine, app) == 0
    assert broker_snapshot(app).jobs == {}


def test_a_job_taken_and_never_run_is_put_back(farm, redis_url):
    engine, app, jobs = farm
    stranded, waiting, lost = jobs
    send(app, [stranded])
    # A worker takes it and loses its connection before it runs it: kombu keeps it as taken (it
    # would give it back only after the hour-long visibility timeout).
    holder = app.connection_for_read()
    taker = Queue(QUEUE).bind(holder.channel())
    assert taker.get(no_ack=False, accept=["json"]) is not None
    send(app, [waiting, lost])
    (s,), (w,), _ = (broker_snapshot(app).jobs[j.lease_id] for j in jobs)
    assert s.taken_at and w.taken_at is None
    with session_scope(engine) as session:
        session.get(JobRow, lost.job_id).state = "running"  # its worker took it and said so
    client = redis.Redis.from_url(redis_url)
    client.lrem(QUEUE, 1, next(m for m in client.lrange(QUEUE, 0, -1) if json.loads(m)["headers"]["id"] == lost.lease_id))
    audit = BrokerAudit(grace_s=0.0)
    assert audit.run(engine, app) == 0
    assert audit.run(engine, app) == 1
    (s,), (w,) = (broker_snapshot(app).jobs[j.lease_id] for j in (stranded, waiting))
    assert s.taken_at is None  # back in its queue, not copied
    assert waiting_ids(client, QUEUE) == Counter([stranded.lease_id, waiting.lease_id])
    assert client.hlen("unacked") == 0
    holder.close()


def test_taken_copies_no_live_lease_answers_to_are_dropped_and_a_running_jobs_is_kept(farm, redis_url):
    engine, app, jobs = farm
    killed, running, superseded = jobs
    send(app, [killed, running, superseded])
    # A worker killed mid-job leaves its messages taken; one job was re-sent and done elsewhere,
    # another leased again (a new attempt) and waits in its new worker's queue.
    holder = app.connection_for_read()
    taker = Queue(QUEUE).bind(holder.channel())
    assert all(taker.get(no_ack=False, accept=["json"]) is not None for _ in range(3))
    with session_scope(engine) as s:
        s.get(JobRow, killed.job_id).state = "done"
        s.get(JobRow, running.job_id).state = "running"
        row = s.get(JobRow, superseded.job_id)
        row.state = "queued"
        again = lease(row, "w2")
    dispatch_send(app, [(again, "w2")])
    audit = BrokerAudit(grace_s=0.0)
    assert audit.run(engine, app) == 0 and audit.run(engine, app) == 0  # nothing sent: only forgotten
    held = broker_snapshot(app).jobs
    assert killed.lease_id not in held and superseded.lease_id not in held
    assert held[running.lease_id][0].taken_at is not None and held[again.lease_id][0].taken_at is None
    holder.close()


def test_a_running_job_is_never_the_audits_business(farm, redis_url):
    engine, app, jobs = farm
    with session_scope(engine) as s:
        for row in s.scalars(select(JobRow)):
            row.state = "running"  # taken and acknowledged by a solo pool: not in the broker
    audit = BrokerAudit(grace_s=0.0)
    assert audit.run(engine, app) == 0 and audit.run(engine, app) == 0
    assert broker_snapshot(app).jobs == {}


def test_the_embedded_broker_is_not_audited(farm, tmp_path):
    engine, _app, _jobs = farm
    embedded = create_app(Settings(data_dir=tmp_path))
    assert broker_snapshot(embedded) is None
    assert BrokerAudit(grace_s=0.0).run(engine, embedded) == 0


def test_sweep_resume_sends_what_the_broker_lost_and_not_what_waits(farm, pg_url, redis_url, tmp_path):
    engine, app, jobs = farm
    send(app, jobs[1:])  # the first job's message never made it
    resumed = tokenfarm(service_env(tmp_path, database_url=pg_url, broker_url=redis_url), "sweep", "resume", "audit")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 jobs sent again" in resumed.stdout
    assert waiting_ids(redis.Redis.from_url(redis_url), QUEUE) == Counter(j.lease_id for j in jobs)
