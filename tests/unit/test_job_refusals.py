"""A worker's report of a job message it refused, and a revoked worker, at the real collector
(embedded SQLite after Alembic's upgrade)."""

from __future__ import annotations

from sqlalchemy import select

from farm.broker import signed_body
from farm.contract import Envelope
from orchestrator.collector import ingest
from orchestrator.db import REFUSED_JOB, JobRow, RejectionRow, WorkerRow, session_scope
from orchestrator.lifecycle import record
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from orchestrator.workers import add_worker, list_workers, revoke_worker


def farm(engine):
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_prompt=[16], n_gen=[4], repetitions=1)
    jobs = plan(spec)
    with session_scope(engine) as s:
        record(s, spec, jobs)
        token = add_worker(s, "w1")
    return jobs, token


def test_a_refused_job_is_kept_and_counted_but_changes_no_job_and_is_not_held_against_the_worker(engine):
    jobs, token = farm(engine)
    # A forger reused a real job's id: the refusal must not fail that job.
    body = signed_body(Envelope(kind="refused", job_id=jobs[0].job_id, worker="w1",
                                reason="tampered: the job's signature does not match it"), token)
    with session_scope(engine) as s:
        outcome = ingest(s, body)
    assert outcome.action == "job_refused"
    with session_scope(engine) as s:
        assert s.get(JobRow, jobs[0].job_id).state == "queued"
        assert s.get(WorkerRow, "w1").n_rejected == 0
        (row,) = s.scalars(select(RejectionRow)).all()
        assert row.reason == REFUSED_JOB + "tampered: the job's signature does not match it"
        (view,) = list_workers(s)
    assert view.n_jobs_refused == 1 and view.n_rejected == 0 and view.last_rejection == ""


def test_a_refusal_under_another_workers_name_is_refused_itself(engine):
    jobs, token = farm(engine)
    body = signed_body(Envelope(kind="refused", job_id=jobs[0].job_id, worker="w1", reason="expired: x"), "f" * 64)
    with session_scope(engine) as s:
        assert ingest(s, body).action == "rejected"
    with session_scope(engine) as s:
        (view,) = list_workers(s)
    # Kept as a rejection, but not counted against w1: nothing proves w1 sent it.
    assert view.n_jobs_refused == 0 and view.n_rejected == 0
    with session_scope(engine) as s:
        assert "bad signature" in s.scalars(select(RejectionRow.reason)).one()


def test_a_revoked_worker_is_refused_and_readmitted_only_with_a_new_token(engine):
    jobs, token = farm(engine)
    beat = signed_body(Envelope(kind="heartbeat", worker="w1"), token)
    with session_scope(engine) as s:
        assert ingest(s, beat).action == "heartbeat"
        revoke_worker(s, "w1")
    with session_scope(engine) as s:
        outcome = ingest(s, beat)
        assert outcome.action == "rejected" and "revoked" in outcome.reason
        # An HMAC under the empty token is one anybody can make: it proves nothing.
        assert ingest(s, signed_body(Envelope(kind="heartbeat", worker="w1"), "")).action == "rejected"
        (view,) = list_workers(s)
        assert view.revoked
    with session_scope(engine) as s:
        new_token = add_worker(s, "w1", rotate=True)
    with session_scope(engine) as s:
        assert ingest(s, beat).action == "rejected"
        assert ingest(s, signed_body(Envelope(kind="heartbeat", worker="w1"), new_token)).action == "heartbeat"
