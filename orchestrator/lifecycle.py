"""The job lifecycle: queued -> sent -> running -> stored/failed, and the ways back to queued.

Owns every change of a job row's state: a sweep's jobs written as queued, a job leased to one
worker for one attempt (sent; the scheduler chooses the worker), running once the leaseholder
says it started, a transient failure given another attempt after a pause that doubles each time,
a lease freed when its worker went silent, restarted or ran past the time limit, and the end
(done/failed) once its result is stored or max attempts are spent. The collector (which ingests
results) and the dispatcher (which leases and sends) both call these functions over the Session
their caller opened.

Deliberately does not know the broker: it decides which jobs are leased and which go back to
the database's queue, and the caller sends (dispatch). Nor does it verify messages (collector,
validation), or choose workers (scheduler).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.contract import Job, utc_now
from orchestrator import checks
from orchestrator.db import JobRow, SweepRow, WorkerRow, as_utc

if TYPE_CHECKING:
    from orchestrator.sweep import SweepSpec

# A job's row is "queued" both before its first send and after a give-back; "done" and "failed"
# are final: a late message for such a job changes nothing.
FINAL_STATES = ("done", "failed")


def record(session: Session, spec: SweepSpec, jobs: list[Job]) -> str:
    """Write a sweep and its jobs as queued (before anything is sent, so every message has a row)."""
    sweep_id = jobs[0].sweep_id
    session.add(SweepRow(id=sweep_id, name=spec.name, spec=spec.model_dump(mode="json"), n_jobs=len(jobs)))
    session.flush()
    session.add_all(
        JobRow(id=j.job_id, sweep_id=sweep_id, index=j.index, spec=j.model_dump(mode="json"), state="queued")
        for j in jobs
    )
    return sweep_id


def lease(row: JobRow, worker: str) -> Job:
    """Grant the queued job to `worker` for its next attempt; returns the Job message to send it,
    which carries the lease (its id and attempt number)."""
    row.attempts += 1
    row.state, row.worker = "sent", worker
    row.lease_id, row.leased_at, row.not_before = str(uuid.uuid4()), utc_now(), None
    return leased_job(row)


def leased_job(row: JobRow) -> Job:
    """The Job message of the row's current lease (sent again unchanged where the broker lost it)."""
    return Job.model_validate(row.spec).model_copy(update={"lease_id": row.lease_id or "", "attempt": row.attempts})


def lease_problem(row: JobRow, worker: str, lease_id: str, attempt: int) -> str | None:
    """Why a started or result message does not answer the job's current lease; None when it does."""
    if not row.lease_id:
        return "the job is not leased to any worker"
    if row.worker != worker:
        return f"the job is leased to worker {row.worker!r}, not {worker!r}"
    if lease_id != row.lease_id or attempt != row.attempts:
        return f"a stale or unknown lease (attempt {attempt}; the job's current attempt is {row.attempts})"
    return None


def start(row: JobRow) -> bool:
    """The leaseholder says it started the job: running there (the caller checked the lease).

    Returns False (nothing changed) for a job already final."""
    if row.state in FINAL_STATES:
        return False
    row.state = "running"
    return True


def retry_delay_s(attempts: int) -> float:
    """The pause before attempt `attempts + 1` of a transiently failed job: doubles each attempt."""
    return 2.0 ** attempts


def _free(row: JobRow) -> None:
    """Back to the database's queue: no worker's message for it counts until the next lease."""
    row.state, row.lease_id = "queued", None


def retry(row: JobRow, error: str | None, max_attempts: int) -> float | None:
    """A transient failure: back to queued, not leased again before the delay returned, or None
    when max attempts are spent (the caller then stores the failure as final)."""
    if row.attempts >= max_attempts:
        return None
    delay_s = retry_delay_s(row.attempts)
    _free(row)
    row.error = f"attempt {row.attempts} failed, retrying: {error}"
    row.not_before = utc_now() + timedelta(seconds=delay_s)
    return delay_s


def finish(row: JobRow, worker: str, ok: bool, error: str | None) -> None:
    """Its result is stored: the job is done (or failed, when the result says so), for good."""
    row.state = "done" if ok else "failed"
    row.error = error or None
    row.worker = worker


def give_back(row: JobRow, why: str, max_attempts: int) -> bool:
    """A leased job that will never finish on its worker: its lease freed and the job queued
    again (True; the scheduler leases it anew), or failed for good after max_attempts."""
    if row.attempts >= max_attempts:
        row.state = "failed"
        row.error = f"gave up after {row.attempts} attempts: {why}"
        return False
    _free(row)
    return True


def dropped_on_restart(session: Session, worker: str, hello_at: datetime, max_attempts: int) -> int:
    """A hello comes from a worker process that just started and so runs nothing: the jobs still
    marked running on it were lost with its previous process. Freeing them now, instead of after
    `worker_dead_after_s`, matters because a restarted worker is never silent long enough. (Its
    sent jobs still wait in its own queue for the new process.) Returns how many were freed."""
    rows = session.scalars(select(JobRow).where(JobRow.state == "running", JobRow.worker == worker))
    lost = [row for row in rows if as_utc(row.updated_at) < as_utc(hello_at)]
    freed = [row for row in lost if give_back(row, "its worker restarted during the job", max_attempts)]
    checks.unroute_crosschecks(session, [row.id for row in freed])
    return len(freed)


def requeue_lost(session: Session, dead_after_s: float, max_attempts: int,
                 job_timeout_s: float = float("inf")) -> int:
    """Leased jobs whose worker went silent, or running past the time limit: their leases freed
    (the scheduler leases them again, to another worker where one fits), or failed for good after
    max_attempts. Returns how many were freed."""
    now = utc_now()
    cutoff = now - timedelta(seconds=dead_after_s)
    lost = session.execute(
        select(JobRow, WorkerRow.last_seen).join(WorkerRow, WorkerRow.name == JobRow.worker, isouter=True)
        .where(JobRow.state.in_(("sent", "running")))
    ).all()
    freed: list[str] = []
    for row, last_seen in lost:
        alive = last_seen is not None and as_utc(last_seen) >= cutoff
        hung = row.state == "running" and (now - as_utc(row.updated_at)).total_seconds() > job_timeout_s
        if alive and not hung:
            continue
        why = f"ran past the {job_timeout_s:.0f} s time limit" if hung else "the worker was lost during the job"
        if give_back(row, why, max_attempts):
            freed.append(row.id)
    checks.unroute_crosschecks(session, freed)
    return len(freed)


def unfinished(session: Session, sweep_id: str) -> list[Job]:
    """The sweep's queued jobs in sweep order, less the cross-checks (those go to a chosen worker)."""
    queued = [Job.model_validate(spec) for spec in session.scalars(
        select(JobRow.spec).where(JobRow.sweep_id == sweep_id, JobRow.state == "queued").order_by(JobRow.index))]
    return checks.without_crosschecks(session, queued)


def sweep_progress(session: Session, sweep_id: str) -> dict[str, int]:
    """How many of the sweep's jobs are in each state."""
    rows = session.execute(
        select(JobRow.state, func.count()).where(JobRow.sweep_id == sweep_id).group_by(JobRow.state)
    ).all()
    return {state: n for state, n in rows}
