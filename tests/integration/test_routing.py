"""Scheduling by memory class, refusal at submit, model affinity and out-of-memory jobs, with real
PostgreSQL, Redis, worker processes and llama.cpp.

Workers here share one machine; each is made a different memory class by capping what it offers
(TOKENFARM_MAX_RAM_BYTES), as an owner sharing a box would.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, func, select

from orchestrator.db import JobRow, ResultRow, SweepRow, WorkerRow, session_scope
from tests.integration.conftest import (
    MODELS_DIR,
    at_head,
    service_env,
    tokenfarm,
    wait_until,
    worker_process,
)
from worker.models import fetch

pytestmark = pytest.mark.integration

GIB = 1 << 30


def farm_env(tmp_path: Path, pg_url: str, redis_url: str) -> dict[str, str]:
    env = service_env(tmp_path / "data", database_url=pg_url, broker_url=redis_url)
    env.update(TOKENFARM_HEARTBEAT_S="1")
    assert tokenfarm(env, "db", "upgrade").returncode == 0
    return env


def capped(env: dict[str, str], ram_bytes: int) -> dict[str, str]:
    return {**env, "TOKENFARM_MAX_RAM_BYTES": str(ram_bytes)}


def ready(log: Path, timeout_s: float = 120) -> None:
    """Wait until the worker consumes; its hello went out before that."""
    assert wait_until(lambda: log.exists() and " ready." in log.read_text(errors="replace"), timeout_s), \
        log.read_text(errors="replace")[-3000:] if log.exists() else "no worker log"


def collect_hellos(env: dict[str, str]) -> None:
    """Refusal at submit reads the registry from the database; submit never reads the results
    queue, so what the workers announced is stored first, as a box without a collector would."""
    proc = tokenfarm(env, "collector", "--once")
    assert proc.returncode == 0 and "hello" in proc.stdout, proc.stdout + proc.stderr


def sweep_file(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n{body}")
    return path


def results(url: str) -> list[ResultRow]:
    engine = create_engine(url)
    with session_scope(engine) as s:
        rows = list(s.scalars(select(ResultRow).order_by(ResultRow.created_at)))
        for r in rows:
            s.expunge(r)
    engine.dispose()
    return rows


def jobs(url: str) -> dict[int, JobRow]:
    engine = create_engine(url)
    with session_scope(engine) as s:
        rows = {j.index: j for j in s.scalars(select(JobRow))}
        for j in rows.values():
            s.expunge(j)
    engine.dispose()
    return rows


def test_a_job_too_big_for_every_worker_is_refused_at_submit_and_nothing_is_recorded(tmp_path, pg_url, redis_url, smollm2):
    env = farm_env(tmp_path, pg_url, redis_url)
    log = tmp_path / "tiny.log"
    # F32 at a 16k context needs about 1.6 GiB of RAM; the only worker offers 1 GiB.
    big = sweep_file(tmp_path, "big", "models: [{name: smollm2-135m, quants: [Q4_1, F32]}]\n"
                     "n_prompt: [16]\nn_gen: []\nn_depth: [16384]\nrepetitions: 1\n")
    on_gpu = sweep_file(tmp_path, "gpu", "models: [smollm2-135m]\nn_prompt: [16]\nn_gen: []\nn_gpu_layers: [-1]\n")
    with worker_process(capped(env, GIB), "tiny", log):
        ready(log)
        collect_hellos(env)
        refused = tokenfarm(env, "sweep", "submit", str(big))
        refused_gpu = tokenfarm(env, "sweep", "submit", str(on_gpu))
    assert refused.returncode != 0
    out = refused.stderr
    assert "smollm2-135m F32 pp16 @ d16384" in out and "GiB of RAM" in out, out
    assert "tiny, offers 1.00 GiB" in out and "nothing was recorded" in out and "--allow-unfit" in out
    assert refused_gpu.returncode != 0 and "no worker with llamacpp has a GPU" in refused_gpu.stderr
    engine = create_engine(pg_url)
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(SweepRow)) == 0
        assert s.scalar(select(func.count()).select_from(JobRow)) == 0
        # The refusal came from what the worker announced, stored by `collector --once`.
        caps = s.get(WorkerRow, "tiny").capabilities
        assert caps["offered_ram_bytes"] == GIB and caps["queues"] == ["tokenfarm.worker.tiny"]
    engine.dispose()
    client = redis.Redis.from_url(redis_url)
    assert not [k for k in client.keys("tokenfarm.worker.*")], "something was sent"


def test_the_scheduler_leases_each_job_to_a_worker_of_its_class(tmp_path, pg_url, redis_url, smollm2):
    env = farm_env(tmp_path, pg_url, redis_url)
    fetch("gemma3-270m", MODELS_DIR)
    # SmolLM2 fits the 1 GB class; Gemma 3 270M, with its 262k-token vocabulary, needs the 2 GB one.
    sweep = sweep_file(tmp_path, "classes", "models: [smollm2-135m, gemma3-270m]\nn_prompt: [16]\nn_gen: []\n"
                       "repetitions: 1\nn_warmup: 0\n")
    with worker_process(capped(env, GIB), "tiny", tmp_path / "tiny.log"):
        ready(tmp_path / "tiny.log")
        collect_hellos(env)
        refused = tokenfarm(env, "sweep", "submit", str(sweep))
        assert refused.returncode != 0 and "gemma3-270m Q4_K_M pp16" in refused.stderr
        submitted = tokenfarm(env, "sweep", "submit", str(sweep), "--allow-unfit")
        assert submitted.returncode == 0, submitted.stderr
        # The small job runs on the small worker; the large one waits, in the database, for a
        # worker of its class.

        def small_done() -> bool:
            tokenfarm(env, "sweep", "wait", "classes", "--timeout", "3")  # ingests what has arrived
            return jobs(pg_url)[0].state == "done"

        assert wait_until(small_done, 180, interval=0)
        # Three more seconds of the loop that leases (every 2 s and after each batch): the large
        # job is offered to the only live worker again and again, and must stay queued.
        tokenfarm(env, "sweep", "wait", "classes", "--timeout", "3")
        by_index = jobs(pg_url)
        assert by_index[1].state == "queued" and by_index[1].worker is None and by_index[1].attempts == 0
        assert by_index[0].spec["need_bytes"] <= GIB < by_index[1].spec["need_bytes"] <= 2 * GIB
        assert not redis.Redis.from_url(redis_url).llen("tokenfarm.worker.tiny")
    with worker_process(capped(env, 4 * GIB), "roomy", tmp_path / "roomy.log"):
        waited = tokenfarm(env, "sweep", "wait", "classes", "--timeout", "300")
    assert waited.returncode == 0, waited.stdout + waited.stderr + (tmp_path / "roomy.log").read_text()[-3000:]
    by_model = {r.model: r.worker for r in results(pg_url)}
    assert by_model == {"smollm2-135m": "tiny", "gemma3-270m": "roomy"}


def test_a_sweep_over_two_models_on_one_worker_loads_each_model_once(tmp_path, pg_url, redis_url, smollm2):
    env = farm_env(tmp_path, pg_url, redis_url)
    sweep = sweep_file(tmp_path, "affinity", "models: [{name: smollm2-135m, quants: [Q4_1, Q8_0]}]\n"
                       "n_prompt: [16, 32]\nn_gen: [4]\nrepetitions: 1\nn_warmup: 0\n")
    with worker_process(env, "steady", tmp_path / "steady.log"):
        proc = tokenfarm(env, "sweep", "submit", str(sweep), "--wait", "--timeout", "400")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "steady.log").read_text()[-3000:]
    rows = results(pg_url)
    assert len(rows) == 6 and {r.status for r in rows} == {"ok"}
    loads = Counter(r.quant for r in rows if not r.result["conditions"]["model_reused"])
    assert loads == {"Q4_1": 1, "Q8_0": 1}
    for r in rows:
        reused = r.result["conditions"]["model_reused"]
        assert (r.result["load_ns"] == 0) == reused
    # The measurement itself is unaffected by whether the load was reused.
    assert all(r.avg_ts > 0 for r in rows)


def test_two_workers_with_prefetch_one_see_runs_of_one_model(tmp_path, pg_url, redis_url, smollm2):
    """The scheduler leases in model-major order, preferring the worker that has the model loaded:
    each worker's jobs are a subsequence of the sweep's order, so each loads each model at most once."""
    env = farm_env(tmp_path, pg_url, redis_url)
    sweep = sweep_file(tmp_path, "pair", "models: [{name: smollm2-135m, quants: [Q4_1, Q8_0]}]\n"
                       "n_prompt: [16, 24, 32]\nn_gen: [2, 4]\nrepetitions: 1\nn_warmup: 0\n")
    with worker_process(env, "left", tmp_path / "left.log"), worker_process(env, "right", tmp_path / "right.log"):
        ready(tmp_path / "left.log")
        ready(tmp_path / "right.log")
        proc = tokenfarm(env, "sweep", "submit", str(sweep), "--wait", "--timeout", "400")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = results(pg_url)
    assert len(rows) == 10
    loads = Counter((r.worker, r.quant) for r in rows if not r.result["conditions"]["model_reused"])
    jobs_per = Counter((r.worker, r.quant) for r in rows)
    print(f"\nloads per (worker, model): {dict(loads)}; jobs per (worker, model): {dict(jobs_per)}")
    assert set(loads) == set(jobs_per) and max(loads.values()) == 1


def test_an_out_of_memory_job_fails_with_that_reason_and_the_worker_goes_on(tmp_path, smollm2):
    # The embedded default. The scheduler keeps a job from a worker it does not fit, so the job is
    # made one whose estimate fell short (none, as a job recorded before estimates): it reaches
    # the worker, which runs out of memory.
    env = at_head(service_env(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'data' / 'tokenfarm.sqlite3'}"
    # A context of 8M tokens: a KV cache of ~170 GiB that no allocation on this machine can hold.
    sweep = sweep_file(tmp_path, "oom", "models: [smollm2-135m]\nn_prompt: []\nn_gen: [4]\n"
                       "n_depth: [8000000, 0]\nrepetitions: 1\nn_warmup: 0\n")
    with worker_process(env, "sturdy", tmp_path / "sturdy.log") as proc:
        ready(tmp_path / "sturdy.log")
        collect_hellos(env)
        refused = tokenfarm(env, "sweep", "submit", str(sweep))
        assert refused.returncode != 0 and "tg4 @ d8000000" in refused.stderr and "fit no registered worker" in refused.stderr
        submitted = tokenfarm(env, "sweep", "submit", str(sweep), "--allow-unfit")
        assert submitted.returncode == 0, submitted.stderr
        engine = create_engine(url)
        with session_scope(engine) as s:
            for row in s.scalars(select(JobRow)):
                row.spec = {**row.spec, "need_bytes": 0}
        engine.dispose()
        waited = tokenfarm(env, "sweep", "wait", "oom", "--timeout", "300")
        assert proc.poll() is None, "the worker died"
    assert waited.returncode == 1, waited.stdout + waited.stderr
    by_test = {r.test: r for r in results(url)}
    assert set(by_test) == {"tg4 @ d8000000", "tg4"}, waited.stdout + waited.stderr
    oom = by_test["tg4 @ d8000000"]
    assert oom.status == "failed" and "out of memory" in oom.result["error"]
    assert by_test["tg4"].status == "ok"


def test_submit_leaves_the_hellos_to_the_collector_and_says_they_wait(tmp_path, smollm2):
    # The embedded broker: its waiting messages are counted from its files.
    env = at_head(service_env(tmp_path / "data"))
    sweep = sweep_file(tmp_path, "early", "models: [smollm2-135m]\nn_prompt: [16]\nn_gen: []\nrepetitions: 1\n")
    with worker_process(env, "early", tmp_path / "early.log"):
        ready(tmp_path / "early.log")
        submitted = tokenfarm(env, "sweep", "submit", str(sweep))
        assert submitted.returncode == 0, submitted.stderr
        said = " ".join(submitted.stderr.split())
        assert "no worker has announced" in said and "messages wait for a collector" in said, said
        assert "tokenfarm collector --once" in said
        url = f"sqlite:///{tmp_path / 'data' / 'tokenfarm.sqlite3'}"
        engine = create_engine(url)
        with session_scope(engine) as s:
            assert s.get(WorkerRow, "early").capabilities is None, "submit took in the hello"
        collect_hellos(env)
        with session_scope(engine) as s:
            assert s.get(WorkerRow, "early").capabilities["engines"]
        engine.dispose()
