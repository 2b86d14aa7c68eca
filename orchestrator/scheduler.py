"""The scheduler: which live worker each queued job is leased to.

Owns the choice (`assign`, pure): a job goes to a live, unflagged worker that fits it (engine and
memory class, farm/memory.py), preferring one whose last job loaded the same model with the
same settings (model affinity: jobs are taken in sweep order, which is model-major), then one
that already holds the model's file, then the least loaded; never one that already has WINDOW
jobs outstanding. And the thin database step around it (`schedule`) that reads the live
workers and queued jobs and grants the leases (lifecycle.lease).

A job no live worker fits stays queued in the database, not in the broker: a worker that joins
later gets it. Deliberately does not know the broker (dispatch sends what it returns) nor how
results are verified (collector). Cross-checks are not its business: checks.route_crosschecks
chooses their workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable
from datetime import timedelta

from pydantic import ValidationError
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from farm.broker import worker_queue
from farm.contract import Capabilities, Job, utc_now
from farm.memory import fits
from orchestrator import lifecycle
from orchestrator.checks import CROSSCHECK
from orchestrator.db import CheckRow, JobRow, SweepRow, WorkerRow, as_utc

# Jobs outstanding (sent or running) per worker: one it runs and one waiting in its queue, so it
# never idles between jobs for the orchestrator's next pass; more would hold jobs back from a
# worker that joins later or finishes sooner.
WINDOW = 2
# Queued jobs read per query while slots remain: a large sweep's queue is not parsed whole each pass.
_SCAN_CHUNK = 500


def load_key(job: Job) -> tuple:
    """What a worker keeps loaded between two jobs (worker/tasks.LoadedModel): model, quant, engine, settings."""
    return (job.model, job.quant, job.engine, job.config)


@dataclass
class Slot:
    """A live worker as the scheduler sees it; `n_outstanding` and `last_key` follow its choices."""

    name: str
    caps: Capabilities
    n_outstanding: int = 0
    last_key: tuple | None = None


def assign(jobs: Iterable[tuple[Job, str | None]], workers: list[Slot], window: int = WINDOW) -> list[tuple[Job, str]]:
    """(job, worker) for each job of `jobs` (in their order) that a worker with a free slot fits.

    Each job comes with the worker it was last leased to (None if never): after a give-back it
    goes to another worker where one fits, so a worker that hangs on it is not handed it again.
    """
    chosen: list[tuple[Job, str]] = []
    for job, previous in jobs:
        if all(w.n_outstanding >= window for w in workers):
            break
        free = [w for w in workers if w.n_outstanding < window and fits(w.caps, job)]
        if not free:
            continue
        key = load_key(job)
        best = min(free, key=lambda w: (w.name == previous, w.last_key != key,
                                        not (job.model_sha256 and job.model_sha256 in w.caps.models),
                                        w.n_outstanding, w.name))
        best.n_outstanding += 1
        best.last_key = key
        chosen.append((job, best.name))
    return chosen


def live_slots(session: Session, dead_after_s: float) -> list[Slot]:
    """Every live, unflagged worker that announced what it offers and listens on its own queue,
    with its outstanding jobs and the model its last lease loaded."""
    cutoff = utc_now() - timedelta(seconds=dead_after_s)
    slots = []
    for row in session.scalars(select(WorkerRow).where(WorkerRow.flagged.is_(False), WorkerRow.last_seen.is_not(None),
                                                       WorkerRow.capabilities.is_not(None))):
        if as_utc(row.last_seen) < cutoff:
            continue
        try:
            caps = Capabilities.model_validate(row.capabilities)
        except ValidationError:
            continue  # an older worker's announcement: nothing to route by
        if worker_queue(row.name) in caps.queues:
            slots.append(Slot(row.name, caps))
    if not slots:
        return slots
    names = [s.name for s in slots]
    outstanding = dict(session.execute(select(JobRow.worker, func.count()).where(
        JobRow.state.in_(("sent", "running")), JobRow.worker.in_(names)).group_by(JobRow.worker)).all())
    # The model each worker's latest lease loaded, for all of them in one query.
    latest = (select(JobRow.worker, func.max(JobRow.leased_at).label("at")).where(JobRow.worker.in_(names))
              .group_by(JobRow.worker).subquery())
    last_specs = dict(session.execute(select(JobRow.worker, JobRow.spec).join(
        latest, (JobRow.worker == latest.c.worker) & (JobRow.leased_at == latest.c.at))).all())
    for slot in slots:
        slot.n_outstanding = outstanding.get(slot.name, 0)
        if (spec := last_specs.get(slot.name)) is not None:
            try:
                slot.last_key = load_key(Job.model_validate(spec))
            except ValidationError:
                pass
    return slots


def schedule(session: Session, dead_after_s: float, window: int = WINDOW) -> list[tuple[Job, str]]:
    """Lease queued jobs to live workers with free slots; returns each leased Job message (with its
    lease) and its worker, for the caller to send before committing."""
    slots = live_slots(session, dead_after_s)
    if not any(s.n_outstanding < window for s in slots):
        return []
    now = utc_now()
    crosschecks = select(CheckRow.job_id).where(CheckRow.kind == CROSSCHECK)
    query = (select(JobRow.id, JobRow.spec, JobRow.worker).join(SweepRow, SweepRow.id == JobRow.sweep_id)
             .where(JobRow.state == "queued", or_(JobRow.not_before.is_(None), JobRow.not_before <= now),
                    JobRow.id.not_in(crosschecks))
             .order_by(SweepRow.created_at, JobRow.sweep_id, JobRow.index))
    leased: list[tuple[Job, str]] = []
    offset = 0
    while n_free := sum(max(0, window - s.n_outstanding) for s in slots):
        # A few rows per free slot: most queued jobs fit some worker, and each read row is parsed.
        rows = session.execute(query.offset(offset).limit(min(_SCAN_CHUNK, 4 * n_free + 16))).all()
        if not rows:
            break
        # Parsed as assign reaches them: it stops once every slot is taken.
        chosen = assign(((Job.model_validate(spec), previous) for _, spec, previous in rows), slots, window)
        for job, name in chosen:
            leased.append((lifecycle.lease(session.get(JobRow, job.job_id), name), name))
        # The leased rows leave the queued set the next chunk is read from (the session flushes first).
        offset += len(rows) - len(chosen)
    return leased
