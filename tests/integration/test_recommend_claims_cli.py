"""`tokenfarm recommend` and `tokenfarm claims` through the CLI, on hand-made Results stored in PostgreSQL
through the collector's store (the same rows a real sweep leaves), with one worker flagged."""

from __future__ import annotations

import pytest

from orchestrator.collector import store
from orchestrator.db import make_engine, session_scope
from orchestrator.lifecycle import record
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from orchestrator.workers import add_worker, set_flag
from tests.integration.conftest import service_env, tokenfarm
from tests.results_factory import GIB, quality, result, speculation

pytestmark = pytest.mark.integration


def seed(url: str) -> None:
    made = [
        result("ladder", "Q2_K", "tg", 90.0, size_bytes=2 * GIB, peak_bytes=3 * GIB, q=quality(0.40, 0.80)),
        result("ladder", "Q4_K_M", "tg", 70.0, size_bytes=3 * GIB, peak_bytes=4 * GIB, q=quality(0.03, 0.96)),
        result("ladder", "Q4_K_M", "tg", 140.0, technique="spec", draft_quant="Q4_0", size_bytes=3 * GIB,
               peak_bytes=4 * GIB, spec=speculation(2.0, 0.8)),
        result("ladder", "Q4_K_M", "tg", 130.0, technique="spec", draft_quant="Q4_0", size_bytes=3 * GIB,
               peak_bytes=4 * GIB, spec=speculation(1.9, 0.75)),
        # A flagged worker's impossible figure: stored, never counted.
        result("ladder", "Q8_0", "tg", 5000.0, worker="liar", size_bytes=4 * GIB, peak_bytes=5 * GIB,
               q=quality(0.001, 0.999)),
    ]
    # Real job rows for the results to belong to: one planned tg job per hand-made result.
    spec = SweepSpec(name="handmade", models=["smollm2-135m"], n_prompt=[], n_gen=[16 + i for i in range(len(made))],
                     repetitions=2)
    jobs = plan(spec)
    engine = make_engine(url)
    with session_scope(engine) as s:
        record(s, spec, jobs)
        for job, r in zip(jobs, made):
            store(s, r.model_copy(update={"job_id": job.job_id, "sweep_id": job.sweep_id}))
        add_worker(s, "liar")
        set_flag(s, "liar", True, "failed a canary")
    engine.dispose()


def test_recommend_and_claims_on_stored_results(pg_url, data_dir):
    seed(pg_url)
    env = service_env(data_dir, database_url=pg_url)
    env["COLUMNS"] = "220"

    proc = tokenfarm(env, "recommend", "--vram", "8", "--min-agreement", "0.95", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Q4_K_M + spec with draft Q4_0 draft: 1.95x at 0.78 acceptance, lossless" in out
    assert "KLD 0.0300, top-1 96.0% vs F16" in out
    assert "Q2_K" not in out.split("thin data")[0]  # below the agreement asked for
    assert "5000" not in out and "Q8_0" not in out  # the flagged worker's result never counts
    assert "thin data: 4 results from 1 worker fit 8 GB VRAM" in out
    assert "1 combinations left out: top-1 agreement below 95%" in out
    assert "results of 1 flagged worker (liar) never count" in out

    proc = tokenfarm(env, "claims", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tokenfarm claims: 4 ok results from 1 worker (1 flagged, never counted)" in out
    assert "speculative decoding gives 1.5-3x decode: holds" in out and "median 1.95x" in out
    assert "speculation and MTP are lossless: holds" in out
    assert "MTP gives about 1.8x decode at 85-90 % second-token acceptance: not enough data" in out
    assert out.count("query: ") == 8

    one = tokenfarm(env, "claims", "--sweep", "handmade", timeout=120)
    assert one.returncode == 0 and one.stdout == out  # the one sweep holds every result
    proc = tokenfarm(env, "claims", "--sweep", "nosuch", timeout=60)
    assert proc.returncode == 3 and "no sweep matches 'nosuch'" in proc.stderr

    proc = tokenfarm(env, "recommend", "--vram", "8", "--workload", "poetry", timeout=60)
    assert proc.returncode == 2 and "poetry" in proc.stderr
