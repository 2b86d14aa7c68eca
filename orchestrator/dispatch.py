"""Jobs to the broker: record first, then send, so every message has a row to land on.

Knows the Celery app and the database session it is handed; never measures anything.
"""

from __future__ import annotations

from celery import Celery
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from orchestrator import checks
from orchestrator.collector import requeue_lost
from orchestrator.db import JobRow, SweepRow, session_scope
from orchestrator.sweep import SweepSpec
from worker.broker import JOBS_QUEUE, RUN_JOB_TASK, worker_queue
from worker.contract import Job


def record(session: Session, spec: SweepSpec, jobs: list[Job]) -> str:
    sweep_id = jobs[0].sweep_id
    session.add(SweepRow(id=sweep_id, name=spec.name, spec=spec.model_dump(mode="json"), n_jobs=len(jobs)))
    session.flush()
    session.add_all(
        JobRow(id=j.job_id, sweep_id=sweep_id, index=j.index, spec=j.model_dump(mode="json"), state="queued")
        for j in jobs
    )
    return sweep_id


def send(app: Celery, jobs: list[Job], countdown_s: float = 0.0) -> None:
    # The job id doubles as the Celery task id, so broker logs and the database line up.
    with app.producer_or_acquire() as producer:
        for job in jobs:
            # argsrepr: Celery would otherwise render the whole job for its logs, message by message.
            app.send_task(RUN_JOB_TASK, args=[job.model_dump(mode="json")], task_id=job.job_id,
                          queue=JOBS_QUEUE, producer=producer, countdown=countdown_s or None,
                          argsrepr=f"[job {job.job_id}: {job.model} {job.quant} {job.test}]")


def resend_lost(engine: Engine, app: Celery, dead_after_s: float, max_attempts: int,
                job_timeout_s: float = float("inf")) -> int:
    """Re-send the running jobs of workers that went silent or hung; returns how many were re-sent."""
    with session_scope(engine) as session:
        jobs = requeue_lost(session, dead_after_s, max_attempts, job_timeout_s)
    if jobs:
        send(app, jobs)
    return len(jobs)


def resend_unfinished(engine: Engine, app: Celery, sweep_id: str, dead_after_s: float, max_attempts: int) -> int:
    """`sweep resume`: send again every job of the sweep that is still queued, and those of dead workers."""
    with session_scope(engine) as session:
        lost = requeue_lost(session, dead_after_s, max_attempts)
        queued = [Job.model_validate(spec) for spec in session.scalars(
            select(JobRow.spec).where(JobRow.sweep_id == sweep_id, JobRow.state == "queued").order_by(JobRow.index))]
        queued = checks.without_crosschecks(session, queued, unroute_them=False)
    # Lost jobs of other sweeps go out too: they are just as stuck.
    jobs = {j.job_id: j for j in [*lost, *queued]}
    send(app, list(jobs.values()))
    return len(jobs)


def send_to_worker(app: Celery, job: Job, worker: str) -> None:
    """One job to one worker's own queue (worker.broker.worker_queue)."""
    app.send_task(RUN_JOB_TASK, args=[job.model_dump(mode="json")], task_id=job.job_id, queue=worker_queue(worker))


def send_crosschecks(engine: Engine, app: Celery, dead_after_s: float) -> int:
    """Send each cross-check whose original has its result to a second live worker of its class.

    Sent inside the transaction that marks them sent: a broker error rolls the marks back and
    the next call tries again (a commit lost after a send only makes a duplicate, refused as a replay).
    """
    with session_scope(engine) as session:
        due = checks.route_crosschecks(session, dead_after_s)
        for job, worker in due:
            send_to_worker(app, job, worker)
    return len(due)
