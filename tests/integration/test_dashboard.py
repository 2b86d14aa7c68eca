"""The Streamlit app through AppTest: every page on an empty database, on today's Result schema,
on a seeded database carrying the fields later issues add, and on PostgreSQL read-only."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from streamlit.testing.v1 import AppTest

from dashboard.sample_data import seed as seed_sample
from farm.contract import ModelFacts, Result
from farm.stats import summarize
from orchestrator.collector import result_row
from orchestrator.db import WorkerRow, make_engine, session_scope, upgrade
from orchestrator.lifecycle import record
from orchestrator.planning import plan
from orchestrator.ranking import TIERS_GB
from orchestrator.sweep import SweepSpec
from orchestrator.workers import add_worker, set_flag
from tests.conftest import REPO

pytestmark = pytest.mark.integration
APP = str(REPO / "dashboard" / "app.py")
PAGES = ["leaderboard", "techniques", "prefill_decode", "roofline", "workers", "result_detail", "levers"]


@pytest.fixture(autouse=True)
def fresh_caches():
    # Streamlit caches live for the process; each test points at its own database.
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60).run()
    if page != "leaderboard":
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, f"{page}: {at.exception[0].message if at.exception else ''}"
    return at


def charts(at: AppTest) -> list:
    return at.get("vega_lite_chart")


def seed_today(url: str) -> None:
    """Results exactly as today's schema writes them: none of the later fields."""
    upgrade(url)
    spec = SweepSpec(name="seed", models=["smollm2-135m", "gemma3-270m"], n_prompt=[64], n_gen=[16], repetitions=2)
    jobs = plan(spec)
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


@pytest.fixture
def seeded(data_dir):
    url = f"sqlite:///{data_dir / 'tokenfarm.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    seed_sample(engine, 1500, n_sweeps=3)
    engine.dispose()
    return data_dir / "tokenfarm.sqlite3"


@pytest.mark.parametrize("page", PAGES)
def test_empty_database_says_what_to_run(data_dir, page):
    at = open_page(page)
    assert any("tokenfarm sweep submit" in info.value for info in at.info)


@pytest.mark.parametrize("page", PAGES)
def test_todays_schema_renders_and_says_what_is_missing(data_dir, page):
    seed_today(f"sqlite:///{data_dir / 'tokenfarm.sqlite3'}")
    at = open_page(page)
    if page == "leaderboard":
        tables = [t.value for t in at.dataframe]
        assert set(tables[-1]["model"]) == {"smollm2-135m", "gemma3-270m"}
        assert set(tables[-1]["memory"]) == {"estimated"}  # no measured peak in today's schema
    if page == "techniques":
        assert any("No spec / lookup results yet" in i.value for i in at.info)
    if page == "roofline":
        assert any("bandwidth" in i.value for i in at.info)


def test_leaderboard_has_a_table_per_tier_and_a_chart(seeded):
    at = open_page("leaderboard")
    labels = [tab.label for tab in at.tabs]
    assert labels == [f"{t} GB" for t in TIERS_GB[:-1]] + [f"{TIERS_GB[-1]} GB and above"]
    assert len(at.dataframe) == len(TIERS_GB)
    assert charts(at)
    large = at.dataframe[-1].value
    fitting = [int(c.value.split()[0]) for c in at.caption if "combinations fit" in c.value]
    assert len(fitting) == len(TIERS_GB) and fitting == sorted(fitting) and fitting[0] < fitting[-1]
    assert list(large["rank"]) == list(range(1, len(large) + 1))
    decode = list(large["decode tok/s"])
    assert decode == sorted(decode, reverse=True)
    assert {"prefill tok/s", "TTFT ms", "params B (total)", "params B (active)", "± stddev", "decode runs",
            "memory", "hardware"} <= set(large.columns)


def fitting_all(at: AppTest) -> int:
    """How many combinations the largest tier lists (its table shows the top ones only)."""
    return [int(c.value.split()[0]) for c in at.caption if "combinations fit" in c.value][-1]


def test_leaderboard_filters_change_the_rows(seeded):
    at = open_page("leaderboard")
    everything = fitting_all(at)

    hardware = next(m for m in at.multiselect if m.label == "Hardware class")
    hardware.set_value(["CPU"]).run()
    cpu_only = at.dataframe[-1].value
    assert 0 < fitting_all(at) < everything
    assert all(h.endswith("cores)") for h in cpu_only["hardware"])

    hardware.set_value([]).run()
    technique = next(m for m in at.multiselect if m.label == "Technique")
    technique.set_value(["spec"]).run()
    assert set(at.dataframe[-1].value["technique"]) == {"spec"}

    technique.set_value([]).run()
    depth = next(s for s in at.selectbox if s.label.startswith("Context depth"))
    depth.set_value(4096).run()
    deep = at.dataframe[-1].value
    assert set(deep["test"]) == {"tg128 @ d4096"}
    assert not at.exception


def test_a_flagged_worker_never_ranks(seeded):
    engine = make_engine(f"sqlite:///{seeded}")
    with session_scope(engine) as s:
        add_worker(s, "rtx4090")
        add_worker(s, "rtx3090")
        add_worker(s, "h100")
        set_flag(s, "rtx4090", True, "failed a canary")
        s.get(WorkerRow, "h100").trusted = True
    engine.dispose()
    at = open_page("leaderboard")
    hardware = set(at.dataframe[-1].value["hardware"])
    assert "NVIDIA GeForce RTX 3090" in hardware
    assert "NVIDIA GeForce RTX 4090" not in hardware
    workers = open_page("workers")
    trust = dict(zip(workers.dataframe[1].value["worker"], workers.dataframe[1].value["trust"]))
    assert trust["rtx4090"] == "flagged" and trust["rtx3090"] == "registered" and trust["nuc"] == "unknown"
    assert trust["h100"] == "trusted"
    shown = workers.dataframe[1].value.set_index("worker")
    assert shown.loc["rtx4090", "flag_reason"] == "failed a canary"


def test_techniques_page_shows_speedup_breakeven_and_losslessness(seeded):
    at = open_page("techniques")
    assert len(charts(at)) == 2
    loss = at.dataframe[0].value
    assert set(loss["technique"]) == {"spec", "lookup"}
    assert all(v.startswith(("lossless", "diverged", "not recorded")) for v in loss["verdict"])
    # The earliest divergence comes from speculation.first_mismatch: present exactly where a run diverged.
    diverged = loss["verdict"].str.startswith("diverged")
    assert diverged.any() and loss.loc[diverged, "earliest divergence (token index)"].notna().all()
    assert loss.loc[~diverged, "earliest divergence (token index)"].isna().all()
    breakeven = at.dataframe[1].value
    per_pass = breakeven["accepted tokens per pass (mean)"]
    assert per_pass.notna().all() and (per_pass <= breakeven["n_draft"]).all()
    spec_only = next(m for m in at.multiselect if m.label == "Technique")
    spec_only.set_value(["spec"]).run()
    assert set(at.dataframe[0].value["technique"]) == {"spec"}


def test_prefill_roofline_workers_and_detail_pages(seeded):
    prefill = open_page("prefill_decode")
    assert len(charts(prefill)) == 2
    roofline = open_page("roofline")
    assert charts(roofline)
    assert roofline.dataframe[0].value["roofline_pct"].notna().any()
    workers = open_page("workers")
    sweeps = workers.dataframe[0].value
    assert len(sweeps) == 3 and sweeps["progress"].max() == 1.0 and sweeps["progress"].min() < 1.0
    assert len(workers.dataframe[2].value)  # failures with reasons
    detail = open_page("result_detail")
    assert charts(detail)
    fields = set(detail.dataframe[0].value["field"])
    assert {"samples_ns", "hardware.gpu", "config.n_threads", "avg_ts"} <= fields


def test_postgres_is_read_only_and_every_page_renders(pg_url, data_dir, monkeypatch):
    upgrade(pg_url)
    engine = make_engine(pg_url)
    seed_sample(engine, 400, n_sweeps=2)
    engine.dispose()
    from dashboard.queries import open_readonly

    ro = open_readonly(pg_url)
    with pytest.raises(Exception, match="read-only"):
        with ro.begin() as conn:
            conn.execute(text("DELETE FROM results"))
    ro.dispose()
    monkeypatch.setenv("TOKENFARM_DATABASE_URL", pg_url)
    for page in PAGES:
        at = open_page(page)
        assert at.dataframe, page


def test_every_page_has_its_own_address(data_dir, monkeypatch):
    """The default page is served at / whatever its url_path: a page that is the default has no
    address of its own, so every real page must be a non-default one."""
    import streamlit as st

    seen = []
    navigation = st.navigation

    def recording(pages, **kw):
        seen.extend(pages)
        return navigation(pages, **kw)

    monkeypatch.setattr(st, "navigation", recording)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    visible = {p.url_path for p in seen if p.visibility == "visible"}
    assert visible == {"leaderboard", "techniques", "prefill-decode", "roofline", "workers", "result"}
    # / forwards to the leaderboard, which is what a newcomer sees first.
    assert at.title and at.title[0].value == "Leaderboard by VRAM tier"
