"""Read side of the database for the CLI and the dashboard: results and sweeps back as schema objects,
and whether the schema is at Alembic's head (read, never migrated: `tokenfarm db upgrade` migrates)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from farm.contract import Result
from orchestrator.db import JobRow, ResultRow, SweepRow


def load_results(session: Session, sweep_id: str | None = None, status: str | None = None,
                 exclude_workers: set[str] | frozenset[str] = frozenset()) -> list[Result]:
    q = select(ResultRow.result).order_by(ResultRow.sweep_id, ResultRow.created_at)
    if exclude_workers:
        q = q.where(ResultRow.worker.not_in(exclude_workers))
    if sweep_id:
        q = q.where(ResultRow.sweep_id == sweep_id)
    if status:
        q = q.where(ResultRow.status == status)
    return [Result.model_validate(data) for data in session.scalars(q)]


def find_sweep(session: Session, ref: str | None) -> SweepRow | None:
    """A sweep by id, unique id prefix or name (the newest of that name); None means the newest."""
    if not ref:
        return session.scalars(select(SweepRow).order_by(SweepRow.created_at.desc()).limit(1)).first()
    row = session.get(SweepRow, ref)
    if row:
        return row
    matches = session.scalars(select(SweepRow).where(SweepRow.id.startswith(ref))).all()
    if len(matches) == 1:
        return matches[0]
    return session.scalars(
        select(SweepRow).where(SweepRow.name == ref).order_by(SweepRow.created_at.desc()).limit(1)
    ).first()


def failed_jobs(session: Session, sweep_id: str) -> list[JobRow]:
    return list(session.scalars(
        select(JobRow).where(JobRow.sweep_id == sweep_id, JobRow.state == "failed").order_by(JobRow.index)
    ))


def schema_is_current(engine: Engine) -> bool:
    """Whether the database's Alembic revision is the scripts' head: one SELECT, no migration, so a
    read-only role can ask it."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(Path(__file__).resolve().parent.parent / "migrations"))
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current is not None and current == scripts.get_current_head()


def sweep_rows(session: Session) -> list[SweepRow]:
    return list(session.scalars(select(SweepRow).order_by(SweepRow.created_at)))


def sweep_jobs(session: Session, sweep_id: str) -> list[JobRow]:
    return list(session.scalars(select(JobRow).where(JobRow.sweep_id == sweep_id).order_by(JobRow.index)))


def any_worker_registered(session: Session) -> bool:
    from orchestrator.db import WorkerRow

    return session.scalars(select(WorkerRow.name).limit(1)).first() is not None


def canary_references(session: Session) -> list:
    from orchestrator.db import CanaryReferenceRow

    return list(session.scalars(select(CanaryReferenceRow).order_by(CanaryReferenceRow.model,
                                                                     CanaryReferenceRow.quant)))
