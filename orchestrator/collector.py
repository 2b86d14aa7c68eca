"""The collector: the only writer of results. Validates each message from a worker and stores it once.

Workers are untrusted, so nothing they send is stored before it is parsed against the schema,
matched to a job this orchestrator issued, and found self-consistent. Delivery is at least once
(late acks); storage is exactly once, keyed by job id.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from orchestrator.db import RESULT_KEY_COLUMNS, JobRow, ResultRow, session_scope
from worker.contract import Envelope, Job, Result

log = logging.getLogger("tokenfarm.collector")


@dataclass
class Outcome:
    action: str  # "started", "stored", "duplicate", "rejected"
    job_id: str = ""
    reason: str = ""


def ingest(session: Session, body: object) -> Outcome:
    """Apply one results-queue message to the database (the caller commits)."""
    try:
        env = Envelope.model_validate(body)
    except ValidationError as exc:
        return Outcome("rejected", reason=f"malformed message: {exc.errors()[0]['msg']}")
    row = session.get(JobRow, env.job_id)
    if row is None:
        return Outcome("rejected", env.job_id, "no such job")
    if env.kind == "started":
        if row.state == "queued":
            row.state = "running"
        if row.state == "running":
            row.worker = env.worker
            row.attempts += 1
        return Outcome("started", env.job_id)
    if env.result is None:
        return Outcome("rejected", env.job_id, "a result message without a result")
    if session.get(ResultRow, env.job_id) is not None:
        return Outcome("duplicate", env.job_id)
    result: Result = env.result
    problems = result.inconsistencies(Job.model_validate(row.spec))
    if result.worker != env.worker:
        problems.append(f"result claims worker {result.worker!r} inside a message from {env.worker!r}")
    if problems:
        reason = "; ".join(problems)
        row.state, row.error = "failed", f"result rejected: {reason}"
        return Outcome("rejected", env.job_id, reason)
    session.add(result_row(result))
    row.state = "done" if result.status == "ok" else "failed"
    row.error = result.error or None
    row.worker = result.worker
    return Outcome("stored", env.job_id)


def result_row(result: Result) -> ResultRow:
    data = result.model_dump(mode="json")
    return ResultRow(**{c: getattr(result, c) for c in RESULT_KEY_COLUMNS}, result=data)


class Collector:
    """Consumes the results queue into the database; ack only after commit."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.counts: dict[str, int] = {}

    def on_message(self, body, message) -> None:
        try:
            with session_scope(self.engine) as session:
                outcome = ingest(session, body)
        except IntegrityError:
            # Another collector stored the same job between our check and our insert.
            outcome = Outcome("duplicate", str(body.get("job_id", "")) if isinstance(body, dict) else "")
        except OperationalError as exc:
            log.warning("database unavailable, message goes back to the queue: %s", exc.orig)
            time.sleep(1.0)
            message.requeue()
            return
        self.counts[outcome.action] = self.counts.get(outcome.action, 0) + 1
        if outcome.action == "rejected":
            log.warning("rejected a message for job %s: %s", outcome.job_id or "?", outcome.reason)
        message.ack()


def sweep_progress(session: Session, sweep_id: str) -> dict[str, int]:
    rows = session.execute(
        select(JobRow.state, func.count()).where(JobRow.sweep_id == sweep_id).group_by(JobRow.state)
    ).all()
    return {state: n for state, n in rows}
