"""Canaries and cross-checks: planning, judging through the collector's ingest, routing, voting.

Real (embedded) SQLite after Alembic's upgrade and signed envelopes, as the collector sees them.
"""

from __future__ import annotations

import random

import pytest
from sqlalchemy import func, select

from farm.broker import signed_body, worker_queue
from farm.contract import Capabilities, Envelope, Hardware, Job, Result
from farm.identity import output_sha256
from farm.stats import summarize
from orchestrator import checks, lifecycle
from orchestrator.collector import ingest
from orchestrator.db import CheckRow, JobRow, ResultRow, WorkerRow, session_scope
from orchestrator.lifecycle import record, requeue_lost
from orchestrator.planning import plan as plan_sweep
from orchestrator.store import load_results
from orchestrator.sweep import SweepSpec
from orchestrator.workers import add_worker, flagged_names, list_workers

CPU = Hardware(cpu="Test CPU 9000", n_cpu_cores=2)
OTHER_CPU = Hardware(cpu="Another CPU")
TRUE_TOKENS = output_sha256([[11, 12, 13, 14]])
FORGED_TOKENS = output_sha256([[11, 12, 13, 99]])


@pytest.fixture
def tokens(engine):
    with session_scope(engine) as s:
        tokens = {name: add_worker(s, name) for name in ("w1", "w2", "w3", "odd", "old", "small")}
    for name in tokens:
        hw = OTHER_CPU if name == "odd" else CPU
        queues = [] if name == "old" else [worker_queue(name)]
        # "small": the same CPU, but its owner offers too little RAM for any of these jobs.
        offered = (64 << 20) if name == "small" else (16 << 30)
        hello = Envelope(kind="hello", worker=name, capabilities=Capabilities(
            engines=["llamacpp"], hardware=hw, queues=queues, offered_ram_bytes=offered))
        with session_scope(engine) as s:
            assert ingest(s, signed_body(hello, tokens[name])).action == "hello"
    return tokens


def spec(**kw) -> SweepSpec:
    return SweepSpec(**{**dict(name="t", models=["smollm2-135m"], quants=["Q4_1", "Q8_0"], n_prompt=[16],
                               n_gen=[4, 8], repetitions=2), **kw})


def submit(engine, sweep: SweepSpec, canary: float, cross: float, tolerance: float = 0.25) -> checks.Plan:
    jobs = plan_sweep(sweep)
    plan = checks.plan_checks(jobs, canary, cross, seed=jobs[0].sweep_id)
    with session_scope(engine) as s:
        record(s, sweep, plan.jobs)
        checks.record_checks(s, plan, tolerance)
    return plan


def result_for(job, worker, output=TRUE_TOKENS, rate=100.0) -> Result:
    samples = [int(job.n_tokens * 1e9 / rate)] * job.repetitions
    avg, std = summarize(job.n_tokens, samples)
    return Result(job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker=worker, model=job.model,
                  model_sha256="c" * 64, source_sha256=job.model_sha256, quant=job.quant, test=job.test,
                  n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth, repetitions=job.repetitions,
                  samples_ns=samples, avg_ts=avg, stddev_ts=std, output_sha256=output, decode_ts=avg, hardware=CPU)


def send(engine, tokens, job, worker, leased=True, **kw):
    """The worker runs the job: leased to it first (as the scheduler or route_crosschecks would,
    unless `leased` is False: a worker answering a job it was never sent), started, result."""
    job = job if isinstance(job, Job) else Job.model_validate(job.spec)
    lease = {}
    if leased:
        with session_scope(engine) as s:
            row = s.get(JobRow, job.job_id)
            msg = lifecycle.leased_job(row) if row.worker == worker and row.lease_id else lifecycle.lease(row, worker)
            lease = {"lease_id": msg.lease_id, "attempt": msg.attempt}
    with session_scope(engine) as s:
        ingest(s, signed_body(Envelope(kind="started", job_id=job.job_id, worker=worker, **lease), tokens[worker]))
    body = signed_body(Envelope(kind="result", job_id=job.job_id, worker=worker,
                                result=result_for(job, worker, **kw), **lease), tokens[worker])
    with session_scope(engine) as s:
        return ingest(s, body)


def check_row(engine, job_id) -> CheckRow:
    with session_scope(engine) as s:
        return s.get(CheckRow, job_id)


def worker_row(engine, name) -> WorkerRow:
    with session_scope(engine) as s:
        return s.get(WorkerRow, name)


def test_a_plan_hides_canaries_among_the_jobs_of_their_model_and_holds_cross_checks():
    jobs = plan_sweep(spec(models=["smollm2-135m", "gemma3-270m"], quants=None))
    plan = checks.plan_checks(jobs, 0.05, 0.05, seed="s")
    assert len(plan.canaries) == 2  # at least one per model
    assert len(plan.crosschecks) == 1  # at least one per sweep
    assert [j.index for j in plan.jobs] == list(range(len(jobs) + 3))
    assert {j.job_id for j in plan.to_send} == {j.job_id for j in plan.jobs} - set(plan.crosschecks)
    originals = {j.job_id: j for j in jobs}
    for i, job in enumerate(plan.jobs):
        if job.job_id not in plan.canaries:
            continue
        twin = next(o for o in jobs if checks.greedy_key(o) == checks.greedy_key(job))
        # A copy of one of its model's decode jobs: the same message but for id and index.
        assert job.kind == "tg" and job.technique == "baseline"
        assert job.model_dump(exclude={"job_id", "index"}) == twin.model_dump(exclude={"job_id", "index"})
        # Among jobs that load the same model file: no extra model load, nothing out of place.
        neighbours = [plan.jobs[k] for k in (i - 1, i + 1) if 0 <= k < len(plan.jobs)]
        assert any((n.model, n.quant) == (job.model, job.quant) for n in neighbours)
    for copy_id, origin_id in plan.crosschecks.items():
        copy = next(j for j in plan.jobs if j.job_id == copy_id)
        assert copy.model_dump(exclude={"job_id", "index"}) == originals[origin_id].model_dump(exclude={"job_id", "index"})
    assert checks.plan_checks(jobs, 0.0, 0.0, seed="s").jobs == [j.model_copy(update={"index": j.index}) for j in jobs]


def test_the_greedy_key_ignores_what_cannot_change_the_tokens():
    job = plan_sweep(spec())[1]
    key = checks.greedy_key(job)
    same = [job.model_copy(update={"repetitions": 9, "n_warmup": 0, "job_id": "x", "index": 7}),
            job.model_copy(update={"config": job.config.model_copy(update={"n_threads": 3})})]
    assert all(checks.greedy_key(j) == key for j in same)
    other = [job.model_copy(update={"quant": "Q8_0"}), job.model_copy(update={"n_gen": 5}),
             job.model_copy(update={"config": job.config.model_copy(update={"flash_attn": True})})]
    assert all(checks.greedy_key(j) != key for j in other)


def test_hardware_classes():
    assert checks.hardware_class(CPU) == "CPU Test CPU 9000"
    assert checks.hardware_class(Hardware(gpu="NVIDIA RTX 4090", vram_bytes=24 * 2**30, cpu="x")) == "GPU NVIDIA RTX 4090 24 GiB"


def test_compare_runs():
    job = plan_sweep(spec())[1]
    a = result_for(job, "w1")
    assert checks.compare(a, result_for(job, "w2", rate=110.0), 0.25) == []
    slow = checks.compare(a, result_for(job, "w2", rate=50.0), 0.25)
    assert len(slow) == 1 and "decode tok/s" in slow[0] and "100% apart" in slow[0]
    (other,) = checks.compare(a, result_for(job, "w2", output=FORGED_TOKENS), 0.25)
    assert "greedy output differs" in other


def test_a_canary_that_differs_from_its_reference_flags_the_worker_and_hides_its_results(engine, tokens):
    plan = submit(engine, spec(), canary=0.1, cross=0.0)
    (canary_id,) = plan.canaries
    canary = next(j for j in plan.jobs if j.job_id == canary_id)
    with session_scope(engine) as s:
        checks.add_reference(s, canary, "CPU Test CPU 9000", TRUE_TOKENS, "pin on test")
    for job in plan.jobs:
        if job.job_id != canary_id:
            assert send(engine, tokens, job, "w1", output=FORGED_TOKENS).action == "stored"
    assert send(engine, tokens, canary, "w1", output=FORGED_TOKENS).action == "stored"
    c = check_row(engine, canary_id)
    assert c.verdict == "fail" and c.expected_sha256 == TRUE_TOKENS and c.output_sha256 == FORGED_TOKENS
    w = worker_row(engine, "w1")
    assert w.flagged and w.n_canary_failed == 1 and "failed canary" in w.flag_reason
    with session_scope(engine) as s:
        # The canary's result is the check's, not a measurement; and w1's measurements no longer rank.
        assert s.get(ResultRow, canary_id) is None and s.get(JobRow, canary_id).state == "done"
        assert s.scalar(select(func.count()).select_from(ResultRow)) == len(plan.jobs) - 1
        assert load_results(s, exclude_workers=flagged_names(s)) == []
        view = {v.name: v for v in list_workers(s)}["w1"]
    assert view.flagged and view.n_canary_failed == 1


def test_a_canary_without_a_reference_waits_and_is_judged_when_one_is_pinned(engine, tokens):
    plan = submit(engine, spec(quants=["Q4_1"], n_prompt=[], n_gen=[4]), canary=1.0, cross=0.0)
    (canary_id,) = plan.canaries
    canary = next(j for j in plan.jobs if j.job_id == canary_id)
    assert send(engine, tokens, canary, "w2").action == "stored"
    assert check_row(engine, canary_id).verdict == "unjudged"
    # A reference for another hardware class judges nothing.
    with session_scope(engine) as s:
        assert checks.add_reference(s, canary, "CPU Another CPU", FORGED_TOKENS, "pin elsewhere") == 0
        assert checks.add_reference(s, canary, "CPU Test CPU 9000", TRUE_TOKENS, "pin on test") == 1
    assert check_row(engine, canary_id).verdict == "pass"
    assert worker_row(engine, "w2").n_canary_passed == 1 and not worker_row(engine, "w2").flagged


def test_a_trusted_workers_results_become_references(engine, tokens):
    with session_scope(engine) as s:
        s.get(WorkerRow, "w3").trusted = True
    plan = submit(engine, spec(quants=["Q4_1"], n_prompt=[], n_gen=[4]), canary=1.0, cross=0.0)
    (canary_id,) = plan.canaries
    (original,) = [j for j in plan.jobs if j.job_id != canary_id]
    canary = next(j for j in plan.jobs if j.job_id == canary_id)
    assert send(engine, tokens, original, "w3").action == "stored"
    assert send(engine, tokens, canary, "w1", output=FORGED_TOKENS).action == "stored"
    c = check_row(engine, canary_id)
    assert c.verdict == "fail" and "trusted worker w3" in c.reason
    assert worker_row(engine, "w1").flagged and not worker_row(engine, "w3").flagged


def _crosscheck(engine, tokens, origin_worker="w1", tolerance=0.25):
    plan = submit(engine, spec(quants=["Q4_1"], n_prompt=[], n_gen=[4]), canary=0.0, cross=1.0, tolerance=tolerance)
    (copy_id, origin_id), = plan.crosschecks.items()
    origin = next(j for j in plan.jobs if j.job_id == origin_id)
    copy = next(j for j in plan.jobs if j.job_id == copy_id)
    with session_scope(engine) as s:
        assert checks.route_crosschecks(s, 60) == []  # held until the original's result is in
        lifecycle.lease(s.get(JobRow, origin.job_id), origin_worker)
    with session_scope(engine) as s:
        assert checks.route_crosschecks(s, 60) == []  # sent, not yet run: still held, not skipped
        assert s.get(CheckRow, copy.job_id).verdict == "pending"
    assert send(engine, tokens, origin, origin_worker).action == "stored"
    return origin, copy


def test_a_cross_check_goes_to_a_second_worker_of_the_class_and_agrees(engine, tokens):
    origin, copy = _crosscheck(engine, tokens)
    targets = set()
    for seed in range(8):
        with session_scope(engine) as s:
            ((_, target),) = checks.route_crosschecks(s, 60, random.Random(seed))
            targets.add(target)
            s.rollback()
    # Never the original's worker, another class, a worker not listening on its own queue, or
    # one that cannot fit the job.
    assert targets == {"w2", "w3"}
    with session_scope(engine) as s:
        ((row, target),) = checks.route_crosschecks(s, 60, random.Random(0))
    assert row.id == copy.job_id
    thief = "w3" if target == "w2" else "w2"
    stolen = send(engine, tokens, copy, thief, leased=False)
    assert stolen.action == "rejected" and "no lease" in stolen.reason
    with session_scope(engine) as s:  # the refused run left the job to its target
        assert s.get(JobRow, copy.job_id).state == "queued"
    assert send(engine, tokens, copy, target, rate=120.0).action == "stored"
    c = check_row(engine, copy.job_id)
    assert c.verdict == "agree" and c.worker == target
    assert worker_row(engine, "w1").n_crosscheck_agreed == 1 and worker_row(engine, target).n_crosscheck_agreed == 1
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(ResultRow)) == 1  # the leaderboard counts the original only
        assert checks.describe(checks.verdict_counts(s, origin.sweep_id)) == "cross-checks 1 agree"


def test_a_disagreement_is_settled_by_a_third_worker_and_the_loser_is_flagged(engine, tokens):
    origin, copy = _crosscheck(engine, tokens)
    with session_scope(engine) as s:
        s.get(WorkerRow, "w3").last_seen = None  # w3 away: the first check goes to w2
        ((_, target),) = checks.route_crosschecks(s, 60)
    assert target == "w2"
    assert send(engine, tokens, copy, "w2", output=FORGED_TOKENS).action == "stored"
    assert check_row(engine, copy.job_id).verdict == "disagree"
    with session_scope(engine) as s:
        s.get(WorkerRow, "w3").last_seen = s.get(WorkerRow, "w1").last_seen
        ((vote, target),) = checks.route_crosschecks(s, 60)
    assert target == "w3" and vote.id not in (origin.job_id, copy.job_id)
    assert send(engine, tokens, vote, "w3").action == "stored"
    v = check_row(engine, vote.id)
    assert v.verdict == "agree" and "w2 loses 2 of 3" in v.reason
    assert worker_row(engine, "w2").flagged and "2-of-3" in worker_row(engine, "w2").flag_reason
    assert not worker_row(engine, "w1").flagged and not worker_row(engine, "w3").flagged


def test_a_cross_check_with_nobody_to_run_it_is_skipped_not_failed(engine, tokens):
    with session_scope(engine) as s:
        for name in ("w2", "w3"):
            s.get(WorkerRow, name).last_seen = None
    origin, copy = _crosscheck(engine, tokens)
    with session_scope(engine) as s:
        assert checks.route_crosschecks(s, 60) == []
    c = check_row(engine, copy.job_id)
    assert c.verdict == "skipped" and c.reason == "no second live worker of class CPU Test CPU 9000"
    with session_scope(engine) as s:
        assert s.get(JobRow, copy.job_id).state == "done"


def test_a_lost_cross_check_is_routed_again_not_leased_to_any_worker(engine, tokens):
    origin, copy = _crosscheck(engine, tokens)
    with session_scope(engine) as s:
        ((row, target),) = checks.route_crosschecks(s, 60, random.Random(1))
        job = lifecycle.lease(row, target)
    with session_scope(engine) as s:
        ingest(s, signed_body(Envelope(kind="started", job_id=copy.job_id, worker=target, lease_id=job.lease_id,
                                       attempt=job.attempt), tokens[target]))
        assert s.get(JobRow, copy.job_id).state == "running"
    with session_scope(engine) as s:
        s.get(WorkerRow, target).last_seen = None  # the target died mid-job
    with session_scope(engine) as s:
        assert requeue_lost(s, 60, 3) == 1
        assert s.get(JobRow, copy.job_id).state == "queued"
        assert s.get(CheckRow, copy.job_id).target_worker is None
    with session_scope(engine) as s:
        ((row, again),) = checks.route_crosschecks(s, 60)
    assert row.id == copy.job_id and again not in (target, "w1")


def test_losing_a_vote_on_speed_alone_is_not_proof(engine, tokens):
    origin, copy = _crosscheck(engine, tokens)
    with session_scope(engine) as s:
        s.get(WorkerRow, "w3").last_seen = None
        checks.route_crosschecks(s, 60)
    assert send(engine, tokens, copy, "w2", rate=20.0).action == "stored"  # same tokens, 5x slower
    assert "decode tok/s" in check_row(engine, copy.job_id).reason
    with session_scope(engine) as s:
        s.get(WorkerRow, "w3").last_seen = s.get(WorkerRow, "w1").last_seen
        ((vote, _),) = checks.route_crosschecks(s, 60)
    assert send(engine, tokens, vote, "w3").action == "stored"
    assert "w2 loses 2 of 3" in check_row(engine, vote.id).reason
    w2 = worker_row(engine, "w2")
    assert not w2.flagged and w2.n_crosscheck_disagreed == 1
