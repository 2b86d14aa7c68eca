"""Canaries and cross-checks: results the orchestrator can verify instead of believing.

A canary is a copy (new job id) of one of the sweep's own baseline jobs whose greedy output the
orchestrator knows for the worker's hardware class: a reference pinned on the orchestrator box
(`tokenfarm canaries pin`) or sent by a worker the operator trusts. A cross-check is a copy of
a job sent, once the original's result is in, to a second live worker of the same hardware
class, and compared with it (same greedy output, tok/s within a tolerance); a disagreement is
settled by a third worker where there is one (2 of 3), else counted against both.

Both are ordinary Jobs on the wire, with ordinary positions and indexes in their sweep: what a
job is lives only in the `checks` table. Their Results are kept there too, never in `results`,
so every ranking counts each measurement once.

Owns: choosing the checks of a sweep (pure), recording them, judging their Results (called by
the collector's `ingest`), routing cross-checks to a chosen worker, and the verdict counts the
CLI prints. It knows the database and the schema; sending messages is dispatch's job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.broker import worker_queue
from farm.contract import Capabilities, Hardware, Job, Result, kind_of_test, utc_now
from orchestrator.db import (
    CanaryReferenceRow,
    CheckRow,
    JobRow,
    ResultRow,
    WorkerRow,
    as_utc,
)

log = logging.getLogger("tokenfarm.checks")

CANARY = "canary"
CROSSCHECK = "crosscheck"
# A worker is flagged after this many cross-check disagreements, once they outnumber its agreements
# (with no third worker to vote, an honest worker paired with a liar disagrees too).
CROSSCHECK_FLAG_AFTER = 3
# Config fields that cannot change greedy tokens: the thread count only splits the same work.
_NOT_IN_KEY = {"n_threads"}


def hardware_class(hw: Hardware) -> str:
    """Machines expected to compute bit-identical greedy tokens: the GPU model and its memory, or
    the CPU model for a CPU-only box (Capabilities.hardware)."""
    if hw.gpu:
        return f"GPU {hw.gpu} {round(hw.vram_bytes / 2**30)} GiB"
    return f"CPU {hw.cpu}"


def worker_class(worker: WorkerRow, result: Result | None = None) -> str:
    """A worker's class from what it announced when it joined, else from the Result it sent."""
    caps_hw = (worker.capabilities or {}).get("hardware")
    if caps_hw:
        return hardware_class(Hardware.model_validate(caps_hw))
    return hardware_class(result.hardware if result is not None else Hardware())


def greedy_key(job: Job) -> str:
    """sha256 of every Job field the greedy tokens depend on; repetitions and warm-up do not
    (each repetition starts from an empty cache), nor do a technique's draft settings (the
    output hash is the baseline's)."""
    config = {k: v for k, v in job.config.model_dump().items() if k not in _NOT_IN_KEY}
    identity = {
        "model": job.model_sha256 or job.model, "quant": job.quant, "engine": job.engine,
        "technique": job.technique, "kind": job.kind, "n_prompt": job.n_prompt, "n_gen": job.n_gen,
        "n_depth": job.n_depth, "prompt_source": job.prompt_source, "seed": job.seed,
        "prompt_category": job.prompt_category, "n_prompts": job.n_prompts, "config": config,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# --- choosing (pure) ---------------------------------------------------------------------------


@dataclass
class Plan:
    """A sweep's jobs with its checks mixed in, renumbered in send order."""

    jobs: list[Job]
    canaries: set[str] = field(default_factory=set)
    # cross-check job id -> the job it repeats; held back until the original's result is in.
    crosschecks: dict[str, str] = field(default_factory=dict)

    @property
    def to_send(self) -> list[Job]:
        return [j for j in self.jobs if j.job_id not in self.crosschecks]


def _n_checks(fraction: float, n: int) -> int:
    # At least one whenever the fraction is above 0, so a short sweep is checked too.
    return math.ceil(fraction * n) if fraction > 0 and n else 0


def _copy(job: Job) -> Job:
    return job.model_copy(update={"job_id": str(uuid.uuid4())})


def _candidates(model_jobs: list[Job]) -> list[Job]:
    baseline = [j for j in model_jobs if j.technique == "baseline"]
    return [j for j in baseline if j.kind == "tg"] or baseline


def canary_candidates(jobs: list[Job]) -> list[Job]:
    """One job per distinct greedy output a canary of this sweep could be asked for (what
    `tokenfarm canaries pin` runs)."""
    by_model: dict[str, list[Job]] = {}
    for j in jobs:
        by_model.setdefault(j.model, []).append(j)
    unique = {greedy_key(j): j for model_jobs in by_model.values() for j in _candidates(model_jobs)}
    return list(unique.values())


def plan_checks(jobs: list[Job], canary_fraction: float, crosscheck_fraction: float, seed: str) -> Plan:
    """Canaries: ceil(fraction x jobs) per model, copies of its baseline decode (tg) jobs (any of
    its baseline jobs where it has no tg), each placed at a random position among the jobs that
    share its model and engine settings, so it neither stands out nor costs a model load.
    Cross-checks: ceil(fraction x jobs) copies of the sweep's jobs, appended and held back."""
    rng = random.Random(seed)
    out = list(jobs)
    canaries: set[str] = set()
    by_model: dict[str, list[Job]] = {}
    for j in jobs:
        by_model.setdefault(j.model, []).append(j)
    for model_jobs in by_model.values():
        candidates = _candidates(model_jobs)
        for _ in range(_n_checks(canary_fraction, len(model_jobs)) if candidates else 0):
            original = rng.choice(candidates)
            canary = _copy(original)
            same_load = [i for i, j in enumerate(out) if (j.model, j.quant, j.engine, j.config)
                         == (original.model, original.quant, original.engine, original.config)]
            out.insert(rng.randint(same_load[0], same_load[-1] + 1), canary)
            canaries.add(canary.job_id)
    crosschecks: dict[str, str] = {}
    n = _n_checks(crosscheck_fraction, len(jobs))
    for original in rng.sample(jobs, min(n, len(jobs))):
        copy = _copy(original)
        out.append(copy)
        crosschecks[copy.job_id] = original.job_id
    out = [j.model_copy(update={"index": i}) for i, j in enumerate(out)]
    return Plan(out, canaries, crosschecks)


def record_checks(session: Session, plan: Plan, tolerance: float) -> None:
    """The checks rows of a plan whose jobs lifecycle.record has just written."""
    sweep_id = plan.jobs[0].sweep_id if plan.jobs else ""
    session.flush()  # the job rows first: checks reference them
    session.add_all(CheckRow(job_id=i, sweep_id=sweep_id, kind=CANARY, tolerance=tolerance, excluded_workers=[])
                    for i in plan.canaries)
    session.add_all(CheckRow(job_id=i, sweep_id=sweep_id, kind=CROSSCHECK, origin_job_id=origin,
                             tolerance=tolerance, excluded_workers=[])
                    for i, origin in plan.crosschecks.items())


# --- comparing (pure) --------------------------------------------------------------------------


def compare(a: Result, b: Result, tolerance: float) -> list[str]:
    """Why two runs of one job disagree: their greedy output, or tok/s further apart than the
    tolerance (relative to the slower). Empty when they agree."""
    reasons = []
    if a.output_sha256 != b.output_sha256:
        reasons.append(f"greedy output differs ({a.output_sha256[:12]} on {a.worker}, "
                       f"{b.output_sha256[:12]} on {b.worker})")
    kind = kind_of_test(a.test)
    rates = [({"pp": "prefill", "tg": "decode", "pg": "prefill+decode"}[kind] + " tok/s", a.avg_ts, b.avg_ts)]
    if kind == "pg":
        rates.append(("decode tok/s", a.decode_ts, b.decode_ts))
    for label, x, y in rates:
        if x > 0 and y > 0 and max(x, y) / min(x, y) - 1 > tolerance:
            reasons.append(f"{label} {x:.1f} on {a.worker} vs {y:.1f} on {b.worker}: "
                           f"{max(x, y) / min(x, y) - 1:.0%} apart, more than {tolerance:.0%}")
    return reasons


# --- judging (called from the collector's ingest) ----------------------------------------------


def _flag(worker: WorkerRow, reason: str) -> None:
    if not worker.flagged:  # the first reason is the one an operator needs to read
        worker.flagged, worker.flag_reason = True, reason
        log.warning("worker %s flagged: %s", worker.name, reason)


def misrouted(check: CheckRow | None, worker: str) -> list[str]:
    """A cross-check run by a worker it was not sent to (another worker's queue consumed)."""
    if check is None or check.kind != CROSSCHECK:
        return []
    if check.target_worker != worker:
        return [f"cross-check job was sent to worker {check.target_worker!r}, not {worker!r}"]
    return []


def unroute(check: CheckRow) -> None:
    """Send a cross-check again through route_crosschecks (a chosen worker), never any worker."""
    check.target_worker, check.sent_at = None, None


def settle(session: Session, check: CheckRow, job: Job, result: Result, worker: WorkerRow) -> None:
    """Keep a check's Result and judge it."""
    check.worker = worker.name
    check.result = result.model_dump(mode="json")
    check.output_sha256 = result.output_sha256
    if result.status != "ok":
        check.verdict, check.reason = "void", f"its run failed: {result.error}"
    elif check.kind == CANARY:
        _judge_canary(session, check, job, result, worker)
    else:
        _judge_crosscheck(session, check, job, result, worker)


def _judge_canary(session: Session, check: CheckRow, job: Job, result: Result, worker: WorkerRow) -> None:
    check.greedy_key, check.hardware_class = greedy_key(job), worker_class(worker, result)
    if worker.trusted and not worker.flagged:
        add_reference(session, job, check.hardware_class, result.output_sha256,
                      f"trusted worker {worker.name}, job {job.job_id[:8]}")
    ref = session.get(CanaryReferenceRow, (check.greedy_key, check.hardware_class))
    if ref is None:
        check.verdict = "unjudged"
        check.reason = (f"no reference yet for this job on {check.hardware_class}: "
                        "`tokenfarm canaries pin` or a trusted worker of that class makes one")
        return
    _apply_reference(check, ref, worker)


def _apply_reference(check: CheckRow, ref: CanaryReferenceRow, worker: WorkerRow) -> None:
    check.expected_sha256 = ref.output_sha256
    if check.output_sha256 == ref.output_sha256:
        check.verdict, check.reason = "pass", f"matches the reference from {ref.source}"
        worker.n_canary_passed += 1
        return
    check.verdict = "fail"
    check.reason = (f"greedy output {check.output_sha256[:12]} differs from the reference "
                    f"{ref.output_sha256[:12]} ({ref.source}) on {ref.hardware_class}")
    worker.n_canary_failed += 1
    _flag(worker, f"failed canary job {check.job_id[:8]} ({ref.model} {ref.quant} {ref.test}): {check.reason}")


def add_reference(session: Session, job: Job, hw_class: str, output_sha: str, source: str) -> int:
    """Record the greedy output `job` must produce on `hw_class`, then judge the canaries that
    waited for it; returns how many were judged. The first reference stays: a later, different
    one is only logged, since two trusted sources disagreeing needs an operator."""
    key = greedy_key(job)
    ref = session.get(CanaryReferenceRow, (key, hw_class))
    if ref is not None:
        if ref.output_sha256 != output_sha:
            log.warning("%s disagrees with the canary reference for %s %s %s on %s (%s): keeping the reference",
                        source, job.model, job.quant, job.test, hw_class, ref.source)
        return 0
    ref = CanaryReferenceRow(greedy_key=key, hardware_class=hw_class, output_sha256=output_sha, model=job.model,
                             model_sha256=job.model_sha256 or "", quant=job.quant, engine=job.engine,
                             test=job.test, source=source[:300], created_at=utc_now())
    session.add(ref)
    waiting = session.scalars(select(CheckRow).where(
        CheckRow.kind == CANARY, CheckRow.verdict == "unjudged", CheckRow.greedy_key == key,
        CheckRow.hardware_class == hw_class)).all()
    for check in waiting:
        _apply_reference(check, ref, session.get(WorkerRow, check.worker))
    return len(waiting)


def after_stored(session: Session, job: Job, result: Result, worker: WorkerRow) -> None:
    """A measurement's Result is stored: a trusted worker's ok result becomes a canary reference.
    (Its cross-checks need nothing here: route_crosschecks finds the stored result itself, so
    ingest pays no query for the many results that have none.)"""
    if result.status == "ok" and worker.trusted and not worker.flagged:
        add_reference(session, job, worker_class(worker, result), result.output_sha256,
                      f"trusted worker {worker.name}, job {job.job_id[:8]}")


def _judge_crosscheck(session: Session, check: CheckRow, job: Job, result: Result, worker: WorkerRow) -> None:
    origin = Result.model_validate(session.get(ResultRow, check.origin_job_id).result)
    origin_worker = session.get(WorkerRow, origin.worker)
    check.expected_sha256 = origin.output_sha256
    reasons = compare(origin, result, check.tolerance)
    if check.vote_of is not None:
        _settle_vote(session, check, origin, origin_worker, result, worker, reasons)
        return
    pair = [w for w in (origin_worker, worker) if w is not None]
    if not reasons:
        check.verdict, check.reason = "agree", f"agrees with {origin.worker}"
        for w in pair:
            w.n_crosscheck_agreed += 1
        return
    check.verdict, check.reason = "disagree", "; ".join(reasons)
    for w in pair:
        w.n_crosscheck_disagreed += 1
        if w.n_crosscheck_disagreed >= CROSSCHECK_FLAG_AFTER and w.n_crosscheck_disagreed > w.n_crosscheck_agreed:
            _flag(w, f"disagreed in {w.n_crosscheck_disagreed} cross-checks, agreed in {w.n_crosscheck_agreed}; "
                     f"latest: {check.reason}")
    _open_vote(session, check, job, origin.worker, worker.name)


def _open_vote(session: Session, check: CheckRow, job: Job, *voters: str) -> None:
    """A third run of the job, on a worker of the class that is neither of the two that disagree."""
    last_index = session.scalar(select(func.max(JobRow.index)).where(JobRow.sweep_id == job.sweep_id)) or 0
    tie = _copy(job).model_copy(update={"index": last_index + 1})
    session.add(JobRow(id=tie.job_id, sweep_id=tie.sweep_id, index=tie.index, spec=tie.model_dump(mode="json"),
                       state="queued"))
    session.flush()
    session.add(CheckRow(job_id=tie.job_id, sweep_id=tie.sweep_id, kind=CROSSCHECK, origin_job_id=check.origin_job_id,
                         vote_of=check.job_id, tolerance=check.tolerance, excluded_workers=list(voters),
                         hardware_class=check.hardware_class))


def _settle_vote(session: Session, check: CheckRow, origin: Result, origin_worker: WorkerRow | None,
                 result: Result, worker: WorkerRow, reasons_vs_origin: list[str]) -> None:
    first = session.get(CheckRow, check.vote_of)
    challenger = Result.model_validate(first.result)
    reasons_vs_first = compare(challenger, result, check.tolerance)
    sides_with_origin, sides_with_first = not reasons_vs_origin, not reasons_vs_first
    check.verdict = "agree" if sides_with_origin else "disagree"
    if sides_with_origin == sides_with_first:
        check.reason = (f"vote between {origin.worker} and {challenger.worker}: no majority "
                        f"({'agrees with both' if sides_with_origin else 'agrees with neither'})")
        return
    (winner, loser), lost_on = (((origin, challenger), reasons_vs_first) if sides_with_origin
                                else ((challenger, origin), reasons_vs_origin))
    check.reason = f"vote: sides with {winner.worker}; {loser.worker} loses 2 of 3 ({'; '.join(lost_on)})"
    worker.n_crosscheck_agreed += 1
    loser_row = session.get(WorkerRow, loser.worker)
    # Other tokens than two machines of its class computed is proof; a speed that differs may be
    # a busy box, and counts only through the repeated-disagreement rule.
    if loser_row is not None and loser.output_sha256 != winner.output_sha256:
        _flag(loser_row, f"lost a 2-of-3 cross-check vote on job {origin.job_id[:8]} to {winner.worker} and "
                         f"{worker.name}: {'; '.join(lost_on)}")


# --- routing cross-checks ----------------------------------------------------------------------


def _live_workers(session: Session, dead_after_s: float) -> list[WorkerRow]:
    cutoff = utc_now() - timedelta(seconds=dead_after_s)
    return [w for w in session.scalars(select(WorkerRow).where(WorkerRow.flagged.is_(False),
                                                                 WorkerRow.last_seen.is_not(None)))
            if as_utc(w.last_seen) >= cutoff]


def _skip(check: CheckRow, row: JobRow, reason: str) -> None:
    check.verdict, check.reason = "skipped", reason
    # Done rather than failed: nothing went wrong with the sweep, there was nobody to ask.
    row.state, row.error = "done", f"cross-check skipped: {reason}"


def route_crosschecks(session: Session, dead_after_s: float,
                      rng: random.Random | None = None) -> list[tuple[JobRow, str]]:
    """Cross-checks ready to go, each with the live, unflagged worker of the original's class it
    goes to (marked sent here; the caller leases and sends them before committing). Skips those
    with nobody to run them or nothing to compare with; re-routes those whose target went silent."""
    rng = rng or random.Random()
    live = _live_workers(session, dead_after_s)
    live_names = {w.name for w in live}
    due: list[tuple[JobRow, str]] = []
    rows = session.execute(select(CheckRow, JobRow).join(JobRow, JobRow.id == CheckRow.job_id).where(
        CheckRow.kind == CROSSCHECK, CheckRow.verdict == "pending", JobRow.state == "queued")).all()
    for check, row in rows:
        if check.sent_at is not None and check.target_worker in live_names:
            continue  # on its way
        origin = session.get(JobRow, check.origin_job_id)
        if origin.state in ("queued", "sent", "running"):
            continue
        stored = session.get(ResultRow, origin.id) if origin.state == "done" else None
        if stored is None:
            _skip(check, row, f"the original job {origin.id[:8]} has no result to compare with ({origin.error or origin.state})")
            continue
        if not check.hardware_class:
            # The original's worker and its class, fixed when first routed.
            origin_worker = session.get(WorkerRow, stored.worker)
            check.hardware_class = (worker_class(origin_worker) if origin_worker is not None
                                    else hardware_class(Result.model_validate(stored.result).hardware))
            check.excluded_workers = [stored.worker]
        # Only workers that announced their own queue: one that does not listen there would
        # leave the cross-check waiting forever.
        # Same class, yet one box may offer less memory than another (TOKENFARM_MAX_*_BYTES).
        job = Job.model_validate(row.spec)
        candidates = [w for w in live if w.name not in (check.excluded_workers or [])
                      and worker_class(w) == check.hardware_class
                      and worker_queue(w.name) in (w.capabilities or {}).get("queues", [])
                      and _can_fit(w, job)]
        if not candidates:
            _skip(check, row, f"no {'third' if check.vote_of else 'second'} live worker of class {check.hardware_class}")
            continue
        target = rng.choice(candidates).name
        check.target_worker, check.sent_at = target, utc_now()
        due.append((row, target))
    return due


def _can_fit(worker: WorkerRow, job: Job) -> bool:
    from farm.memory import fits

    try:
        caps = Capabilities.model_validate(worker.capabilities or {})
    except ValidationError:
        return False
    return fits(caps, job)


def without_crosschecks(session: Session, jobs: list[Job]) -> list[Job]:
    """`jobs` less the cross-checks, which only route_crosschecks leases (to a chosen worker)."""
    if not jobs:
        return jobs
    held = set(session.scalars(select(CheckRow.job_id).where(
        CheckRow.kind == CROSSCHECK, CheckRow.job_id.in_([j.job_id for j in jobs]))))
    return [j for j in jobs if j.job_id not in held]


def unroute_crosschecks(session: Session, job_ids: list[str]) -> None:
    """The cross-checks among these freed jobs are routed anew (a chosen worker, not any)."""
    if not job_ids:
        return
    for check in session.scalars(select(CheckRow).where(CheckRow.kind == CROSSCHECK, CheckRow.job_id.in_(job_ids))):
        unroute(check)


# --- what the CLI prints -----------------------------------------------------------------------


def verdict_counts(session: Session, sweep_id: str | None = None) -> dict[tuple[str, str], int]:
    """(kind, verdict) -> number of checks, for one sweep or all."""
    q = select(CheckRow.kind, CheckRow.verdict, func.count()).group_by(CheckRow.kind, CheckRow.verdict)
    if sweep_id:
        q = q.where(CheckRow.sweep_id == sweep_id)
    return {(k, v): n for k, v, n in session.execute(q)}


def describe(counts: dict[tuple[str, str], int]) -> str:
    """`canaries 2 pass, 1 FAIL; cross-checks 3 agree` from verdict_counts."""
    parts = []
    for kind, label in ((CANARY, "canaries"), (CROSSCHECK, "cross-checks")):
        found = {v: n for (k, v), n in counts.items() if k == kind}
        if found:
            parts.append(f"{label} " + ", ".join(f"{n} {v.upper() if v in ('fail', 'disagree') else v}"
                                                   for v, n in sorted(found.items())))
    return "; ".join(parts)


def checks_of(session: Session, job_ids: Iterable[str]) -> dict[str, CheckRow]:
    ids = list(job_ids)
    return {c.job_id: c for c in session.scalars(select(CheckRow).where(CheckRow.job_id.in_(ids)))} if ids else {}
