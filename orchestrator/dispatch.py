"""Jobs to the broker: record first, then send, so every message has a row to land on.

Each job goes to the queue of its engine and memory class (the Celery router in farm/broker.py),
and a sweep is checked first against the workers that announced what they offer: a job no
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
from orchestrator import checks
from orchestrator.broker_audit import broker_snapshot, drop_taken, put_back
from orchestrator.db import CheckRow, JobRow, WorkerRow, as_utc, session_scope
from orchestrator.lifecycle import requeue_lost, unfinished

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


def sender(app: Celery):
    """What the collector is handed to send the jobs the lifecycle gives back: (jobs, countdown_s)."""
    return lambda jobs, countdown_s=0.0: send(app, jobs, countdown_s) if jobs else None


def resend_lost(engine: Engine, app: Celery, dead_after_s: float, max_attempts: int,
                job_timeout_s: float = float("inf")) -> int:
    """Re-send the running jobs of workers that went silent or hung; returns how many were re-sent."""
    with session_scope(engine) as session:
        jobs = requeue_lost(session, dead_after_s, max_attempts, job_timeout_s)
    if jobs:
        send(app, jobs)
    return len(jobs)


def resend_unfinished(engine: Engine, app: Celery, sweep_id: str, dead_after_s: float, max_attempts: int) -> int:
    """`sweep resume`: send again every job of the sweep that is still queued, and those of dead
    workers. A queued job whose message waits in a queue is not sent twice (on Redis, which can tell)."""
    snapshot = broker_snapshot(app)
    held = snapshot.jobs if snapshot else {}
    waiting = {job_id for job_id, copies in held.items() if any(c.taken_at is None for c in copies)}
    with session_scope(engine) as session:
        lost = requeue_lost(session, dead_after_s, max_attempts)
        queued = [j for j in unfinished(session, sweep_id) if j.job_id not in waiting]
    # Lost jobs of other sweeps go out too: they are just as stuck.
    jobs = {j.job_id: j for j in [*lost, *queued]}
    send(app, list(jobs.values()))
    return len(jobs)


def send_to_worker(app: Celery, job: Job, worker: str) -> None:
    """One job to one worker's own queue (farm.broker.worker_queue); on a confined broker, inside
    that worker's key prefix, the only place its Redis user can read."""
    from orchestrator.brokerusers import worker_producer

    with worker_producer(app, worker) as producer:
        app.send_task(RUN_JOB_TASK, args=[job.model_dump(mode="json")], task_id=job.job_id,
                      queue=worker_queue(worker), producer=producer)


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


class BrokerAudit:
    """Keeps the broker's job messages in line with the database after an outage.

    A job the database calls queued is in the broker: waiting in a queue, or taken by a worker
    that is about to say "started". Redis loses one in two ways. Going down between a worker's
    BRPOP and kombu's record of the taken message: the message is gone, and is sent again. A
    worker's connection dying while it holds a message it has not run: kombu would put it back
    only after the visibility timeout, an hour; the audit puts it back now. A Redis restarted
    without its data loses every waiting job at once. And a finished job's message still marked
    taken (its worker was killed mid-job, the job was re-sent and done elsewhere) is dropped:
    an hour later kombu would hand it out again, for a run whose result is refused as a replay.

    A job is judged once it has been in its state grace_s, a taken message once it was taken
    grace_s ago (or its countdown ended that long ago), and nothing is done until two audits in a
    row find the same: a message moving back to its queue can be missed by one look, and a
    collector may not have committed the "started" it holds. No audit judges while results wait
    in the queue: the database is behind the broker then (a collector saturated, or not running).

    An audit reads every waiting message (about 1.3 s for 10,000 on two busy cores), so audits are
    spaced every_s apart, or further when they are slow, to keep them under 5 % of a core.
    """

    def __init__(self, grace_s: float, every_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.every_s = every_s
        self._suspects: dict[str, tuple] = {}  # job id -> (its row's updated_at, planned action) when last seen
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
        """One audit; returns how many queued jobs went back to the broker (sent again or put
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

        resend: list[Job] = []
        restore, drop = [], []
        suspects: dict[str, tuple] = {}
        taken_ids = [job_id for job_id, copies in held.items() if any(c.taken_at is not None for c in copies)]
        with session_scope(engine) as session:
            # Ids and times only: a large sweep keeps thousands of jobs queued, each with its spec.
            rows = session.execute(select(JobRow.id, JobRow.state, JobRow.updated_at).where(
                (JobRow.state == "queued") | JobRow.id.in_(taken_ids))).all()
            rows = [(job_id, state, at) for job_id, state, at in rows if state != "running" and as_utc(at) < cutoff]
            crosschecks = {c.job_id: c for c in session.scalars(select(CheckRow).where(
                CheckRow.kind == checks.CROSSCHECK, CheckRow.job_id.in_([job_id for job_id, _, _ in rows])))}
            for job_id, state, updated_at in rows:
                copies = held.get(job_id, [])
                check = crosschecks.get(job_id)
                if state != "queued":  # done or failed: a taken copy is a dead holder's leftover
                    plan = ("drop", tuple(c.tag for c in copies if stale(c)))
                    if not plan[1]:
                        continue
                elif check is not None and check.sent_at is None:
                    continue  # not sent yet: route_crosschecks sends it once its original is done
                elif any(not stale(c) for c in copies):
                    continue  # waiting, or taken by a worker about to start it
                elif copies:
                    newest = max(copies, key=lambda c: c.taken_at)
                    plan = ("put back", (newest.tag,), tuple(c.tag for c in copies if c is not newest))
                else:
                    plan = ("send again",)
                if self._suspects.get(job_id) != (updated_at, plan):
                    suspects[job_id] = (updated_at, plan)  # the next audit confirms
                    continue
                if plan[0] == "drop":
                    log.info("job %s is %s: %d taken copies of its message dropped", job_id, state, len(plan[1]))
                    drop += plan[1]
                    continue
                log.warning("job %s: %s", job_id, "taken by a worker that never ran it; put back" if copies
                            else "its message was lost by the broker; sent again")
                session.get(JobRow, job_id).updated_at = now  # queued anew: not judged again for grace_s
                if plan[0] == "put back":
                    restore += plan[1]
                    drop += plan[2]
                elif check is not None:
                    checks.unroute(check)  # route_crosschecks sends it to a chosen worker again
                else:
                    resend.append(Job.model_validate(session.get(JobRow, job_id).spec))
        self._suspects = suspects
        if drop:
            drop_taken(app, drop)
        if restore:
            put_back(app, restore)
        if resend:
            send(app, resend)
        return len(restore) + len(resend)


class Upkeep:
    """The orchestrator's own recovery, run by every loop that collects results (`sweep wait`,
    `tokenfarm collector`): every every_s, the running jobs of silent or hung workers go back
    on the queue and due cross-checks go out; every audit period, the broker audit."""

    def __init__(self, settings: Settings, every_s: float = 2.0) -> None:
        self.settings = settings
        self.every_s = every_s
        self.audit = BrokerAudit(settings.worker_dead_after_s)
        self._next_at = 0.0

    def maybe_run(self, engine: Engine, app: Celery) -> None:
        """Raises what an unavailable database or broker raises; the next call tries again."""
        if time.monotonic() < self._next_at:
            return
        self._next_at = time.monotonic() + self.every_s
        s = self.settings
        resend_lost(engine, app, s.worker_dead_after_s, s.max_attempts, s.job_timeout_s)
        send_crosschecks(engine, app, s.worker_dead_after_s)
        self.audit.maybe_run(engine, app)
