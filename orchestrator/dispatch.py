"""Jobs to the broker: record first, then send, so every message has a row to land on.

Knows the Celery app and the database session it is handed; never measures anything.
"""

from __future__ import annotations

from celery import Celery
from sqlalchemy.orm import Session

from orchestrator.db import JobRow, SweepRow
from orchestrator.sweep import SweepSpec
from worker.broker import JOBS_QUEUE, RUN_JOB_TASK
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


def send(app: Celery, jobs: list[Job]) -> None:
    # The job id doubles as the Celery task id, so broker logs and the database line up.
    with app.producer_or_acquire() as producer:
        for job in jobs:
            app.send_task(RUN_JOB_TASK, args=[job.model_dump(mode="json")], task_id=job.job_id,
                          queue=JOBS_QUEUE, producer=producer)
