"""What a run says it ran on, with real llama.cpp, PostgreSQL, Redis and worker processes (issue 17):
the worker's backends and GPU devices read from ggml's registry, a tensor_split no worker can place
refused at submit, routed past the worker and refused by the engine, a real measurement with a
forged backend refused by the collector, and a llama-bench record of a file on this machine joining
the farm's own rows of it."""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import pytest
from sqlalchemy import create_engine, func, select

from farm.broker import create_app, publish_envelope
from farm.contract import EngineConfig, Envelope, Job, Result, accelerators
from farm.modelfiles import model_sha256
from farm.settings import Settings
from orchestrator import lifecycle
from orchestrator.db import JobRow, RejectionRow, ResultRow, SweepRow, WorkerRow, session_scope
from orchestrator.planning import plan
from orchestrator.ranking import leaderboard
from orchestrator.store import load_results
from orchestrator.sweep import SweepSpec
from tests.conftest import REPO
from tests.integration.conftest import (
    MODELS_DIR,
    at_head,
    register_worker,
    service_env,
    tokenfarm,
    wait_until,
    worker_process,
)
from worker.tasks import capabilities, execute

pytestmark = pytest.mark.integration

NO_GPU_LINE = "this llama.cpp build has no GPU device (backends CPU); leave tensor_split empty"
# The wheel this project builds here is llama.cpp's CPU backend alone; a GPU build is held to its GPUs.
CPU_BUILD = not llama_cpp.llama_supports_gpu_offload()


def _job(job_id: str, index: int, **config) -> Job:
    return Job(job_id=job_id, sweep_id="s", index=index, model="smollm2-135m", quant="Q4_1", kind="pp",
               n_prompt=16, repetitions=1, n_warmup=0, config=EngineConfig(n_threads=1, **config))


def test_the_engine_reports_its_backends_and_refuses_a_split_it_cannot_place(smollm2):
    settings = Settings(worker_name="box", models_dir=MODELS_DIR)
    ok = execute(_job("plain", 0), settings)
    assert ok.status == "ok", ok.error
    hw = ok.hardware
    if CPU_BUILD:
        assert (hw.backends, hw.n_gpus) == ("CPU", 0)
    else:
        assert accelerators(hw.backends) and hw.n_gpus >= 1, hw
    announced = capabilities(settings).hardware
    assert (announced.backends, announced.n_gpus) == (hw.backends, hw.n_gpus)

    split = execute(_job("split", 1, tensor_split=(1, 1)), settings)
    if hw.n_gpus == 0:
        assert (split.status, split.error) == ("failed", NO_GPU_LINE)
        assert split.hardware.backends == "CPU"  # a failed result still says what it ran on
    elif hw.n_gpus == 1:
        assert split.status == "failed" and split.error.endswith("give at most 1 share")
    else:
        assert split.status == "ok", split.error

    # main_gpu names a device too: past this build's last one, the load is refused with the fix.
    past = execute(_job("main", 2, split_mode="none", main_gpu=max(hw.n_gpus, 1)), settings)
    assert past.status == "failed"
    if hw.n_gpus == 0:
        assert past.error == "this llama.cpp build has no GPU device (backends CPU); leave main_gpu at 0"
    else:
        assert past.error.endswith(f"give main_gpu below {hw.n_gpus}"), past.error


def _farm(tmp_path: Path, pg_url: str, redis_url: str) -> dict[str, str]:
    env = service_env(tmp_path / "data", database_url=pg_url, broker_url=redis_url)
    env.update(TOKENFARM_HEARTBEAT_S="1")
    return at_head(env)


def _bench_records(path: Path, cpu: str) -> list[dict]:
    """Native llama-bench's pp32 record of SmolLM2 (tests/fixtures), as this box would write it for the
    file at `path` with 1 thread, no offload and flash attention off; and the same record under a
    model_size the file does not have, which must keep its own identity."""
    fixture = json.loads((REPO / "tests" / "fixtures" / "llama-bench-smollm2.json").read_text())
    rec = {**fixture[0], "model_filename": str(path), "cpu_info": cpu, "n_gpu_layers": 0, "flash_attn": 0}
    return [rec, {**rec, "model_size": rec["model_size"] + 1}]


@pytest.mark.skipif(not CPU_BUILD, reason="the refusal at submit is of a box without GPUs")
def test_a_split_no_worker_can_place_is_refused_at_submit_and_an_import_joins_native_rows(
        tmp_path, pg_url, redis_url, smollm2):
    env = _farm(tmp_path, pg_url, redis_url)
    log = tmp_path / "box.log"
    sweep = tmp_path / "split.yaml"
    sweep.write_text("name: split\nmodels: [smollm2-135m]\nn_prompt: [32]\nn_gen: []\nrepetitions: 1\n"
                     "n_warmup: 0\nn_threads: [1]\ntensor_split: [[], [1, 1]]\n")
    engine = create_engine(pg_url)
    with worker_process(env, "box", log):
        assert wait_until(lambda: log.exists() and " ready." in log.read_text(errors="replace"), 120), \
            log.read_text(errors="replace")[-3000:]
        assert tokenfarm(env, "collector", "--once").returncode == 0
        with session_scope(engine) as s:
            hw = s.get(WorkerRow, "box").capabilities["hardware"]
        assert (hw["backends"], hw["n_gpus"]) == ("CPU", 0)

        refused = tokenfarm(env, "sweep", "submit", str(sweep))
        assert refused.returncode != 0
        line = refused.stderr.strip()
        assert "\n" not in line and "tensor_split [1, 1]" in line, refused.stderr
        assert "no registered llama.cpp worker has a GPU device (box: backends CPU)" in line
        assert "leave tensor_split empty" in line
        with session_scope(engine) as s:
            assert s.scalar(select(func.count()).select_from(SweepRow)) == 0

        # Queued anyway: the plain job runs, the split one waits for a worker with two GPUs.
        assert tokenfarm(env, "sweep", "submit", str(sweep), "--allow-unfit").returncode == 0

        def plain_done() -> bool:
            tokenfarm(env, "sweep", "wait", "split", "--timeout", "3")
            with session_scope(engine) as s:
                return s.scalar(select(JobRow.state).where(JobRow.index == 0)) == "done"

        assert wait_until(plain_done, timeout=180, interval=1.0), log.read_text(errors="replace")[-3000:]
    with session_scope(engine) as s:
        split_job = s.scalar(select(JobRow).where(JobRow.index == 1))
        assert (split_job.state, split_job.worker, split_job.attempts) == ("queued", None, 0)
        native = [Result.model_validate(r.result) for r in s.scalars(select(ResultRow))]
    assert len(native) == 1 and native[0].status == "ok", native[0].error
    assert (native[0].hardware.backends, native[0].hardware.n_gpus) == ("CPU", 0)

    # llama-bench's record of the same file on this box: it takes the file's sha256 and joins the row.
    records = tmp_path / "bench.json"
    records.write_text(json.dumps(_bench_records(smollm2, native[0].hardware.cpu)))
    imported = tokenfarm(env, "import", "llama-bench", str(records))
    assert imported.returncode == 0 and "imported 2 results" in imported.stdout, imported.stderr
    with session_scope(engine) as s:
        results = load_results(s, status="ok")
    sha = model_sha256(smollm2)
    assert native[0].model_sha256 == sha
    assert sorted(r.model_sha256 for r in results if r.worker != "box") == ["", sha]
    rows = leaderboard(results)
    joined = next(r for r in rows if r.model_sha256 == sha)
    assert joined.n_results == 2 and joined.worker == ", ".join(sorted({"box", native[0].hardware.cpu}))
    assert joined.hardware == f"{native[0].hardware.cpu} (CPU)"
    assert len(rows) == 2  # the record whose size disagrees with the file stays its own row
    shown = tokenfarm(env, "leaderboard")
    assert f"measured on: {native[0].hardware.cpu} (CPU)" in shown.stdout and "cores" not in shown.stdout
    engine.dispose()


def test_the_collector_refuses_a_real_measurement_with_a_forged_backend(tmp_path, pg_url, redis_url, smollm2):
    env = at_head(service_env(tmp_path / "data", database_url=pg_url, broker_url=redis_url))
    token = register_worker(env, "mallory")
    spec = SweepSpec(name="forge", models=["smollm2-135m"], n_prompt=[16], n_gen=[], repetitions=1, n_warmup=0,
                     n_threads=[1])
    engine = create_engine(pg_url)
    with session_scope(engine) as s:
        job = plan(spec)[0]
        lifecycle.record(s, spec, [job])
        leased = lifecycle.lease(s.get(JobRow, job.job_id), "mallory")
    real = execute(leased, Settings(worker_name="mallory", models_dir=MODELS_DIR))
    assert real.status == "ok", real.error
    app = create_app(Settings(broker_url=redis_url))

    def send(result: Result) -> None:
        publish_envelope(app, Envelope(kind="result", job_id=job.job_id, worker="mallory", result=result,
                                       lease_id=leased.lease_id, attempt=leased.attempt), token)

    for forged in ("Cuda", f"{real.hardware.backends},{real.hardware.backends}", "CUDA,TPU"):
        send(real.model_copy(update={"hardware": real.hardware.model_copy(update={"backends": forged})}))
    assert tokenfarm(env, "collector", "--once").returncode == 0
    with session_scope(engine) as s:
        reasons = [r.reason for r in s.scalars(select(RejectionRow).where(RejectionRow.job_id == job.job_id)
                                               .order_by(RejectionRow.id))]
        assert s.scalar(select(func.count()).select_from(ResultRow)) == 0
        assert s.get(JobRow, job.job_id).state == "sent"  # refused, so nothing about the job changed
    assert len(reasons) == 3, reasons
    assert "hardware.backends names 'Cuda'" in reasons[0] and "did you mean 'CUDA'" in reasons[0]
    assert "more than once" in reasons[1]
    assert "'TPU', which no llama.cpp or torch build reports" in reasons[2]

    send(real)  # the same measurement as it was made is stored
    assert tokenfarm(env, "collector", "--once").returncode == 0
    with session_scope(engine) as s:
        stored = s.get(ResultRow, job.job_id)
        assert stored is not None and stored.result["hardware"]["backends"] == real.hardware.backends
        assert s.get(WorkerRow, "mallory").n_rejected == 3
    engine.dispose()
