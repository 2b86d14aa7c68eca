"""A running job's model download: reported by its worker, shown by `tokenfarm status`, and
outside the job's time limit (each report restarts the clock)."""

from datetime import timedelta

from farm.broker import signed_body
from farm.contract import Download, Envelope, utc_now
from orchestrator.collector import ingest
from orchestrator.db import JobRow, RejectionRow, WorkerRow, session_scope
from orchestrator.lifecycle import download_line, lease, record, requeue_lost, start
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from orchestrator.workers import add_worker


def progress(job, worker: str, token: str, done: int, total: int) -> dict:
    return signed_body(Envelope(kind="progress", job_id=job.job_id, worker=worker, lease_id=job.lease_id,
                                attempt=job.attempt, download=Download(downloaded_bytes=done, total_bytes=total)),
                       token)


def test_the_running_workers_progress_is_kept_and_shown_and_others_are_ignored(engine):
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_gen=[4], repetitions=1)
    jobs = plan(spec)
    job = jobs[0]
    with session_scope(engine) as s:
        tokens = {n: add_worker(s, n) for n in ("w1", "w2")}
        record(s, spec, jobs)
        row = s.get(JobRow, job.job_id)
        job = lease(row, "w1")
        start(row)
    with session_scope(engine) as s:
        assert ingest(s, progress(job, "w1", tokens["w1"], 4_200_000_000, 18_600_000_000)).action == "progress"
        # Another worker's report for a job it does not hold is refused and changes nothing.
        assert ingest(s, progress(job, "w2", tokens["w2"], 1, 2)).action == "rejected"
    with session_scope(engine) as s:
        row = s.get(JobRow, job.job_id)
        assert download_line(row.download) == "downloading 4.2 / 18.6 GB"
        assert [r.worker for r in s.query(RejectionRow)] == ["w2"]
    assert download_line({"downloaded_bytes": 5, "total_bytes": 5}) == ""  # done: the job is measuring


def test_a_download_report_restarts_the_time_limit(engine):
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_gen=[4], repetitions=1)
    jobs = plan(spec)
    job = jobs[0]
    with session_scope(engine) as s:
        token = add_worker(s, "w1")
        record(s, spec, jobs)
        row = s.get(JobRow, job.job_id)
        job = lease(row, "w1")
        start(row)
        row.updated_at = utc_now() - timedelta(seconds=100)  # started 100 s ago
    with session_scope(engine) as s:
        s.get(WorkerRow, "w1").last_seen = utc_now()
        # A 60 s limit: without a report the job counts as hung.
        assert requeue_lost(s, dead_after_s=3600, max_attempts=3, job_timeout_s=60) == 1
        s.rollback()
    with session_scope(engine) as s:
        ingest(s, progress(job, "w1", token, 10, 100))
    with session_scope(engine) as s:
        assert requeue_lost(s, dead_after_s=3600, max_attempts=3, job_timeout_s=60) == 0


def test_status_shows_the_download_and_then_the_state(data_dir):
    """`tokenfarm status SWEEP` as a user runs it, on the embedded database."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from orchestrator.db import make_engine, upgrade

    url = f"sqlite:///{data_dir / 'tokenfarm.sqlite3'}"
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    engine = make_engine(url)
    spec = SweepSpec(name="dl", models=["smollm2-135m"], n_gen=[4], repetitions=1)
    jobs = plan(spec)
    with session_scope(engine) as s:
        token = add_worker(s, "w1")
        record(s, spec, jobs)
        job = lease(s.get(JobRow, jobs[0].job_id), "w1")
        start(s.get(JobRow, jobs[0].job_id))
    cli = [str(Path(sys.executable).parent / "tokenfarm"), "status", "dl"]
    env = {**os.environ, "TOKENFARM_DATA_DIR": str(data_dir)}
    for done, shown in ((4_200_000_000, "downloading 4.2 / 18.6 GB"), (18_600_000_000, "running")):
        with session_scope(engine) as s:
            assert ingest(s, progress(job, "w1", token, done, 18_600_000_000)).action == "progress"
        out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert shown in out.stdout, out.stdout
