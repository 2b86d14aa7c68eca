"""Following a submitted sweep to its end: collect its results, keep recovery running, and say
when it is finished (and how), as data.

Owns the completion rule (every job done or failed, nothing queued or running: a cross-check
vote adds a job mid-sweep) and the time limit. Deliberately does not know how progress is shown:
the caller passes `on_progress` and renders what `follow` returns (the CLI draws a bar).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy.engine import Engine
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import OperationalError

from farm.settings import Settings
from orchestrator import dispatch, lifecycle
from orchestrator.checks import describe, verdict_counts
from orchestrator.brokerusers import results_relay
from orchestrator.collector import Collector, collect
from orchestrator.db import session_scope
from orchestrator.store import failed_jobs


@dataclass
class SweepProgress:
    """One look at the sweep; `counts` is None while a service is unavailable (`outage` says which)."""

    counts: dict[str, int] | None
    n_finished: int
    outage: str = ""


@dataclass
class FailedJob:
    index: int
    model: str
    quant: str
    kind: str
    error: str | None


@dataclass
class Followed:
    """How following a sweep ended: timed out (results still arrive later), or finished."""

    n_jobs: int
    n_finished: int
    timed_out: bool
    failed: list[FailedJob] = field(default_factory=list)
    verdicts: str = ""  # the canary and cross-check verdicts in one line; empty when there are none


def is_finished(counts: dict[str, int], n_jobs: int) -> bool:
    n_finished = counts.get("done", 0) + counts.get("failed", 0)
    # A cross-check vote adds a job mid-sweep: finished means nothing left to run.
    return n_finished >= n_jobs and not any(counts.get(s) for s in ("queued", "sent", "running"))


def follow(settings: Settings, engine: Engine, celery, sweep_id: str, n_jobs: int, timeout_s: float | None,
           on_progress: Callable[[SweepProgress], None] = lambda _: None) -> Followed:
    """Collect results until the sweep is finished or `timeout_s` passed; runs the orchestrator's
    recovery (dispatch.Upkeep) meanwhile, and rides out database and broker outages."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    state = {"n_finished": 0, "timed_out": False}
    upkeep = dispatch.Upkeep(settings)

    def done() -> bool:
        try:
            # Queued jobs leased to workers with room; jobs of workers that died mid-job, or whose
            # message the broker lost, freed or sent again.
            upkeep.maybe_run(engine, celery)
            with session_scope(engine) as session:
                counts = lifecycle.sweep_progress(session, sweep_id)
        except (OperationalError, OSError, KombuOperationalError, *celery.connection_for_write().connection_errors) as exc:
            on_progress(SweepProgress(None, state["n_finished"], type(exc).__name__))
            counts = None
        if counts is not None:
            state["n_finished"] = counts.get("done", 0) + counts.get("failed", 0)
            on_progress(SweepProgress(counts, state["n_finished"]))
            if is_finished(counts, n_jobs):
                return True
        if deadline and time.monotonic() > deadline:
            state["timed_out"] = True
            return True
        return False

    def lease_now() -> None:
        try:
            upkeep.maybe_run(engine, celery, now=True)
        except (OperationalError, OSError, KombuOperationalError, *celery.connection_for_write().connection_errors):
            pass  # the next tick's pass retries

    collect(celery, Collector(engine, max_attempts=settings.max_attempts, after_batch=lease_now,
                              relay=results_relay(settings, engine)), done)
    if state["timed_out"]:
        return Followed(n_jobs, state["n_finished"], timed_out=True)
    with session_scope(engine) as session:
        failed = [FailedJob(row.index, row.spec["model"], row.spec["quant"], row.spec["kind"], row.error)
                  for row in failed_jobs(session, sweep_id)]
        verdicts = describe(verdict_counts(session, sweep_id))
    return Followed(n_jobs, state["n_finished"], False, failed, verdicts or "")
