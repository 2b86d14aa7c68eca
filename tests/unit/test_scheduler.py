"""The scheduler: which worker each queued job is leased to (pure), and the database step that
grants the leases, over a real (embedded) SQLite database after Alembic's upgrade."""

import itertools
from datetime import timedelta

from sqlalchemy import select

from farm.broker import signed_body, worker_queue
from farm.contract import Capabilities, EngineConfig, Envelope, Hardware, Job, utc_now
from farm.memory import GIB, class_gb, fits
from orchestrator import checks
from orchestrator.collector import ingest
from orchestrator.db import JobRow, WorkerRow, session_scope
from orchestrator.dispatch import unfit_jobs
from orchestrator.lifecycle import record
from orchestrator.planning import plan
from orchestrator.scheduler import WINDOW, Slot, assign, schedule
from orchestrator.sweep import SweepSpec
from orchestrator.workers import add_worker


def job(i: int = 0, **kw) -> Job:
    base = dict(job_id=f"j{i}", sweep_id="s", index=i, model="smollm2-135m", quant="Q4_1", kind="pp", n_prompt=512)
    return Job(**{**base, **kw})


def caps(ram_gb: float = 0, vram_gb: float = 0, engines=("llamacpp",), models=()) -> Capabilities:
    return Capabilities(engines=list(engines), offered_ram_bytes=int(ram_gb * GIB),
                        offered_vram_bytes=int(vram_gb * GIB), models=list(models))


def test_a_20_gb_vram_job_goes_only_to_a_worker_that_fits_it():
    big = job(need_bytes=20 * GIB, config=EngineConfig(n_gpu_layers=-1))
    small = job(1, need_bytes=GIB // 2)
    workers = [Slot("cpu", caps(ram_gb=64)), Slot("gpu8", caps(ram_gb=16, vram_gb=8)),
               Slot("gpu24", caps(ram_gb=16, vram_gb=23.99))]
    chosen = dict((j.job_id, w) for j, w in assign([(big, None), (small, None)], workers))
    assert chosen["j0"] == "gpu24"
    assert chosen["j1"] == "cpu"  # the least loaded worker that fits takes the small one
    # With the 24 GB box away, nobody takes the big job: it stays queued for one that joins.
    assert assign([(big, None)], workers[:2]) == []


def test_the_submit_check_agrees_with_what_the_scheduler_would_assign():
    """A job accepted at submit is one some worker would be leased; one refused, none would."""
    workers = [caps(r, v, e) for r, v, e in itertools.product(
        (0, 0.9, 1.5, 15.5, 64, 300), (0, 5.9, 23.99, 80), (("llamacpp",), ("torch",), ("llamacpp", "torch")))]
    jobs = [job(need_bytes=int(gb * GIB), engine=engine, config=EngineConfig(n_gpu_layers=ngl))
            for gb in (0.3, 0.99, 1.2, 5.5, 7.9, 23, 47, 79, 100, 600)
            for engine in ("llamacpp", "torch") for ngl in (0, -1)]
    for w, j in itertools.product(workers, jobs):
        leased = assign([(j, None)], [Slot("w", w)]) != []
        assert leased == fits(w, j) == (not unfit_jobs([j], {"w": w})), (w, j)
        assert not leased or class_gb(j.need_bytes) is not None


def test_model_affinity_keeps_runs_of_one_model_on_one_worker_within_the_window():
    a = [job(i, model="smollm2-135m", n_prompt=16 + i) for i in range(4)]
    b = [job(4 + i, model="gemma3-270m", n_prompt=16 + i) for i in range(4)]
    workers = [Slot("w1", caps(ram_gb=16)), Slot("w2", caps(ram_gb=16))]
    chosen = assign([(j, None) for j in a + b], workers)
    # Model-major order, two slots each: w1 takes the first two, w2 the next two of the same model.
    assert [(j.job_id, w) for j, w in chosen] == [("j0", "w1"), ("j1", "w1"), ("j2", "w2"), ("j3", "w2")]
    assert all(w.n_outstanding == WINDOW for w in workers)
    # w1 finished one: its next job is the same model's, not the one a fresh load would need.
    workers[0].n_outstanding -= 1
    workers[1].last_key = ("gemma3-270m", "Q4_1", "llamacpp", EngineConfig())  # w2 last loaded gemma
    workers[1].n_outstanding = 0
    (first, w), (second, w_) = assign([(b[0], None), (a[0].model_copy(update={"job_id": "late"}), None)], workers)
    assert (first.job_id, w) == ("j4", "w2") and (second.job_id, w_) == ("late", "w1")


def test_a_worker_that_holds_the_file_is_preferred_and_a_job_given_back_goes_elsewhere():
    sha = "a" * 64
    j = job(model_sha256=sha)
    workers = [Slot("w1", caps(ram_gb=16)), Slot("w2", caps(ram_gb=16, models=[sha]))]
    assert assign([(j, None)], workers)[0][1] == "w2"
    workers = [Slot("w1", caps(ram_gb=16)), Slot("w2", caps(ram_gb=16, models=[sha]))]
    assert assign([(j, "w2")], workers)[0][1] == "w1"  # w2 hung on it: another worker fits
    assert assign([(j, "w2")], [Slot("w2", caps(ram_gb=16))])[0][1] == "w2"  # nobody else: w2 again


def _hello(engine, name, token, queues=None, ram_gb=16):
    env = Envelope(kind="hello", worker=name, capabilities=Capabilities(
        engines=["llamacpp"], hardware=Hardware(cpu="c", ram_bytes=ram_gb * GIB),
        queues=[worker_queue(name)] if queues is None else queues))
    with session_scope(engine) as s:
        assert ingest(s, signed_body(env, token)).action == "hello"


def test_schedule_leases_to_live_listening_unflagged_workers_within_the_window(engine):
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_prompt=[16, 24, 32, 48, 64], n_gen=[4], repetitions=1)
    jobs = plan(spec)
    pl = checks.plan_checks(jobs, 0.0, 0.2, seed="s")  # one cross-check: never the scheduler's
    with session_scope(engine) as s:
        tokens = {n: add_worker(s, n) for n in ("w1", "deaf", "flagged", "silent")}
        record(s, spec, pl.jobs)
        checks.record_checks(s, pl, 0.25)
    _hello(engine, "w1", tokens["w1"])
    _hello(engine, "deaf", tokens["deaf"], queues=[])  # does not listen on its own queue
    _hello(engine, "flagged", tokens["flagged"])
    with session_scope(engine) as s:
        s.get(WorkerRow, "flagged").flagged = True
        s.get(WorkerRow, "silent").capabilities = Capabilities(engines=["llamacpp"], queues=[worker_queue("silent")]).model_dump()
        # The first job waits out a retry's pause.
        s.get(JobRow, jobs[0].job_id).not_before = utc_now() + timedelta(hours=1)
    with session_scope(engine) as s:
        leased = schedule(s, dead_after_s=60)
    assert [(j.job_id, w) for j, w in leased] == [(jobs[1].job_id, "w1"), (jobs[2].job_id, "w1")]
    assert all(j.lease_id and j.attempt == 1 for j, _ in leased)
    with session_scope(engine) as s:
        rows = {r.id: r for r in s.scalars(select(JobRow))}
        assert {r.state for i, r in rows.items() if i in {j.job_id for j, _ in leased}} == {"sent"}
        assert rows[jobs[1].job_id].lease_id == leased[0][0].lease_id
        assert sum(r.state == "queued" for r in rows.values()) == len(pl.jobs) - WINDOW
        assert schedule(s, dead_after_s=60) == []  # w1's window is full
    with session_scope(engine) as s:
        s.get(JobRow, jobs[1].job_id).state = "done"  # one finished: one slot free
    with session_scope(engine) as s:
        ((again, w),) = schedule(s, dead_after_s=60)
    assert (again.job_id, w) == (jobs[3].job_id, "w1")
