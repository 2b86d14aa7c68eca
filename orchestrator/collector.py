"""The collector: the only writer of results. Verifies each message from a worker and stores it once.

Workers are untrusted. Nothing they send is stored before its signature is checked against the
worker's token, it is parsed against the schema, matched to a job this orchestrator issued and
assigned to that worker, and found self-consistent and physically plausible. Every refusal is
kept (rejections table) and counted against the worker. Delivery is at least once (late acks,
re-sent jobs of dead workers); storage is exactly once, keyed by job id.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from farm.contract import Envelope, Job, Result, kind_of_test, utc_now
from farm.signing import verify
from orchestrator import checks, lifecycle
from orchestrator.db import (
    RESULT_KEY_COLUMNS,
    CheckRow,
    JobRow,
    RejectionRow,
    ResultRow,
    WorkerRow,
    session_scope,
)
from orchestrator.validation import result_problems

log = logging.getLogger("tokenfarm.collector")

# A decode figure this far above the memory-bandwidth bound cannot be real.
ROOFLINE_MARGIN = 1.5
# A collector commits what it takes within a second or two; a result unacknowledged this long
# was taken by one that stopped.
STALE_RESULT_S = 30.0

# (jobs, countdown_s): how the collector has jobs sent again without knowing the broker.
Resend = Callable[[list[Job], float], None]


@dataclass
class Outcome:
    action: str  # "hello", "heartbeat", "started", "stale", "stored", "retry", "rejected"
    job_id: str = ""
    reason: str = ""
    job: Job | None = None  # with "retry": the job to send again, after delay_s
    delay_s: float = 0.0
    resend: list[Job] = field(default_factory=list)  # with "hello": jobs a restarted worker dropped


def _reject(session: Session, worker: str, job_id: str, reason: str, known_worker: WorkerRow | None) -> Outcome:
    session.add(RejectionRow(worker=worker[:200], job_id=job_id[:36], reason=reason))
    if known_worker is not None:
        known_worker.n_rejected += 1
    return Outcome("rejected", job_id, reason)


def implausibilities(result: Result, worker: WorkerRow | None) -> list[str]:
    """Physical limits a real measurement cannot beat: decode is bound by memory bandwidth."""
    if result.status != "ok" or kind_of_test(result.test) == "pp":
        return []
    roofline = result.roofline_tok_s
    if not roofline:
        caps_hw = ((worker.capabilities or {}).get("hardware") or {}) if worker else {}
        bandwidth_gbps = result.hardware.bandwidth_gbps or caps_hw.get("bandwidth_gbps")
        size = result.model_facts.size_bytes
        roofline = bandwidth_gbps * 1e9 / size if bandwidth_gbps and size else None
    if not roofline:
        return []
    # Speculation verifies up to n_draft + 1 tokens per read of the weights.
    limit = ROOFLINE_MARGIN * roofline * (1 + result.n_draft if result.technique != "baseline" else 1)
    decode_ts = result.decode_ts or result.avg_ts
    if decode_ts > limit:
        return [f"decode {decode_ts:.1f} tok/s beats the memory-bandwidth limit of {roofline:.1f} tok/s "
                f"by more than the {limit / roofline:.1f}x this test allows"]
    return []


@dataclass
class Known:
    """The rows a batch of messages touches, read up front in four queries rather than four per
    message; ingestion then runs without a round trip. `stored`: jobs whose result is stored."""

    workers: dict[str, WorkerRow]
    jobs: dict[str, JobRow]
    stored: set[str]
    checks: dict[str, CheckRow]  # the batch's canary and cross-check jobs


def preload(session: Session, bodies: list[object]) -> Known:
    names = {b["worker"] for b in bodies if isinstance(b, dict) and isinstance(b.get("worker"), str)}
    job_ids = {b["job_id"] for b in bodies if isinstance(b, dict) and isinstance(b.get("job_id"), str) and b["job_id"]}
    workers = {w.name: w for w in session.scalars(select(WorkerRow).where(WorkerRow.name.in_(names)))} if names else {}
    if not job_ids:
        return Known(workers, {}, set(), {})
    jobs = {j.id: j for j in session.scalars(select(JobRow).where(JobRow.id.in_(job_ids)))}
    stored = set(session.scalars(select(ResultRow.job_id).where(ResultRow.job_id.in_(job_ids))))
    held = {c.job_id: c for c in session.scalars(select(CheckRow).where(CheckRow.job_id.in_(job_ids)))}
    return Known(workers, jobs, stored, held)


def ingest(session: Session, body: object, max_attempts: int = 3, known: Known | None = None) -> Outcome:
    """Apply one results-queue message to the database (the caller commits).

    `known`: the batch's rows from `preload` (kept up to date here); read for this message if absent.
    """
    if not isinstance(body, dict) or not isinstance(body.get("worker"), str):
        return _reject(session, "?", "", "malformed message: not a JSON object with a worker name", None)
    name = body["worker"]
    job_id = body.get("job_id") if isinstance(body.get("job_id"), str) else ""
    known = known or preload(session, [body])
    worker = known.workers.get(name)
    if worker is None:
        return _reject(session, name, job_id, f"unknown worker {name!r}: not registered with `tokenfarm workers add`", None)
    if not verify(body, worker.token):
        return _reject(session, name, job_id, "bad signature: not signed with this worker's token", worker)
    try:
        env = Envelope.model_validate(body)
    except ValidationError as exc:
        return _reject(session, name, job_id, f"malformed message: {exc.errors()[0]['msg']}", worker)
    worker.last_seen = utc_now()
    if env.kind in ("hello", "heartbeat"):
        if env.capabilities is not None:
            worker.capabilities = env.capabilities.model_dump(mode="json")
        if env.kind == "hello":
            return Outcome("hello", resend=lifecycle.dropped_on_restart(session, name, env.sent_at, max_attempts))
        return Outcome(env.kind)
    row = known.jobs.get(env.job_id)
    if row is None:
        return _reject(session, name, env.job_id, "no such job", worker)
    if env.kind == "started":
        return Outcome("started" if lifecycle.start(row, name) else "stale", env.job_id)
    if env.result is None:
        return _reject(session, name, env.job_id, "a result message without a result", worker)
    check = known.checks.get(env.job_id)
    if env.job_id in known.stored or (check is not None and check.result is not None):
        if _redelivered(session, env.job_id, env.result, check):
            # A collector stored it and stopped before acknowledging: the queue gave it again.
            return Outcome("duplicate", env.job_id)
        return _reject(session, name, env.job_id, "replay: a result for this job is already stored", worker)
    if row.worker and row.worker != name:
        return _reject(session, name, env.job_id, f"job is assigned to worker {row.worker!r}", worker)
    result: Result = env.result
    job = Job.model_validate(row.spec)
    problems = result_problems(result, job)
    if result.worker != name:
        problems.append(f"result claims worker {result.worker!r} inside a message from {name!r}")
    problems += implausibilities(result, worker)
    problems += checks.misrouted(check, name)
    if problems:
        reason = "; ".join(problems)
        lifecycle.reject(row, reason)
        return _reject(session, name, env.job_id, reason, worker)
    if result.status == "failed" and result.transient and (
            delay_s := lifecycle.retry(row, result.error, max_attempts)) is not None:
        # Not stored: the job goes back on the queue, after a pause that grows with each attempt.
        if check is not None and check.kind == checks.CROSSCHECK:
            checks.unroute(check)  # goes again to a chosen worker of the class, not the shared queue
            return Outcome("retry", env.job_id, result.error)
        return Outcome("retry", env.job_id, result.error, job=job, delay_s=delay_s)
    if check is not None:
        checks.settle(session, check, job, result, worker)
    else:
        store(session, result)
        known.stored.add(env.job_id)
        checks.after_stored(session, job, result, worker)
    lifecycle.finish(row, name, result.status == "ok", result.error)
    if result.status == "ok":
        worker.n_done += 1
    else:
        worker.n_failed += 1
    return Outcome("stored", env.job_id)


def _redelivered(session: Session, job_id: str, result: Result, check) -> bool:
    stored = check.result if check is not None and check.result is not None else getattr(
        session.get(ResultRow, job_id), "result", None)
    return stored == result.model_dump(mode="json")


def result_row(result: Result) -> ResultRow:
    data = result.model_dump(mode="json")
    return ResultRow(**{c: getattr(result, c) for c in RESULT_KEY_COLUMNS}, result=data)


def store(session: Session, result: Result) -> None:
    """A validated Result into the results table, once: the job id is the key, so a second store of
    the same job fails at commit (the caller decides whether that was a redelivery)."""
    session.add(result_row(result))


@dataclass(frozen=True)
class TrustedImport:
    """Results the operator brings in from a tool of their own (llama-bench), not from a worker.

    They carry no signature and no model or output hashes, because the tool makes none; running
    the import is the operator vouching for them. Everything else a worker's Result must satisfy
    (it matches its job, its figures follow from its samples, decode beats no memory bandwidth)
    still holds, and they are stored by the same path, once per job id.
    """

    tool: str  # "llama-bench"
    file: str  # the file they came from, for messages
    machine: str  # the machine the operator says measured them; the results' worker


def store_import(session: Session, result: Result, job: Job, source: TrustedImport) -> Outcome:
    """Store one imported Result and its job (the caller commits): "stored", "duplicate" when this
    job's result is already stored (the same line imported again), or "rejected" with the reason."""
    if session.get(ResultRow, result.job_id) is not None:
        return Outcome("duplicate", result.job_id)
    problems = result_problems(result, job, from_worker=False)
    if result.worker != source.machine:
        problems.append(f"result names worker {result.worker!r}, the import is from {source.machine!r}")
    problems += implausibilities(result, None)
    if problems:
        # Nothing kept: the operator sees the reason at once and the import stores nothing.
        return Outcome("rejected", result.job_id, "; ".join(problems))
    row = session.get(JobRow, result.job_id)
    if row is None:
        row = JobRow(id=job.job_id, sweep_id=job.sweep_id, index=job.index, spec=job.model_dump(mode="json"),
                     state="sent", attempts=1, worker=source.machine)
        session.add(row)
        session.flush()  # the result row refers to it
    store(session, result)
    lifecycle.finish(row, source.machine, result.status == "ok", result.error)
    session.flush()  # a repeated line later in the same file must see this row
    return Outcome("stored", result.job_id)


class Collector:
    """Consumes the results queue into the database; acks only after the commit.

    Messages are applied in batches, one transaction each, because a farm's results arrive in
    bursts and a commit per message caps ingestion at the database's fsync rate.
    """

    def __init__(self, engine: Engine, batch_size: int = 200, send: Resend | None = None,
                 max_attempts: int = 3, relay: Callable[[object], int] | None = None) -> None:
        self.engine = engine
        # On a confined broker: moves each worker's results onto the results queue, given a Redis
        # client (orchestrator/brokerusers.py ResultsRelay); called every tick before consuming.
        self.relay = relay
        # Sends what the lifecycle gives back (dispatch.sender(app)); None: it waits for `sweep resume`.
        self.send = send
        self.max_attempts = max_attempts
        self.batch_size = batch_size
        self.counts: dict[str, int] = {}
        self._pending: list[tuple[object, object]] = []

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def on_message(self, body, message) -> None:
        self._pending.append((body, message))
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            with session_scope(self.engine) as session:
                known = preload(session, [body for body, _ in batch])
                outcomes = [ingest(session, body, self.max_attempts, known) for body, _ in batch]
        except IntegrityError:
            # Another collector stored one of these jobs meanwhile: redo them one at a time.
            outcomes = [self._one(body) for body, _ in batch]
        except OperationalError as exc:
            log.warning("database unavailable, %d messages go back to the queue: %s", len(batch), exc.orig)
            time.sleep(1.0)
            for _, message in batch:
                message.requeue()
            return
        retries = [o for o in outcomes if o.action == "retry" and o.job is not None]
        dropped = [job for o in outcomes for job in o.resend]
        if (retries or dropped) and self.send is not None:
            for o in retries:
                self.send([o.job], o.delay_s)
            self.send(dropped, 0.0)
        for (_, message), outcome in zip(batch, outcomes):
            self.counts[outcome.action] = self.counts.get(outcome.action, 0) + 1
            if outcome.action == "rejected":
                log.warning("rejected a message for job %s: %s", outcome.job_id or "?", outcome.reason)
            message.ack()

    def _one(self, body) -> Outcome:
        try:
            with session_scope(self.engine) as session:
                return ingest(session, body, self.max_attempts)
        except IntegrityError:
            return Outcome("duplicate", str(body.get("job_id", "")) if isinstance(body, dict) else "")


def drain(celery, collector: Collector, n_waiting: Callable[[], int | None] = lambda: None,
          tick_s: float = 0.5) -> int:
    """Take in what waits on the results queue, store it, and return how many messages were
    handled: for a box without a long-running collector (`tokenfarm collector --once`).

    Stops after a tick that brought nothing once `n_waiting()` says the queue is empty (None: it
    cannot say, and the quiet tick alone decides), so workers that keep sending heartbeats do
    not keep it running.
    """
    seen = [0]

    def done() -> bool:
        n_handled = sum(collector.counts.values())
        quiet, seen[0] = n_handled == seen[0], n_handled
        return quiet and not n_waiting()

    collect(celery, collector, done, tick_s)
    return seen[0]


def collect(celery, collector: Collector, done: Callable[[], bool], tick_s: float = 0.5) -> None:
    """Consume the results queue until `done()` says so, called every tick.

    Survives broker outages: the consumer is rebuilt after a connection error, and nothing is
    acknowledged before it is committed, so a message in flight during an outage comes back.
    """
    from orchestrator.broker_audit import restore_stale_results, results_consumer

    connection_errors = (OSError, *celery.connection_for_read().connection_errors)
    while True:
        try:
            with results_consumer(celery, collector.on_message, prefetch_count=2 * collector.batch_size) as conn:
                next_restore = 0.0
                while True:
                    if time.monotonic() > next_restore:
                        # What a collector killed mid-batch took, back on the queue (see the function).
                        if n := restore_stale_results(conn, STALE_RESULT_S):
                            log.warning("%d results held by a collector that stopped are back on the queue", n)
                        next_restore = time.monotonic() + 10.0
                    if collector.relay is not None:
                        collector.relay(conn.default_channel.client)
                    deadline = time.monotonic() + tick_s
                    # Take what is waiting (up to a batch), then commit it in one transaction.
                    while collector.n_pending < collector.batch_size and time.monotonic() < deadline:
                        try:
                            conn.drain_events(timeout=max(0.01, deadline - time.monotonic()) if not collector.n_pending else 0.01)
                        except TimeoutError:
                            if collector.n_pending:
                                break
                    collector.flush()
                    if done():
                        return
        except connection_errors as exc:
            log.warning("broker unavailable (%s); reconnecting", exc)
            if done():
                return
            time.sleep(1.0)
