"""Jobs to the broker: record first, lease, then send, so every message has a row to land on.

Each job is leased to one worker (orchestrator/scheduler.py) and published to that worker's own
queue; a sweep is checked first against the workers that announced what they offer: a job no
registered worker can fit is refused at submit instead of waiting forever. Knows the Celery app
and the database session it is handed; never measures anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from celery import Celery
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from farm.broker import RUN_JOB_TASK, worker_queue
from farm.contract import Capabilities, Job, utc_now
from farm.memory import GIB, class_gb, fits, memory_kind, offered_bytes
from farm.settings import Settings
from orchestrator import checks, keys
from orchestrator.broker_audit import broker_snapshot, drop_taken, put_back
from orchestrator.db import JobRow, WorkerRow, as_utc, session_scope
from orchestrator import scheduler
from orchestrator.lifecycle import lease, leased_job, requeue_lost

log = logging.getLogger("tokenfarm.dispatch")


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
        split = f" on {j.config.n_gpus_named} GPUs ({j.config.named_gpus_text()})" if j.config.n_gpus_named else ""
        return (f"{j.model} {j.quant} {j.test} ({j.engine}{', ' + j.technique if j.technique != 'baseline' else ''}): "
                f"needs {j.need_bytes / GIB:.2f} GiB of {memory}{split} "
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
    """The jobs none of `workers` would take from their queues (farm/memory.py `fits`)."""
    unfit = []
    for job in jobs:
        if any(fits(caps, job) for caps in workers.values()):
            continue
        kind = memory_kind(job)
        offers = sorted((offered_bytes(caps, kind), name) for name, caps in workers.items() if job.engine in caps.engines)
        largest_bytes, largest_worker = offers[-1] if offers else (0, "")
        unfit.append(Unfit(job, kind, largest_bytes, largest_worker))
    return unfit


def job_args(app: Celery, job: Job, worker: str = "", countdown_s: float = 0.0) -> list:
    """The arguments of a job's message: its JSON and the orchestrator's seal over it
    (farm/jobsign.py), addressed to `worker` alone or to any. Every job leaves through here."""
    job_json = job.model_dump(mode="json")
    return [job_json, keys.seal_job(app, job_json, worker, countdown_s)]


def send(app: Celery, leased: list[tuple[Job, str]]) -> None:
    """Leased jobs, each to its worker's own queue. The lease id is the Celery task id, so broker
    logs, the broker audit and the database name the same attempt.

    kombu's filesystem transport (the embedded default) names a message by the millisecond it
    was sent and a random uuid, and delivers in name order: two jobs sent within a millisecond
    come out in random order, which breaks the model-major order model affinity relies on.
    """
    from orchestrator.brokerusers import worker_producer

    spacing_s = 0.0011 if str(app.conf.broker_url).startswith("filesystem://") else 0.0
    by_worker: dict[str, list[Job]] = {}
    for job, worker in leased:
        by_worker.setdefault(worker, []).append(job)
    i = 0
    for worker, jobs in by_worker.items():
        # Inside the worker's key prefix on a confined broker: the only place its Redis user reads.
        with worker_producer(app, worker) as producer:
            for job in jobs:
                if i and spacing_s:
                    time.sleep(spacing_s)
                i += 1
                # argsrepr: Celery would otherwise render the whole job for its logs, message by message.
                app.send_task(RUN_JOB_TASK, args=job_args(app, job, worker), task_id=job.lease_id or job.job_id,
                              queue=worker_queue(worker), producer=producer,
                              argsrepr=f"[job {job.job_id} attempt {job.attempt}: {job.model} {job.quant} {job.test}]")


def send_to_worker(app: Celery, job: Job, worker: str) -> None:
    """One leased job to one worker's own queue (farm.broker.worker_queue)."""
    send(app, [(job, worker)])


def schedule_and_send(engine: Engine, app: Celery, dead_after_s: float) -> int:
    """Lease what queued jobs the live workers have room for, and send them; returns how many.

    Sent inside the transaction that grants the leases: a broker error rolls them back and the
    next pass tries again (a commit lost after a send leaves a message whose lease the database
    never granted, refused when its worker answers it)."""
    with session_scope(engine) as session:
        leased = scheduler.schedule(session, dead_after_s)
        send(app, leased)
    return len(leased)


def free_lost(engine: Engine, dead_after_s: float, max_attempts: int, job_timeout_s: float = float("inf")) -> int:
    """Free the leases of jobs whose workers went silent or hung; returns how many (the
    scheduler leases them again)."""
    with session_scope(engine) as session:
        return requeue_lost(session, dead_after_s, max_attempts, job_timeout_s)


def resend_unfinished(engine: Engine, app: Celery, sweep_id: str, dead_after_s: float, max_attempts: int) -> int:
    """`sweep resume`: free the jobs of dead workers, send again each sent job of the sweep whose
    message the broker no longer holds (on Redis, which can tell), and lease what waits. Returns
    how many messages went out."""
    snapshot = broker_snapshot(app)
    free_lost(engine, dead_after_s, max_attempts)  # counted when the scheduler sends them again
    n_sent = 0
    if snapshot is not None:
        with session_scope(engine) as session:
            rows = session.scalars(select(JobRow).where(JobRow.sweep_id == sweep_id, JobRow.state == "sent")).all()
            lost = [(leased_job(row), row.worker) for row in rows if row.lease_id not in snapshot.jobs]
            send(app, lost)
            n_sent = len(lost)
    return n_sent + schedule_and_send(engine, app, dead_after_s)


def send_crosschecks(engine: Engine, app: Celery, dead_after_s: float) -> int:
    """Send each cross-check whose original has its result to a second live worker of its class.

    Sent inside the transaction that marks them sent: a broker error rolls the marks back and
    the next call tries again (a commit lost after a send only makes a duplicate, refused as a replay).
    """
    with session_scope(engine) as session:
        due = [(lease(row, worker), worker) for row, worker in checks.route_crosschecks(session, dead_after_s)]
        send(app, due)
    return len(due)


class BrokerAudit:
    """Keeps the broker's job messages in line with the database after an outage.

    A job the database calls sent is in its worker's queue, or taken by that worker, which is
    about to say "started". Redis loses one in two ways. Going down between a worker's BRPOP and
    kombu's record of the taken message: the message is gone, and is sent again (the same lease).
    A worker's connection dying while it holds a message it has not run: kombu would put it back
    only after the visibility timeout, an hour; the audit puts it back now. A Redis restarted
    without its data loses every waiting job at once. And a taken message no live lease answers
    to (its job finished, or was leased again after its worker was killed mid-job) is dropped:
    an hour later kombu would hand it out again, for a run whose result is refused.

    Messages are known by their task id, which is the lease id (dispatch.send). A job is judged
    once it has been in its state grace_s, a taken message once it was taken grace_s ago (or its
    countdown ended that long ago), and nothing is done until two audits in a row find the same:
    a message moving back to its queue can be missed by one look, and a collector may not have
    committed the "started" it holds. No audit judges while results wait in the queue: the
    database is behind the broker then (a collector saturated, or not running).

    An audit reads every waiting message (about 1.3 s for 10,000 on two busy cores), so audits are
    spaced every_s apart, or further when they are slow, to keep them under 5 % of a core.
    """

    def __init__(self, grace_s: float, every_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.every_s = every_s
        self._suspects: dict[str, tuple] = {}  # lease id -> (its row's updated_at, planned action) when last seen
        self._next_at = 0.0
        self.n_runs, self.n_sent, self.busy_s = 0, 0, 0.0  # for benchmarks/farm_load.py

    def maybe_run(self, engine: Engine, app: Celery) -> int:
        """run() when the last audit was long enough ago; what it returns, else 0."""
        if time.monotonic() < self._next_at:
            return 0
        started = time.monotonic()
        try:
            n = self.run(engine, app)
            self.n_sent += n
            return n
        finally:
            took_s = time.monotonic() - started
            self.n_runs, self.busy_s = self.n_runs + 1, self.busy_s + took_s
            self._next_at = time.monotonic() + max(self.every_s, 20 * took_s)

    def run(self, engine: Engine, app: Celery) -> int:
        """One audit; returns how many sent jobs went back to the broker (sent again or put
        back). The embedded broker cannot be audited (it keeps no record of what a worker took): 0."""
        snapshot = broker_snapshot(app)
        if snapshot is None:
            return 0
        if snapshot.n_results_waiting:
            # A collector is behind: a job whose "started" waits in the queue looks lost. Judge
            # nothing now; what was suspected stays suspected for the next audit.
            return 0
        held = snapshot.jobs
        now = utc_now()
        cutoff, stale_before = now - timedelta(seconds=self.grace_s), now.timestamp() - self.grace_s

        def stale(copy) -> bool:  # taken, and its holder should long have said "started"
            return copy.taken_at is not None and max(copy.taken_at, copy.eta or 0.0) < stale_before

        resend: list[tuple[Job, str]] = []
        restore, drop = [], []
        suspects: dict[str, tuple] = {}
        with session_scope(engine) as session:
            # Ids and times only: a large sweep keeps thousands of jobs, each with its spec.
            live = {lease_id: (job_id, state, at) for job_id, lease_id, state, at in session.execute(
                select(JobRow.id, JobRow.lease_id, JobRow.state, JobRow.updated_at).where(
                    JobRow.state.in_(("sent", "running")) | JobRow.lease_id.in_(list(held))))
                if lease_id and state in ("sent", "running")}
            plans: dict[str, tuple] = {}
            for lease_id, copies in held.items():
                if lease_id not in live:  # a finished or superseded lease: a taken copy is a leftover
                    if tags := tuple(c.tag for c in copies if stale(c)):
                        plans[lease_id] = (None, ("drop", tags))
            for lease_id, (job_id, state, updated_at) in live.items():
                if state != "sent" or as_utc(updated_at) >= cutoff:
                    continue
                copies = held.get(lease_id, [])
                if any(not stale(c) for c in copies):
                    continue  # waiting, or taken by a worker about to start it
                if copies:
                    newest = max(copies, key=lambda c: c.taken_at)
                    plans[lease_id] = (updated_at, ("put back", (newest.tag,), tuple(c.tag for c in copies if c is not newest)))
                else:
                    plans[lease_id] = (updated_at, ("send again", job_id))
            for lease_id, (updated_at, plan) in plans.items():
                if self._suspects.get(lease_id) != (updated_at, plan):
                    suspects[lease_id] = (updated_at, plan)  # the next audit confirms
                    continue
                if plan[0] == "drop":
                    log.info("lease %s is over: %d taken copies of its message dropped", lease_id, len(plan[1]))
                    drop += plan[1]
                    continue
                job_id = live[lease_id][0]
                log.warning("job %s: %s", job_id, "taken by a worker that never ran it; put back"
                            if plan[0] == "put back" else "its message was lost by the broker; sent again")
                row = session.get(JobRow, job_id)
                row.updated_at = now  # not judged again for grace_s
                if plan[0] == "put back":
                    restore += plan[1]
                    drop += plan[2]
                else:
                    resend.append((leased_job(row), row.worker))
        self._suspects = suspects
        if drop:
            drop_taken(app, drop)
        if restore:
            put_back(app, restore)
        if resend:
            send(app, resend)
        return len(restore) + len(resend)


class Upkeep:
    """The orchestrator's own scheduling and recovery, run by every loop that collects results
    (`sweep wait`, `tokenfarm collector`): every every_s, the leases of silent or hung workers
    are freed, due cross-checks go out and queued jobs are leased to workers with room; every
    audit period, the broker audit."""

    def __init__(self, settings: Settings, every_s: float = 2.0) -> None:
        self.settings = settings
        self.every_s = every_s
        self.audit = BrokerAudit(settings.worker_dead_after_s)
        self._next_at = 0.0

    def maybe_run(self, engine: Engine, app: Celery, now: bool = False) -> None:
        """Raises what an unavailable database or broker raises; the next call tries again.
        now: lease at once (results just freed slots); recovery and the audit keep their periods."""
        if now:
            schedule_and_send(engine, app, self.settings.worker_dead_after_s)
        if time.monotonic() < self._next_at:
            return
        self._next_at = time.monotonic() + self.every_s
        s = self.settings
        free_lost(engine, s.worker_dead_after_s, s.max_attempts, s.job_timeout_s)
        send_crosschecks(engine, app, s.worker_dead_after_s)
        schedule_and_send(engine, app, s.worker_dead_after_s)
        self.audit.maybe_run(engine, app)
