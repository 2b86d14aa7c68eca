"""The job lifecycle's transitions, over a real (embedded) SQLite database after Alembic's upgrade."""

from datetime import timedelta

import pytest

from farm.contract import utc_now
from orchestrator import lifecycle
from orchestrator.db import JobRow, session_scope
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from orchestrator.workers import add_worker


@pytest.fixture
def job(engine):
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_prompt=[16], n_gen=[4], repetitions=2)
    jobs = plan(spec)
    with session_scope(engine) as s:
        add_worker(s, "w1")
        lifecycle.record(s, spec, jobs)
    return jobs[0]


def test_a_sweep_is_recorded_queued_and_counted(engine, job):
    with session_scope(engine) as s:
        counts = lifecycle.sweep_progress(s, job.sweep_id)
        assert counts == {"queued": counts["queued"]} and counts["queued"] >= 1
        assert job.job_id in [j.job_id for j in lifecycle.unfinished(s, job.sweep_id)]


def test_a_lease_grants_one_attempt_to_one_worker_and_a_final_job_stays_final(engine, job):
    with session_scope(engine) as s:
        row = s.get(JobRow, job.job_id)
        sent = lifecycle.lease(row, "w1")
        assert (row.state, row.worker, row.attempts, row.lease_id) == ("sent", "w1", 1, sent.lease_id)
        assert sent.attempt == 1 and sent.job_id == job.job_id and len(sent.lease_id) == 36
        assert lifecycle.lease_problem(row, "w1", sent.lease_id, 1) is None
        assert "leased to worker 'w1'" in lifecycle.lease_problem(row, "w2", sent.lease_id, 1)
        assert "stale" in lifecycle.lease_problem(row, "w1", sent.lease_id, 2)
        assert "stale" in lifecycle.lease_problem(row, "w1", "another", 1)
        assert lifecycle.start(row) and row.state == "running"
        lifecycle.finish(row, "w1", ok=True, error=None)
        assert row.state == "done"
        assert not lifecycle.start(row)  # a late "started" for a stored job changes nothing
        assert (row.state, row.worker, row.attempts) == ("done", "w1", 1)


def test_a_transient_failure_retries_with_a_doubling_pause_until_max_attempts(engine, job):
    delays = []
    with session_scope(engine) as s:
        row = s.get(JobRow, job.job_id)
        for _ in range(3):
            lifecycle.lease(row, "w1")
            lifecycle.start(row)
            delays.append(lifecycle.retry(row, "out of memory", max_attempts=3))
            assert row.lease_id is None or row.attempts == 3
        assert delays == [2.0, 4.0, None]
        # Max attempts reached: retry leaves the row for the caller to store the failure.
        assert row.state == "running" and row.attempts == 3
        assert "attempt 2 failed, retrying: out of memory" in row.error


def test_a_job_lost_with_a_restarted_worker_is_freed_then_given_up(engine, job):
    with session_scope(engine) as s:
        row = s.get(JobRow, job.job_id)
        lifecycle.lease(row, "w1")
        lifecycle.start(row)
    with session_scope(engine) as s:
        # A hello sent before the job started says nothing about it.
        assert lifecycle.dropped_on_restart(s, "w1", utc_now() - timedelta(hours=1), 3) == 0
        assert lifecycle.dropped_on_restart(s, "w1", utc_now() + timedelta(seconds=1), 3) == 1
        row = s.get(JobRow, job.job_id)
        assert (row.state, row.lease_id) == ("queued", None)
    with session_scope(engine) as s:
        row = s.get(JobRow, job.job_id)
        for _ in range(2):
            lifecycle.lease(row, "w1")
        lifecycle.start(row)
    with session_scope(engine) as s:
        assert lifecycle.dropped_on_restart(s, "w1", utc_now() + timedelta(seconds=1), 3) == 0
        row = s.get(JobRow, job.job_id)
        assert row.state == "failed" and "gave up after 3 attempts: its worker restarted" in row.error


def test_a_silent_workers_sent_and_running_jobs_are_freed(engine, job):
    with session_scope(engine) as s:
        lifecycle.lease(s.get(JobRow, job.job_id), "w1")
    with session_scope(engine) as s:
        # w1 never said hello, so it counts as silent; a live worker's job is freed only when hung.
        assert lifecycle.requeue_lost(s, dead_after_s=600, max_attempts=3) == 1
        row = s.get(JobRow, job.job_id)
        assert (row.state, row.attempts, row.lease_id) == ("queued", 1, None)


def test_a_sweep_is_finished_only_when_nothing_is_left_to_run():
    from orchestrator.follow import is_finished

    assert is_finished({"done": 3, "failed": 1}, n_jobs=4)
    assert not is_finished({"done": 3, "running": 1}, n_jobs=4)
    # A cross-check vote added a job mid-sweep: the original count is reached but one still waits.
    assert not is_finished({"done": 4, "queued": 1}, n_jobs=4)
    assert not is_finished({"done": 4, "sent": 1}, n_jobs=4)  # leased to a worker, not yet started
