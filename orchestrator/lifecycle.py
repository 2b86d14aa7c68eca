"""The job lifecycle: queued -> sent -> running -> stored/failed, and the ways back to queued.

Owns every change of a job row's state: a sweep's jobs written as queued, a job claimed as
running by the worker that starts it, a transient failure given another attempt after a pause
that doubles each time, a job given back when its worker went silent, restarted or ran past the
time limit, and the end (done/failed) once its result is stored or max attempts are spent. The
collector (which ingests results) and the dispatcher (which sends and re-sends) both call these
functions over the Session their caller opened.

Deliberately does not know the broker: it decides which jobs go out again and after what delay,
and the caller sends them (dispatch.send). Nor does it verify messages (collector, validation).
"""

from __future__ import annotations

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


def start(row: JobRow, worker: str) -> bool:
    """A worker says it started the job: it is running there, one more attempt spent.

    Returns False (nothing changed) for a job already final. A job re-sent after its worker died
    is claimed by whoever starts it next."""
    if row.state in FINAL_STATES:
        return False
    row.state, row.worker = "running", worker
    row.attempts += 1
    return True


def downloading(row: JobRow, worker: str, downloaded_bytes: int, total_bytes: int) -> bool:
    """The running job's worker reports its model download; False (nothing changed) from anyone
    else or for a job not running. The row's update restarts the job's time-limit clock."""
    if row.state != "running" or row.worker != worker:
        return False
    row.download = {"downloaded_bytes": downloaded_bytes, "total_bytes": total_bytes}
    return True


def download_line(download: dict | None) -> str:
    """`downloading 4.2 / 18.6 GB` while a download runs; empty when none or done."""
    if not download or download.get("downloaded_bytes", 0) >= download.get("total_bytes", 0):
        return ""
    return f"downloading {download['downloaded_bytes'] / 1e9:.1f} / {download['total_bytes'] / 1e9:.1f} GB"


def retry_delay_s(attempts: int) -> float:
    """The pause before attempt `attempts + 1` of a transiently failed job: doubles each attempt."""
    return 2.0 ** attempts


def retry(row: JobRow, error: str | None, max_attempts: int) -> float | None:
    """A transient failure: back to queued with the delay before it is sent again, or None when
    max attempts are spent (the caller then stores the failure as final)."""
    if row.attempts >= max_attempts:
        return None
    row.state, row.error = "queued", f"attempt {row.attempts} failed, retrying: {error}"
    return retry_delay_s(row.attempts)


def finish(row: JobRow, worker: str, ok: bool, error: str | None) -> None:
    """Its result is stored: the job is done (or failed, when the result says so), for good."""
    row.state = "done" if ok else "failed"
    row.error = error or None
    row.worker = worker


def reject(row: JobRow, reason: str) -> None:
    """Its result was refused by validation: failed, with the reason kept on the row."""
    row.state, row.error = "failed", f"result rejected: {reason}"


def give_back(row: JobRow, why: str, max_attempts: int) -> Job | None:
    """A running job that will never finish: queued again (the caller sends it), or failed for good."""
    if row.attempts >= max_attempts:
        row.state = "failed"
        row.error = f"gave up after {row.attempts} attempts: {why}"
        return None
    row.state = "queued"
    return Job.model_validate(row.spec)


def dropped_on_restart(session: Session, worker: str, hello_at: datetime, max_attempts: int) -> list[Job]:
    """A hello comes from a worker process that just started and so runs nothing: the jobs still
    marked running on it were lost with its previous process. Giving them back now, instead of
    after `worker_dead_after_s`, matters because a restarted worker is never silent long enough."""
    rows = session.scalars(select(JobRow).where(JobRow.state == "running", JobRow.worker == worker))
    lost = [row for row in rows if as_utc(row.updated_at) < as_utc(hello_at)]
    jobs = [job for row in lost if (job := give_back(row, "its worker restarted during the job", max_attempts))]
    return checks.without_crosschecks(session, jobs, unroute_them=True)


def requeue_lost(session: Session, dead_after_s: float, max_attempts: int,
                 job_timeout_s: float = float("inf")) -> list[Job]:
    """Running jobs whose worker went silent or that ran past the time limit: back to queued
    (to be re-sent), or failed for good after max_attempts."""
    now = utc_now()
    cutoff = now - timedelta(seconds=dead_after_s)
    lost = session.execute(
        select(JobRow, WorkerRow.last_seen).join(WorkerRow, WorkerRow.name == JobRow.worker, isouter=True)
        .where(JobRow.state == "running")
    ).all()
    resend: list[Job] = []
    for row, last_seen in lost:
        alive = last_seen is not None and as_utc(last_seen) >= cutoff
        hung = (now - as_utc(row.updated_at)).total_seconds() > job_timeout_s
        if alive and not hung:
            continue
        why = f"ran past the {job_timeout_s:.0f} s time limit" if hung else "the worker was lost during the job"
        if job := give_back(row, why, max_attempts):
            resend.append(job)
    return checks.without_crosschecks(session, resend, unroute_them=True)


def unfinished(session: Session, sweep_id: str) -> list[Job]:
    """The sweep's queued jobs in sweep order, less the cross-checks (those go to a chosen worker)."""
    queued = [Job.model_validate(spec) for spec in session.scalars(
        select(JobRow.spec).where(JobRow.sweep_id == sweep_id, JobRow.state == "queued").order_by(JobRow.index))]
    return checks.without_crosschecks(session, queued, unroute_them=False)


def sweep_progress(session: Session, sweep_id: str) -> dict[str, int]:
    """How many of the sweep's jobs are in each state."""
    rows = session.execute(
        select(JobRow.state, func.count()).where(JobRow.sweep_id == sweep_id).group_by(JobRow.state)
    ).all()
    return {state: n for state, n in rows}
