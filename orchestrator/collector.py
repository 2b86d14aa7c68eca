"""The collector: the only writer of results. Verifies each message from a worker and stores it once.

Workers are untrusted, and anyone who reaches the broker can put a message on the results
queue. Nothing is parsed before its length is checked and its content type is JSON (anything
else is moved aside to dead_letters, acknowledged, and stored as a rejection with its reason and
size, so it can neither kill the collector nor come back on a restart); nothing is stored before
its signature is checked against the worker's token, it is parsed against the bounded schema,
matched to the lease this orchestrator granted (the worker it sent the job to, the attempt it
sent), and found self-consistent and physically plausible against figures the orchestrator
holds. A refused message changes no job's state. Every refusal is kept (rejections table); it
counts against a worker only when that worker's signature proves it sent the message.
Delivery is at least once (late acks, re-sent jobs of dead workers); storage is exactly once,
keyed by job id.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from farm.contract import Envelope, Job, Result, kind_of_test, utc_now
from farm.identity import is_sha256
from farm.memory import memory_kind
from farm.signing import verify
from orchestrator import checks, lifecycle
from orchestrator.db import (
    RESULT_KEY_COLUMNS,
    REFUSED_JOB,
    CheckRow,
    DeadLetterRow,
    JobRow,
    RejectionRow,
    ResultRow,
    WorkerRow,
    session_scope,
)
from orchestrator.validation import capabilities_problems, result_problems

log = logging.getLogger("tokenfarm.collector")

# A decode figure this far above the memory-bandwidth bound cannot be real.
ROOFLINE_MARGIN = 1.5
# The most memory bandwidth any machine of a class has (GB/s), whatever it announces: host memory
# (12-channel DDR5 servers and Apple's unified memory stay under 1 TB/s) and a GPU's (a B200's HBM3e
# is 8 TB/s). A worker announcing none, or more, is judged against these.
BANDWIDTH_BOUND_GBPS = {"ram": 1200.0, "vram": 10000.0}
# A results-queue message longer than this is not parsed: a Result with every list full is a
# few hundred kB; a heartbeat carrying a million model hashes is 67 MB.
MAX_MESSAGE_BYTES = 1 << 20
# What of an undecodable message is kept to show what it was.
DEAD_LETTER_HEAD_BYTES = 4096
# A collector commits what it takes within a second or two; a result unacknowledged this long
# was taken by one that stopped.
STALE_RESULT_S = 30.0

@dataclass
class Outcome:
    action: str  # "hello", "heartbeat", "started", "progress", "stale", "stored", "duplicate", "retry", "rejected",
    # "job_refused", "dead letter"
    job_id: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Undecodable:
    """A results-queue message that is not a bounded JSON document: why, and what it was."""

    reason: str
    size_bytes: int
    content_type: str = ""
    head: bytes = b""


def decode(body: bytes | str, content_type: str | None, compressed: bool = False) -> object:
    """A message's JSON body, or Undecodable; the length is checked before anything is parsed."""
    raw = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else bytes(body or b"")
    size, head, ctype = len(raw), raw[:DEAD_LETTER_HEAD_BYTES], str(content_type or "")[:200]
    if size > MAX_MESSAGE_BYTES:
        return Undecodable(f"a message of {size} bytes, above the {MAX_MESSAGE_BYTES} bytes a message may have",
                           size, ctype, head)
    if ctype != "application/json":
        return Undecodable(f"content type {ctype or 'none'!r}, not application/json: only JSON is decoded",
                           size, ctype, head)
    if compressed:
        return Undecodable("a compressed message: results are sent uncompressed", size, ctype, head)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return Undecodable(f"not JSON: {str(exc)[:200]}", size, ctype, head)


def dead_letter(session: Session, bad: Undecodable) -> Outcome:
    """Move an undecodable message aside: kept in dead_letters and as a rejection; nobody's count."""
    session.add(DeadLetterRow(content_type=bad.content_type, size_bytes=bad.size_bytes, reason=bad.reason,
                              head=bad.head))
    session.add(RejectionRow(worker="?", job_id="", reason=f"moved to dead letters: {bad.reason}",
                             size_bytes=bad.size_bytes))
    return Outcome("dead letter", "", bad.reason)


def _reject(session: Session, worker: str, job_id: str, reason: str, proven_sender: WorkerRow | None,
            size_bytes: int = 0) -> Outcome:
    """Keep a refusal; count it against `proven_sender`, the worker whose own signature the message
    carries (None where nothing proves who sent it: a bad signature under an honest name)."""
    session.add(RejectionRow(worker=worker[:200], job_id=job_id[:36], reason=reason[:4000], size_bytes=size_bytes))
    if proven_sender is not None:
        proven_sender.n_rejected += 1
    return Outcome("rejected", job_id, reason)


def held_bandwidth_gbps(worker: WorkerRow | None, result: Result, kind: str) -> float:
    """The bandwidth a decode is judged against: what the worker announced when it joined, held
    by the orchestrator (a trusted import: what its result says), never above its class's bound;
    the bound itself where nothing was announced."""
    bound = BANDWIDTH_BOUND_GBPS[kind]
    if worker is None:
        hw = result.hardware
        figure = hw.device_bandwidth_gbps if kind == "vram" else (hw.host_bandwidth_gbps or hw.bandwidth_gbps)
    else:
        figure = worker.device_bandwidth_gbps if kind == "vram" else worker.host_bandwidth_gbps
    return min(figure, bound) if figure and figure > 0 else bound


def implausibilities(result: Result, worker: WorkerRow | None, job: Job | None = None) -> list[str]:
    """Physical limits a real measurement cannot beat: decode is bound by memory bandwidth.

    Judged from figures the worker does not choose: the weight bytes one decode step reads from
    the orchestrator's own header read (the Job's active_bytes; the result's model facts only for
    a job recorded without them), and the bandwidth held for the worker (held_bandwidth_gbps).
    The roofline the worker reports is never used."""
    if result.status != "ok" or kind_of_test(result.test) == "pp":
        return []
    step_bytes = job.active_bytes if job is not None and job.active_bytes else (
        result.model_facts.active_bytes or result.model_facts.size_bytes)
    if step_bytes <= 0:
        return []
    kind = memory_kind(job) if job is not None else ("vram" if result.config.n_gpu_layers != 0 else "ram")
    if kind == "vram" and worker is not None and not ((worker.capabilities or {}).get("hardware") or {}).get("vram_bytes"):
        kind = "ram"  # a box without a GPU runs "offloaded" layers on the host
    bandwidth_gbps = held_bandwidth_gbps(worker, result, kind)
    roofline = bandwidth_gbps * 1e9 / step_bytes
    source = job if job is not None else result
    # Speculation verifies up to n_draft + 1 tokens per read of the weights; MTP up to n_mtp + 1.
    per_read = 1
    if source.technique != "baseline":
        per_read += source.n_mtp if source.technique == "mtp" else source.n_draft
    limit = ROOFLINE_MARGIN * roofline * per_read
    decode_ts = result.decode_ts or result.avg_ts
    if decode_ts > limit:
        return [f"decode {decode_ts:.1f} tok/s beats the memory-bandwidth limit of {roofline:.1f} tok/s "
                f"({bandwidth_gbps:.1f} GB/s over {step_bytes} bytes a token) by more than the "
                f"{limit / roofline:.1f}x this test allows"]
    return []


def sha256_problems(result: Result, job: Job) -> list[str]:
    """Every sha256 a Result carries is a real digest (an ok result carries all of them; a failure,
    those of the files it got to), and the job's where the job names one."""

    def bad(value: str) -> bool:
        return not is_sha256(value) or value == "0" * 64

    problems = []
    for field in ("model_sha256", "source_sha256", *(("draft_sha256",) if job.technique == "spec" else ())):
        value = getattr(result, field)
        if (result.status == "ok" or value) and bad(value):
            problems.append(f"{field} {value[:70]!r} is not a sha256 hex digest of a file")
    return problems  # a well-formed source_sha256 other than the job's: validation.result_problems


def reference_problems(session: Session, result: Result) -> list[str]:
    """A quality block's reference against the model's reference as the farm has recorded it.

    The model's reference file (its quality reference quant, derived on a worker where the
    catalogue file is quantized) is known by sha256 from what the farm stored before: the
    model_sha256 of that quant's own ok results, and the reference_sha256 of earlier quality
    results, both of the same model and source file. A block naming another file is refused.
    The first such figure to arrive for a model sets the record (nothing is stored to hold it
    against yet); validation.quality_problems already ties the reference quant's own result to
    the file it measured.
    """
    q = result.quality
    if q is None or result.status != "ok":
        return []
    known: set[str] = set()
    rows = session.scalars(select(ResultRow).where(ResultRow.model == result.model, ResultRow.status == "ok"))
    for row in rows:
        stored = row.result or {}
        if stored.get("source_sha256") != result.source_sha256:
            continue
        if row.quant == q.reference_quant and row.model_sha256:
            known.add(row.model_sha256)
        sq = stored.get("quality") or {}
        if sq.get("reference_quant") == q.reference_quant and sq.get("reference_sha256"):
            known.add(sq["reference_sha256"])
    if known and q.reference_sha256 not in known:
        return [f"quality reference_sha256 {q.reference_sha256[:16]}... is not the model's {q.reference_quant} "
                f"reference ({', '.join(sorted(k[:16] + '...' for k in known))} stored for {result.model[:200]})"]
    return []


def _hold_bandwidth(worker: WorkerRow, hw: dict) -> None:
    """The first announced figures are kept; a later announcement may lower them, never raise them."""
    for column, key in (("host_bandwidth_gbps", "host_bandwidth_gbps"), ("device_bandwidth_gbps", "device_bandwidth_gbps")):
        figure = hw.get(key) or (hw.get("bandwidth_gbps") if key == "host_bandwidth_gbps" and not hw.get("vram_bytes") else 0)
        if not figure or figure <= 0:
            continue
        held = getattr(worker, column)
        setattr(worker, column, figure if held is None else min(held, figure))


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


def ingest(session: Session, body: object, max_attempts: int = 3, known: Known | None = None,
           size_bytes: int = 0) -> Outcome:
    """Apply one results-queue message, decoded (`decode`), to the database (the caller commits).

    `known`: the batch's rows from `preload` (kept up to date here); read for this message if absent.
    `size_bytes`: the message's length, kept with a refusal.
    """
    if isinstance(body, Undecodable):
        return dead_letter(session, body)
    if not isinstance(body, dict) or not isinstance(body.get("worker"), str):
        return _reject(session, "?", "", "malformed message: not a JSON object with a worker name", None, size_bytes)
    name = body["worker"]
    job_id = body.get("job_id") if isinstance(body.get("job_id"), str) else ""
    known = known or preload(session, [body])
    worker = known.workers.get(name)
    if worker is None:
        return _reject(session, name, job_id, f"unknown worker {name[:200]!r}: not registered with `tokenfarm workers add`",
                       None, size_bytes)
    if not worker.token:
        return _reject(session, name, job_id, f"worker {name!r} was revoked (`tokenfarm workers revoke`)", None, size_bytes)
    if not verify(body, worker.token):
        # Anyone can write an honest worker's name: without its signature nothing is held against it.
        return _reject(session, name, job_id, "bad signature: not signed with this worker's token", None, size_bytes)
    try:
        env = Envelope.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error.get("loc", ()))
        return _reject(session, name, job_id, f"malformed message: {where}: {error['msg']}"[:500], worker, size_bytes)
    worker.last_seen = utc_now()
    if env.kind in ("hello", "heartbeat"):
        problems = capabilities_problems(env.capabilities) if env.capabilities is not None else []
        if env.capabilities is not None and not problems:
            worker.capabilities = env.capabilities.model_dump(mode="json")
            _hold_bandwidth(worker, worker.capabilities.get("hardware") or {})
        if env.kind == "hello":
            # The worker restarted whatever it claims of its machine: what it held is lost either way.
            lifecycle.dropped_on_restart(session, name, env.sent_at, max_attempts)
        if problems:
            # The last good announcement stays: routing goes on trusting only what passed.
            return _reject(session, name, "", f"{env.kind} not kept: " + "; ".join(problems), worker, size_bytes)
        return Outcome(env.kind)
    if env.kind == "refused":
        # Its own signature proves this worker refused a job message (farm/jobsign.py): kept and
        # counted, but not against it, and no job changes state: the message may be a forgery
        # naming any job, and a genuine job refused as expired is sent again by the broker audit.
        session.add(RejectionRow(worker=name[:200], job_id=env.job_id[:36], reason=REFUSED_JOB + env.reason))
        return Outcome("job_refused", env.job_id, env.reason)
    row = known.jobs.get(env.job_id)
    if row is None:
        return _reject(session, name, env.job_id, "no such job", worker, size_bytes)
    check = known.checks.get(env.job_id)
    if env.kind == "result" and env.result is not None and (
            env.job_id in known.stored or (check is not None and check.result is not None)):
        if _redelivered(session, env.job_id, env.result, check):
            # A collector stored it and stopped before acknowledging: the queue gave it again.
            return Outcome("duplicate", env.job_id)
    if (problem := lifecycle.lease_problem(row, name, env.lease_id, env.attempt)) is not None:
        # Refused, the job untouched. A worker answering an attempt older than the job's current
        # one may be an honest worker that was presumed lost; anything else it was never sent.
        stale = row.worker == name and 0 < env.attempt < row.attempts
        return _reject(session, name, env.job_id, f"no lease: {problem}", None if stale else worker, size_bytes)
    if env.kind == "started":
        return Outcome("started" if lifecycle.start(row) else "stale", env.job_id)
    if env.kind == "progress":
        if env.download is None:
            return _reject(session, name, env.job_id, "a progress message without its download figures", worker,
                           size_bytes)
        moved = lifecycle.downloading(row, name, env.download.downloaded_bytes, env.download.total_bytes)
        return Outcome("progress" if moved else "stale", env.job_id)
    if env.result is None:
        return _reject(session, name, env.job_id, "a result message without a result", worker, size_bytes)
    if env.job_id in known.stored or (check is not None and check.result is not None):
        return _reject(session, name, env.job_id, "replay: a result for this job is already stored", worker, size_bytes)
    if row.state in lifecycle.FINAL_STATES:
        return _reject(session, name, env.job_id, f"the job is already {row.state}", worker, size_bytes)
    result: Result = env.result
    job = Job.model_validate(row.spec)
    problems = result_problems(result, job)
    if result.worker != name:
        problems.append(f"result claims worker {result.worker[:200]!r} inside a message from {name!r}")
    problems += sha256_problems(result, job)
    problems += implausibilities(result, worker, job)
    problems += reference_problems(session, result)
    problems += checks.misrouted(check, name)
    if problems:
        # The job keeps its state: a refused message decides nothing about it.
        return _reject(session, name, env.job_id, "; ".join(problems), worker, size_bytes)
    if result.status == "failed" and result.transient and (
            lifecycle.retry(row, result.error, max_attempts)) is not None:
        # Not stored: the job is queued again, leased after a pause that grows with each attempt.
        if check is not None and check.kind == checks.CROSSCHECK:
            checks.unroute(check)  # goes again to a chosen worker of the class
        return Outcome("retry", env.job_id, result.error)
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
    problems += implausibilities(result, None, job)
    if problems:
        # Nothing kept: the operator sees the reason at once and the import stores nothing.
        return Outcome("rejected", result.job_id, "; ".join(problems))
    row = session.get(JobRow, result.job_id)
    if row is None:
        row = JobRow(id=job.job_id, sweep_id=job.sweep_id, index=job.index, spec=job.model_dump(mode="json"),
                     state="running", attempts=1, worker=source.machine)
        session.add(row)
        session.flush()  # the result row refers to it
    store(session, result)
    lifecycle.finish(row, source.machine, result.status == "ok", result.error)
    session.flush()  # a repeated line later in the same file must see this row
    return Outcome("stored", result.job_id)


class Collector:
    """Consumes the results queue into the database; acks only after the commit.

    Messages are applied in batches, one transaction each, because a farm's results arrive in
    bursts and a commit per message caps ingestion at the database's fsync rate. It takes each
    message undecoded (kombu's on_message) and decodes it itself (`decode`), so a message kombu
    could not decode is moved aside instead of raising out of the consumer and coming back.
    `after_batch`: called after each committed batch that stored or freed something (results
    free their workers' slots: the caller leases them the next jobs at once).
    """

    def __init__(self, engine: Engine, batch_size: int = 200, max_attempts: int = 3,
                 after_batch: Callable[[], None] | None = None,
                 relay: Callable[[object], int] | None = None) -> None:
        self.engine = engine
        # On a confined broker: moves each worker's results onto the results queue, given a Redis
        # client (orchestrator/brokerusers.py ResultsRelay); called every tick before consuming.
        self.relay = relay
        self.max_attempts = max_attempts
        self.batch_size = batch_size
        self.after_batch = after_batch
        self.counts: dict[str, int] = {}
        self._pending: list[tuple[object, int, object]] = []

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def on_message(self, message) -> None:
        """kombu's on_message: the raw message, acknowledged once its batch is committed."""
        body = message.body
        compressed = bool((message.headers or {}).get("compression"))
        size = len(body) if isinstance(body, (bytes, bytearray, str)) else 0
        self._pending.append((decode(body, message.content_type, compressed), size, message))
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            with session_scope(self.engine) as session:
                known = preload(session, [body for body, _, _ in batch])
                outcomes = [ingest(session, body, self.max_attempts, known, size) for body, size, _ in batch]
        except IntegrityError:
            # Another collector stored one of these jobs meanwhile: redo them one at a time.
            outcomes = [self._one(body, size) for body, size, _ in batch]
        except OperationalError as exc:
            log.warning("database unavailable, %d messages go back to the queue: %s", len(batch), exc.orig)
            time.sleep(1.0)
            for _, _, message in batch:
                message.requeue()
            return
        for (_, _, message), outcome in zip(batch, outcomes):
            self.counts[outcome.action] = self.counts.get(outcome.action, 0) + 1
            if outcome.action in ("rejected", "dead letter"):
                log.warning("%s a message for job %s: %s", "moved aside" if outcome.action == "dead letter"
                            else "rejected", outcome.job_id or "?", outcome.reason)
            elif outcome.action == "job_refused":
                log.warning("a worker refused a job message for %s: %s", outcome.job_id or "?", outcome.reason)
            message.ack()
        if self.after_batch is not None and any(o.action in ("stored", "retry", "hello") for o in outcomes):
            self.after_batch()

    def note_broken_item(self, exc: Exception) -> None:
        """An item the transport could not even make a message of; it is already off the queue."""
        bad = Undecodable(f"not a broker message: {type(exc).__name__}: {str(exc)[:200]}", 0)
        self.counts["dead letter"] = self.counts.get("dead letter", 0) + 1
        log.warning("moved aside an item on the results queue: %s", bad.reason)
        try:
            with session_scope(self.engine) as session:
                dead_letter(session, bad)
        except OperationalError as db_exc:  # the log line above is then its only record
            log.warning("could not record the dead letter: %s", db_exc.orig)

    def _one(self, body, size: int) -> Outcome:
        try:
            with session_scope(self.engine) as session:
                return ingest(session, body, self.max_attempts, size_bytes=size)
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
                        except (ValueError, KeyError, TypeError) as exc:
                            # A broker item that is not even a kombu message (pushed raw onto the
                            # queue's list): the transport took it off before failing on it, so it
                            # cannot come back; noted as a dead letter, and the collector goes on.
                            collector.note_broken_item(exc)
                    collector.flush()
                    if done():
                        return
        except connection_errors as exc:
            log.warning("broker unavailable (%s); reconnecting", exc)
            if done():
                return
            time.sleep(1.0)
