"""The database: SQLAlchemy models, engine creation, sessions.

Results are stored as key columns for queries plus the whole Result as JSON, so no field the
worker measured is ever lost to a schema that lags behind. Alembic (migrations/) owns the schema.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from farm.contract import utc_now


def as_utc(ts: datetime) -> datetime:
    """A timestamp read back from the database, timezone-aware: SQLite returns naive ones for
    timezone-aware columns (all stored in UTC)."""
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)

# queued: in the database only, waiting for a worker that fits; sent: leased to one worker and in
# its queue; running: that worker said it started; done/failed: final.
JOB_STATES = ("queued", "sent", "running", "done", "failed")


class Base(DeclarativeBase):
    pass


class SweepRow(Base):
    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict] = mapped_column(JSON)
    n_jobs: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The lease (orchestrator/scheduler.py): the worker the job was sent to, for which attempt
    # (`attempts`), under which id, when. Only that worker's messages echoing that lease count.
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    lease_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    leased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # A transient failure's pause: not leased again before this.
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, onupdate=utc_now)


class ResultRow(Base):
    __tablename__ = "results"

    # One row per job: the primary key is what makes a redelivered result a no-op.
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    worker: Mapped[str] = mapped_column(String(200), index=True)
    model: Mapped[str] = mapped_column(String(500), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    quant: Mapped[str] = mapped_column(String(16))
    technique: Mapped[str] = mapped_column(String(32))
    backend: Mapped[str] = mapped_column(String(32))
    test: Mapped[str] = mapped_column(String(64))
    n_prompt: Mapped[int] = mapped_column(Integer)
    n_gen: Mapped[int] = mapped_column(Integer)
    n_depth: Mapped[int] = mapped_column(Integer)
    avg_ts: Mapped[float] = mapped_column(Float)
    stddev_ts: Mapped[float] = mapped_column(Float)
    result: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class WorkerRow(Base):
    """A worker allowed to join: its token signs everything it sends."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    # The shared HMAC secret; only the orchestrator's database and the worker's box hold it.
    token: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    capabilities: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    n_rejected: Mapped[int] = mapped_column(Integer, default=0)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Marked by the operator (`tokenfarm workers trust`): its results become canary references.
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    n_canary_passed: Mapped[int] = mapped_column(Integer, default=0)
    n_canary_failed: Mapped[int] = mapped_column(Integer, default=0)
    n_crosscheck_agreed: Mapped[int] = mapped_column(Integer, default=0)
    n_crosscheck_disagreed: Mapped[int] = mapped_column(Integer, default=0)
    # Memory bandwidth from its first hello, held here: the roofline check's figure, which later
    # announcements may lower but never raise (a worker does not choose its own bound).
    host_bandwidth_gbps: Mapped[float | None] = mapped_column(Float, nullable=True)
    device_bandwidth_gbps: Mapped[float | None] = mapped_column(Float, nullable=True)


class RejectionRow(Base):
    """A message the collector refused, kept so an operator can see who sent what and why."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    worker: Mapped[str] = mapped_column(String(200), index=True)
    job_id: Mapped[str] = mapped_column(String(36), default="")
    reason: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class DeadLetterRow(Base):
    """A results-queue message the collector could not decode (not JSON, another content type,
    too long), moved aside so it neither blocks the queue nor dies again on every restart."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    content_type: Mapped[str] = mapped_column(String(200), default="")
    size_bytes: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    # The first bytes only: enough to see what it was, bounded whatever was sent.
    head: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class CheckRow(Base):
    """A job the orchestrator can verify: a canary (its greedy output is known) or a cross-check
    (a second worker of the same hardware class repeats a job). Its own job row goes to the
    workers like any other; only this table says what it is, so nothing on the wire does.

    Its Result is kept here, not in `results`, so rankings count every measurement once.
    """

    __tablename__ = "checks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "canary" or "crosscheck"
    # crosscheck: the job it repeats; a tie-break also names the cross-check whose disagreement it settles.
    origin_job_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    vote_of: Mapped[str | None] = mapped_column(String(36), nullable=True)
    tolerance: Mapped[float] = mapped_column(Float, default=0.25)
    excluded_workers: Mapped[list] = mapped_column(JSON, default=list)
    target_worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    hardware_class: Mapped[str] = mapped_column(String(300), default="")
    greedy_key: Mapped[str] = mapped_column(String(64), default="")
    output_sha256: Mapped[str] = mapped_column(String(64), default="")
    expected_sha256: Mapped[str] = mapped_column(String(64), default="")
    # pending, then pass / fail / unjudged (canary), agree / disagree / skipped (crosscheck), void (the run failed).
    verdict: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, onupdate=utc_now)


class CanaryReferenceRow(Base):
    """The greedy output a job must produce on one hardware class, from a pin or a trusted worker."""

    __tablename__ = "canary_references"

    # orchestrator.checks.greedy_key: every Job field the greedy tokens depend on (model source
    # sha256, quant, engine, test, prompts, engine config), hashed.
    greedy_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    hardware_class: Mapped[str] = mapped_column(String(300), primary_key=True)
    output_sha256: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(500))
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    quant: Mapped[str] = mapped_column(String(16))
    engine: Mapped[str] = mapped_column(String(32))
    test: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


# Columns copied from the Result; a test checks every one agrees with the stored JSON.
RESULT_KEY_COLUMNS = ("job_id", "sweep_id", "status", "worker", "model", "model_sha256", "quant",
                      "technique", "backend", "test", "n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL lets the dashboard read while the collector writes.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    session = sessionmaker(engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def upgrade(url: str) -> None:
    """Alembic `upgrade head` against url."""
    from alembic import command
    from alembic.config import Config

    migrations = Path(__file__).resolve().parent.parent / "migrations"
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(cfg, "head")
