"""The memory estimate against real files and real runs, and out-of-memory jobs as failed Results.

Each measured job runs in a fresh process (as a worker's job would, its peak RSS reset at the
start), so the peak is the job's alone: Python and the engine, the header read, the weights,
the KV cache and the compute buffers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from farm.contract import Job
from farm.memory import facts_for, job_need_bytes, scaled_to_quant
from farm.modelfiles import CATALOGUE, catalogue_path, read_facts
from farm.settings import Settings
from tests.integration.conftest import MODELS_DIR
from worker.models import fetch, resolve
from worker.tasks import execute

pytestmark = pytest.mark.integration

MIB = 1 << 20

PROBE = """
import json, sys
from pathlib import Path
from farm.contract import Job
from farm.settings import Settings
from worker.tasks import execute
r = execute(Job.model_validate_json(sys.argv[1]), Settings(worker_name="probe", models_dir=Path(sys.argv[2])))
print(json.dumps({"status": r.status, "error": r.error, "peak_rss_bytes": r.conditions.peak_rss_bytes}))
"""


def job(**kw) -> Job:
    return Job(job_id="j", sweep_id="s", index=0, repetitions=1, n_warmup=0, **kw)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_the_catalogue_records_the_headers_shape(name):
    real = read_facts(fetch(name, MODELS_DIR))
    recorded = CATALOGUE[name].facts()
    for field in CATALOGUE[name].shape:
        assert getattr(recorded, field) == getattr(real, field), field
    assert recorded.file_type == real.file_type


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "Q4_0", "F32"])
def test_a_derived_quants_size_is_estimated_within_ten_percent_above(smollm2, quant):
    estimated = scaled_to_quant(CATALOGUE["smollm2-135m"].facts(), quant).weight_bytes
    real = read_facts(resolve("smollm2-135m", quant, MODELS_DIR)[0]).weight_bytes
    assert 0.99 * real <= estimated <= 1.10 * real, (estimated, real)
    # Once the file exists the estimate reads it.
    assert facts_for("smollm2-135m", quant, MODELS_DIR).weight_bytes == real


CASES = [
    dict(model="smollm2-135m", quant="Q4_1", kind="pp", n_prompt=512),
    dict(model="smollm2-135m", quant="Q4_1", kind="tg", n_gen=16, n_depth=2048),
    dict(model="smollm2-135m", quant="F32", kind="pp", n_prompt=128),
    dict(model="gemma3-270m", quant="Q4_K_M", kind="pp", n_prompt=16),
    dict(model="smollm2-135m", quant="Q4_1", kind="pp", n_prompt=128, engine="torch"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['model']}-{c['quant']}-{c.get('engine', 'llamacpp')}-"
                         f"{c['kind']}{c.get('n_prompt') or c.get('n_gen')}-d{c.get('n_depth', 0)}")
def test_the_estimate_bounds_the_real_peak_rss_within_2x(case, smollm2):
    if case.get("engine") == "torch":
        pytest.importorskip("torch")
    source = fetch(case["model"], MODELS_DIR)
    j = job(**case)
    need = job_need_bytes(j, MODELS_DIR)
    # The bound is for a worker's first job on the file, which parses the GGUF header (its
    # facts are remembered beside the file after that, and later jobs peak lower).
    for model_file in {source, resolve(j.model, j.quant, MODELS_DIR)[0]}:
        model_file.with_name(model_file.name + ".facts.json").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", PROBE, j.model_dump_json(), str(MODELS_DIR)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["status"] == "ok", run["error"]
    peak = run["peak_rss_bytes"]
    print(f"\n{j.model} {j.quant} {j.engine} {j.test}: estimate {need / MIB:.0f} MiB, "
          f"peak RSS {peak / MIB:.0f} MiB, ratio {need / peak:.2f}")
    assert peak < need < 2 * peak


def test_llamacpp_out_of_memory_is_a_failed_result(smollm2):
    # 8M positions: a 170 GiB KV cache no allocation here can hold.
    r = execute(job(model="smollm2-135m", quant="Q4_1", kind="tg", n_gen=4, n_depth=8_000_000),
                Settings(worker_name="probe", models_dir=MODELS_DIR))
    assert r.status == "failed" and r.error.startswith("out of memory"), r.error
    # The engine is usable after it: the same process measures the next job.
    ok = execute(job(model="smollm2-135m", quant="Q4_1", kind="pp", n_prompt=16),
                 Settings(worker_name="probe", models_dir=MODELS_DIR))
    assert ok.status == "ok", ok.error


def test_torch_out_of_memory_is_a_failed_result(smollm2):
    pytest.importorskip("torch")
    r = execute(job(model="smollm2-135m", quant="Q4_1", kind="tg", n_gen=4, n_depth=8_000_000, engine="torch"),
                Settings(worker_name="probe", models_dir=MODELS_DIR))
    assert r.status == "failed" and r.error.startswith("out of memory"), r.error
    assert catalogue_path("smollm2-135m", MODELS_DIR).exists()
