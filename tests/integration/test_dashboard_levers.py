"""The levers page through AppTest, on results that carry llama-bench's settings and llama.cpp's buffers."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from farm.contract import Conditions, Result
from farm.stats import summarize
from orchestrator.collector import result_row
from orchestrator.db import make_engine, session_scope, upgrade
from orchestrator.lifecycle import record
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from tests.conftest import REPO

pytestmark = pytest.mark.integration
APP = str(REPO / "dashboard" / "app.py")
MIB = 1 << 20
# (type_k/type_v, tok/s, KV MiB): a quantized cache is slower here and smaller.
KV = {"f16": (100.0, 12.0), "q8_0": (90.0, 6.375), "q4_0": (80.0, 3.375)}


@pytest.fixture(autouse=True)
def fresh_caches():
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def seed_levers(url: str) -> None:
    upgrade(url)
    spec = SweepSpec(name="levers", models=["smollm2-135m-moe8x2"], n_prompt=[], n_gen=[16], repetitions=2,
                     type_k=list(KV), type_v=list(KV), n_cpu_moe=[0, 4], flash_attn=["on"])
    jobs = [j for j in plan(spec) if j.config.type_k == j.config.type_v]
    engine = make_engine(url)
    with session_scope(engine) as s:
        record(s, spec, jobs)
        for job in jobs:
            ts, kv_mib = KV[job.config.type_k]
            ts = ts * (0.8 if job.config.n_cpu_moe else 1.0)
            samples = [int(16e9 / ts)] * 2
            avg, std = summarize(job.n_tokens, samples)
            kv = int(kv_mib * MIB)
            device = 0 if job.config.n_cpu_moe else 500 * MIB
            s.add(result_row(Result(
                job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker="w", model=job.model,
                model_sha256="a" * 64, source_sha256="a" * 64, quant=job.quant, test=job.test,
                n_prompt=job.n_prompt, n_gen=job.n_gen, repetitions=2, samples_ns=samples, avg_ts=avg,
                stddev_ts=std, config=job.config,
                conditions=Conditions(kv_bytes=kv, device_bytes=device + kv, host_bytes=800 * MIB - device))))
    engine.dispose()


def test_the_levers_page_shows_cost_and_savings_against_the_default(data_dir):
    seed_levers(f"sqlite:///{data_dir / 'tokenfarm.sqlite3'}")
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("views/levers.py").run()
    assert not at.exception, at.exception[0].message if at.exception else ""
    table = at.dataframe[0].value
    rows = table[table["n_cpu_moe"].astype(str) == "0"].set_index("kv")
    assert rows.loc["f16/f16", "tok/s vs default"] == pytest.approx(1.0)
    assert rows.loc["q8_0/q8_0", "tok/s vs default"] == pytest.approx(0.9, rel=1e-3)
    assert rows.loc["q4_0/q4_0", "kv MiB saved"] == pytest.approx(12.0 - 3.375, abs=0.01)
    # The other lever: experts on the host cost 20 % here and save the device their 500 MiB.
    at.selectbox[0].set_value("n_cpu_moe").run()
    table = at.dataframe[0].value
    moved = table[(table["n_cpu_moe"].astype(str) == "4") & (table["kv"] == "q8_0/q8_0")].iloc[0]
    assert moved["tok/s vs default"] == pytest.approx(0.8, rel=1e-3)
    assert moved["device MiB saved"] == pytest.approx(500, abs=0.01)
