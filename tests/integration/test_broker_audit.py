"""BrokerAudit on real Redis and PostgreSQL: a queued job whose message the broker lost is sent
again, one taken by a worker that never ran it is put back, and nothing else is touched."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import redis
from kombu import Queue
from sqlalchemy import create_engine, select

from farm.broker import RESULTS_QUEUE, create_app, job_queue, publish_envelope
from farm.contract import Envelope
from farm.settings import Settings
from orchestrator.broker_audit import broker_snapshot
from orchestrator.db import JobRow, session_scope, upgrade
from orchestrator.dispatch import BrokerAudit, send
from orchestrator.lifecycle import record
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
    assert len({job_queue(j) for j in jobs}) == 1  # one queue to look in
    yield engine, create_app(Settings(broker_url=redis_url)), jobs
    engine.dispose()


def waiting_ids(client: redis.Redis, queue: str) -> Counter:
    return Counter(json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1))


def updated_at(engine, job_id: str):
    with session_scope(engine) as s:
        return s.scalar(select(JobRow.updated_at).where(JobRow.id == job_id))


def test_a_lost_message_is_sent_again_after_two_audits_and_nothing_else_is(farm, redis_url):
    engine, app, jobs = farm
    send(app, jobs)
    client = redis.Redis.from_url(redis_url)
    lost, queue = jobs[0].job_id, job_queue(jobs[0])
    # What Redis going down between a worker's BRPOP and kombu's bookkeeping leaves: no trace.
    (message,) = [m for m in client.lrange(queue, 0, -1) if json.loads(m)["headers"]["id"] == lost]
    assert client.lrem(queue, 1, message) == 1
    audit = BrokerAudit(grace_s=0.0)
    assert audit.run(engine, app) == 0  # one look is not proof: a message in motion can be missed
    assert lost not in waiting_ids(client, queue)
    before = updated_at(engine, lost)
    assert audit.run(engine, app) == 1
    assert updated_at(engine, lost) > before  # queued anew, so not judged again for grace_s
    assert waiting_ids(client, queue) == Counter(j.job_id for j in jobs)  # each exactly once
    assert audit.run(engine, app) == 0 and audit.run(engine, app) == 0
    assert waiting_ids(client, queue) == Counter(j.job_id for j in jobs)


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


def test_a_job_queued_less_than_the_grace_period_is_not_judged(farm, redis_url):
    engine, app, jobs = farm
    audit = BrokerAudit(grace_s=3600.0)  # nothing was sent, but everything was queued just now
    assert audit.run(engine, app) == 0 and audit.run(engine, app) == 0
    assert broker_snapshot(app).jobs == {}


def test_a_job_taken_and_never_run_is_put_back_and_a_delayed_retry_is_left_alone(farm, redis_url):
    engine, app, jobs = farm
    stranded, delayed, waiting = jobs
    send(app, [stranded])
    send(app, [delayed], countdown_s=3600)  # a retry waiting out its pause inside a worker
    # A worker takes both and loses its connection before it runs either: kombu keeps them as
    # taken (it would give them back only after the hour-long visibility timeout).
    holder = app.connection_for_read()
    taker = Queue(job_queue(stranded)).bind(holder.channel())
    assert all(taker.get(no_ack=False, accept=["json"]) is not None for _ in range(2))
    send(app, [waiting])
    (s,), (d,), (w,) = (broker_snapshot(app).jobs[j.job_id] for j in jobs)
    assert s.taken_at and d.taken_at and d.eta and w.taken_at is None
    audit = BrokerAudit(grace_s=0.0)
    assert audit.run(engine, app) == 0
    assert audit.run(engine, app) == 1
    (s,), (d,), (w,) = (broker_snapshot(app).jobs[j.job_id] for j in jobs)
    assert s.taken_at is None  # back in its queue, not copied
    assert d.taken_at is not None
    client = redis.Redis.from_url(redis_url)
    assert waiting_ids(client, job_queue(stranded)) == Counter([stranded.job_id, waiting.job_id])
    assert client.hlen("unacked") == 1
    holder.close()


def test_a_finished_jobs_message_left_taken_is_dropped_and_a_running_jobs_is_kept(farm, redis_url):
    engine, app, jobs = farm
    killed, running, failed = jobs
    send(app, [killed, running])
    # A worker killed mid-job leaves its message taken; the job was re-sent and done elsewhere.
    holder = app.connection_for_read()
    taker = Queue(job_queue(killed)).bind(holder.channel())
    assert all(taker.get(no_ack=False, accept=["json"]) is not None for _ in range(2))
    with session_scope(engine) as s:
        s.get(JobRow, killed.job_id).state = "done"
        s.get(JobRow, running.job_id).state = "running"
        s.get(JobRow, failed.job_id).state = "failed"
    audit = BrokerAudit(grace_s=0.0)
    assert audit.run(engine, app) == 0 and audit.run(engine, app) == 0  # nothing sent: only forgotten
    held = broker_snapshot(app).jobs
    assert killed.job_id not in held and held[running.job_id][0].taken_at is not None
    holder.close()


def test_a_running_job_is_never_the_audits_business(farm, redis_url):
    engine, app, jobs = farm
    with session_scope(engine) as s:
        for row in s.scalars(select(JobRow)):
            row.state = "running"
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
    assert waiting_ids(redis.Redis.from_url(redis_url), job_queue(jobs[0])) == Counter(j.job_id for j in jobs)


def test_the_audit_sees_put_back_and_drops_inside_confined_workers_prefixes(farm, redis_url):
    """On a confined broker each worker's queue and unacked hash live under tf:w:NAME:; the audit
    reads them as the admin user, and puts back or drops a taken message inside its own prefix."""
    from orchestrator.brokerusers import prefixed_connection
    from orchestrator.dispatch import send_to_worker

    engine, _, jobs = farm
    app = create_app(Settings(broker_url=redis_url, broker_confined=True))
    stranded, finished, waiting = jobs
    send_to_worker(app, stranded, "a")
    send_to_worker(app, finished, "a")
    send_to_worker(app, waiting, "b")
    client = redis.Redis.from_url(redis_url)
    assert waiting_ids(client, "tf:w:b:tokenfarm.worker.b") == Counter([waiting.job_id])
    with prefixed_connection(app, "tf:w:a:") as holder:  # worker a takes both, runs neither
        taker = Queue("tokenfarm.worker.a").bind(holder.channel())
        assert all(taker.get(no_ack=False, accept=["json"]) is not None for _ in range(2))
        assert client.hlen("tf:w:a:unacked") == 2 and not client.exists("unacked")
        held = broker_snapshot(app).jobs
        assert held[waiting.job_id][0].queue == "tokenfarm.worker.b" and held[waiting.job_id][0].taken_at is None
        assert held[stranded.job_id][0].taken_at and held[stranded.job_id][0].tag.startswith("tf:w:a:")
        with session_scope(engine) as s:
            s.get(JobRow, finished.job_id).state = "done"
        audit = BrokerAudit(grace_s=0.0)
        assert audit.run(engine, app) == 0
        assert audit.run(engine, app) == 1  # stranded put back; finished's copy dropped
        assert waiting_ids(client, "tf:w:a:tokenfarm.worker.a") == Counter([stranded.job_id])
        assert client.hlen("tf:w:a:unacked") == 0
        assert waiting_ids(client, "tf:w:b:tokenfarm.worker.b") == Counter([waiting.job_id])
