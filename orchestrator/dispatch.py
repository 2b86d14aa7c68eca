"""Jobs to the broker: record first, then send, so every message has a row to land on.

Each job goes to the queue of its engine and memory class (the Celery router in worker/broker.py),
and a sweep is checked first against the workers that announced what they offer: a job no
registered worker can fit is refused at submit instead of waiting forever. Knows the Celery app
and the database session it is handed; never measures anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from celery import Celery
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from orchestrator import checks
from orchestrator.collector import requeue_lost
from orchestrator.db import JobRow, SweepRow, WorkerRow, session_scope
from orchestrator.sweep import SweepSpec
from worker.broker import RUN_JOB_TASK, worker_queue
from worker.contract import Capabilities, Job
from worker.memory import GIB, class_gb, fits, memory_kind, offered_bytes


@dataclass
class Unfit:
    """A job no known worker serves, and the best any worker with its engine offers."""

    job: Job
    kind: str
    largest_bytes: int
    largest_worker: str

    def describe(self) -> str:
        j = self.job
        memory = "VRAM" if self.kind == "vram" else "RAM"
        need_class = class_gb(j.need_bytes)
        if not self.largest_worker:
            largest = f"no worker runs the {j.engine} engine"
        elif not self.largest_bytes:
            largest = f"no worker with {j.engine} has a GPU" if self.kind == "vram" else "no worker says how much RAM it has"
        else:
            largest = f"the largest worker with {j.engine}, {self.largest_worker}, offers {self.largest_bytes / GIB:.2f} GiB"
        return (f"{j.model} {j.quant} {j.test} ({j.engine}{', ' + j.technique if j.technique != 'baseline' else ''}): "
                f"needs {j.need_bytes / GIB:.2f} GiB of {memory} "
                f"({f'{need_class} GB class' if need_class else 'above every class'}); {largest}")


def known_capabilities(session: Session) -> dict[str, Capabilities]:
    """Capabilities of every registered worker that has announced them (hello or heartbeat)."""
    known = {}
    for name, caps in session.execute(select(WorkerRow.name, WorkerRow.capabilities)
                                      .where(WorkerRow.capabilities.is_not(None))):
        try:
            known[name] = Capabilities.model_validate(caps)
        except ValidationError:
            continue  # an older worker's announcement; it says nothing this check can use
    return known


def unfit_jobs(jobs: list[Job], workers: dict[str, Capabilities]) -> list[Unfit]:
    """The jobs none of `workers` would take from their queues (worker/memory.py `fits`)."""
    unfit = []
    for job in jobs:
        if any(fits(caps, job) for caps in workers.values()):
            continue
        kind = memory_kind(job)
        offers = sorted((offered_bytes(caps, kind), name) for name, caps in workers.items() if job.engine in caps.engines)
        largest_bytes, largest_worker = offers[-1] if offers else (0, "")
        unfit.append(Unfit(job, kind, largest_bytes, largest_worker))
    return unfit


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
    # The job id doubles as the Celery task id, so broker logs and the database line up; the
    # app's router picks each job's queue.
    # kombu's filesystem transport (the embedded default) names a message by the millisecond it
    # was sent and a random uuid, and delivers in name order: two jobs sent within a millisecond
    # come out in random order, which breaks the model-major order model affinity relies on.
    spacing_s = 0.0011 if str(app.conf.broker_url).startswith("filesystem://") else 0.0
    with app.producer_or_acquire() as producer:
        for i, job in enumerate(jobs):
            if i and spacing_s:
                time.sleep(spacing_s)
            # argsrepr: Celery would otherwise render the whole job for its logs, message by message.
            app.send_task(RUN_JOB_TASK, args=[job.model_dump(mode="json")], task_id=job.job_id,
                          producer=producer, countdown=countdown_s or None,
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
