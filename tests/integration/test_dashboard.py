"""The Streamlit app through AppTest, on an empty and on a seeded embedded database."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from orchestrator.collector import result_row
from orchestrator.db import make_engine, session_scope, upgrade
from orchestrator.dispatch import record
from orchestrator.sweep import SweepSpec, expand
from tests.conftest import REPO
from worker.contract import ModelFacts, Result, summarize

pytestmark = pytest.mark.integration
APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture(autouse=True)
def fresh_caches():
    # Streamlit caches live for the process; each test points at its own database.
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def seed(url: str) -> None:
    upgrade(url)
    spec = SweepSpec(name="seed", models=["smollm2-135m", "gemma3-270m"], n_prompt=[64], n_gen=[16], repetitions=2)
    jobs = expand(spec)
    engine = make_engine(url)
    with session_scope(engine) as s:
        record(s, spec, jobs)
        for i, job in enumerate(jobs):
            samples = [int(1e9 / (10 + i)), int(1e9 / (11 + i))]
            avg, std = summarize(job.n_tokens, samples)
            s.add(result_row(Result(
                job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker="w", model=job.model,
                model_sha256=job.model_sha256, source_sha256=job.model_sha256, quant=job.quant, test=job.test,
                n_prompt=job.n_prompt, n_gen=job.n_gen, repetitions=2, samples_ns=samples, avg_ts=avg,
                stddev_ts=std, model_facts=ModelFacts(size_bytes=(100 + 150 * i) << 20))))
    engine.dispose()


def test_empty_database_says_what_to_run(data_dir):
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert any("tokenfarm sweep submit" in info.value for info in at.info)


def test_leaderboard_lists_seeded_results_and_the_tier_filter_applies(data_dir):
    seed(f"sqlite:///{data_dir / 'tokenfarm.sqlite3'}")
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    frame = at.dataframe[0].value
    assert set(frame["model"]) == {"smollm2-135m", "gemma3-270m"}
    assert list(frame["rank"]) == [1, 2]
    assert at.selectbox[0].value == 80
