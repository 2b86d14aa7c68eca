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
PAGES = ["leaderboard", "techniques", "prefill_decode", "roofline", "workers", "result_detail", "pareto", "recommend",
         "claims", "levers"]


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
    if page == "pareto":
        assert any("No quality measured yet" in i.value for i in at.info)
    if page == "recommend":
        # Two results from one worker: the page says the data is thin, and that quality was not measured.
        assert any(w.value.startswith("thin data:") for w in at.warning)
        assert at.dataframe[0].value["KLD"].isna().all()  # quality not measured


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
    # A CPU-only box's class is its CPU and backend, never its core count.
    assert set(cpu_only["hardware"]) <= {"Intel Core i7-1260P (CPU)", "AMD EPYC 9354 (CPU)"}
    assert len(cpu_only) > 0

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
    assert "NVIDIA GeForce RTX 3090 (CUDA)" in hardware
    assert not any("RTX 4090" in h for h in hardware)
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


def test_techniques_page_puts_both_engines_mtp_on_one_model_side_by_side(data_dir):
    """Issue 15: the MTP example's jobs on both engines over one file; llama.cpp's and torch's MTP
    are two techniques of the same model on the page, beside the draft model and lookup."""
    import json

    from farm.contract import Speculation
    from orchestrator.sweep import load_spec

    url = f"sqlite:///{data_dir / 'tokenfarm.sqlite3'}"
    upgrade(url)
    example = REPO / "examples" / "mtp-llamacpp.yaml"
    spec = load_spec(example)
    jobs = plan(spec, base_dir=example.parent)
    shown = [j for j in jobs if j.technique in ("mtp", "spec", "lookup") and j.prompt_category == "code"
             and j.lookup_mode in ("longest", "ngram-simple")]
    engine = make_engine(url)
    with session_scope(engine) as s:
        record(s, spec, jobs)
        for i, job in enumerate(shown):
            samples = [int(1e9 / (20 + i))]
            avg, std = summarize(job.n_tokens, samples)
            base_avg = avg / 1.2
            speculation = Speculation(
                baseline_samples_ns=[int(1e9 / base_avg)], baseline_avg_ts=base_avg, speedup=1.2, n_drafted=40,
                n_accepted=10, n_passes=30, acceptance_rate=0.25, mean_accepted_per_pass=1 / 3,
                acceptance_by_position=[0.25] * max(1, job.n_mtp), draft_ns=1, verify_ns=1,
                first_mismatch=[None, None], lossless=True)
            # The job's echo (model, engine, technique options) as every Result carries it, measured.
            echo = Result.failed(job, "w", "").model_dump(exclude_unset=True, exclude={"status", "error"})
            s.add(result_row(Result(**echo, status="ok", repetitions=1, samples_ns=samples, avg_ts=avg,
                                    stddev_ts=std, speculation=speculation)))
    engine.dispose()
    at = open_page("techniques")
    loss = at.dataframe[0].value
    techniques = set(loss.loc[loss["model"] == "smollm2-135m-mtp", "technique"])
    assert {"mtp llamacpp", "mtp torch", "spec", "lookup", "lookup ngram-simple"} <= techniques
    breakeven = at.dataframe[1].value
    mtp = breakeven[breakeven["technique"].str.startswith("mtp")]
    assert set(mtp["model"]) == {"smollm2-135m-mtp"} and set(mtp["technique"]) == {"mtp llamacpp", "mtp torch"}
    # The speedup map: a column per technique, a row per model, so the two MTP columns share the row.
    heat = json.loads(charts(at)[0].spec)
    assert heat["facet"]["column"]["field"] == "technique"
    assert heat["spec"]["layer"][0]["encoding"]["y"]["field"] == "model"


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
    assert visible == {"leaderboard", "techniques", "prefill-decode", "roofline", "workers", "result", "pareto",
                       "recommend", "claims", "levers"}
    # / forwards to the leaderboard, which is what a newcomer sees first.
    assert at.title and at.title[0].value == "Leaderboard by VRAM tier"


def seeded_results(path) -> list:
    from orchestrator.store import load_results

    with session_scope(make_engine(f"sqlite:///{path}")) as s:
        return load_results(s, status="ok")


def test_leaderboard_shows_quality_where_measured(seeded):
    at = open_page("leaderboard")
    large = at.dataframe[-1].value
    assert {"KLD", "top-1"} <= set(large.columns)
    # The sample ladder: Q2_K strays furthest from its reference, Q8_0 least.
    by_quant = large.groupby("quant")["KLD"].median()
    assert by_quant["Q2_K"] > by_quant["Q4_0"] > by_quant["Q8_0"]


def test_pareto_page_draws_the_frontier_per_tier(seeded):
    from orchestrator.recommend import pareto_front

    at = open_page("pareto")
    assert charts(at)
    front = at.dataframe[0].value
    assert len(front) >= 2
    # Along the frontier, faster means further from the reference: nothing on it is beaten on both axes.
    ordered = front.sort_values("decode tok/s", ascending=False)
    assert list(ordered["KLD"]) == sorted(ordered["KLD"], reverse=True)
    assert all(pareto_front(list(zip(front["decode tok/s"], front["KLD"]))))
    tier = next(s for s in at.selectbox if s.label == "VRAM tier")
    tier.set_value(8).run()
    assert not at.exception and all(float(m) <= 8 for m in at.dataframe[0].value["memory GiB"])
    boxes = next(m for m in at.multiselect if m.label == "Measured on")
    boxes.set_value(["NVIDIA GeForce RTX 3060 (CUDA)"]).run()
    assert set(at.dataframe[0].value["hardware"]) == {"NVIDIA GeForce RTX 3060 (CUDA)"}


def test_recommend_page_shows_what_the_cli_would(seeded):
    from orchestrator.recommend import recommend

    at = open_page("recommend")
    shown = at.dataframe[0].value
    expected = recommend(seeded_results(seeded), 8.0)
    assert list(shown["model"]) == [r.model for r in expected.rows]
    assert [round(x, 3) for x in shown["decode tok/s"]] == [round(r.tg_ts, 3) for r in expected.rows]
    assert (shown["memory GiB"] <= 8).all() and shown["KLD"].notna().any()
    assert [a.value for a in (*at.success, *at.warning)] == [expected.data_statement()]
    # The sample's one 8 GB card: speeds from boxes of the class asked for.
    assert set(shown["measured on"]) == {"NVIDIA GeForce RTX 2070 (CUDA)"}
    agreement = next(n for n in at.number_input if n.label.startswith("Minimum top-1"))
    agreement.set_value(0.9).run()
    assert (at.dataframe[0].value["top-1"] >= 0.9).all()


def test_claims_page_shows_computed_verdicts_with_their_queries(seeded):
    from orchestrator.claims import claims

    at = open_page("claims")
    expected = claims(seeded_results(seeded))
    assert [h.value for h in at.subheader] == [c.claim for c in expected]
    assert len(at.caption) == len(expected) + 1 and all(c.value.startswith("Query: ") for c in at.caption[1:])
    lossless = next(c for c in expected if c.key == "lossless")
    table = at.dataframe[[c.claim for c in expected if c.findings].index(lossless.claim)].value
    assert list(table["numbers"]) == [f.numbers for f in lossless.findings]
    # The sample's spec runs diverge now and then: the claim is refuted on the numbers, not by hand.
    assert lossless.verdict == "refuted" and any("refuted" in m.value for m in at.markdown)


def test_imported_llama_bench_rows_keep_models_gpus_and_settings_apart(data_dir):
    """Issue 17 as a user met it: llama-bench files imported under one machine name."""
    import json

    from orchestrator.llamabench import import_text
    from tests.unit.test_llamabench_identity import MOE, record

    url = f"sqlite:///{data_dir / 'tokenfarm.sqlite3'}"
    upgrade(url)
    big = {"model": "Qwen3.5-35B-A3B-Q4_K_M.gguf", "model_type": "qwen35moe 35B.A3B Q4_K - Medium",
           "size": 20_700_000_000, "n_params": 34_700_000_000, "gpu": "NVIDIA GeForce RTX 3060"}
    farm = [record(150.0), record(90.0, model="models/mistral-7b.Q4_K_M.gguf", size=4368439296, n_params=7241732096),
            record(130.0, gpu="NVIDIA GeForce RTX 3090"), record(75.0, gpu="NVIDIA GeForce RTX 3060"),
            record(110.0, **MOE), record(25.0, **big, n_cpu_moe=30)]
    apple = [record(60.0, cpu="Apple M2 Max", gpu="", backends="Metal,BLAS")]
    engine = make_engine(url)
    with session_scope(engine) as s:
        import_text(s, "\n".join(json.dumps(r) for r in farm), "farm", "farm.jsonl")
        import_text(s, "\n".join(json.dumps(r) for r in apple), None, "mac.jsonl")
    engine.dispose()
    at = open_page("leaderboard")
    board = at.dataframe[-1].value
    by = {(m, h, st): row for m, h, st, row in zip(board["model"], board["hardware"], board["settings"],
                                                    board.to_dict("records"))}
    llama = "models/llama-2-7b.Q4_K_M.gguf"
    # Two models of one quant: two rows, not one at 120.
    assert by[(llama, "NVIDIA GeForce RTX 4090 (CUDA)", "threads=16 ngl=99 fa=on")]["decode tok/s"] == \
        pytest.approx(150.0, rel=1e-3)
    assert by[("models/mistral-7b.Q4_K_M.gguf", "NVIDIA GeForce RTX 4090 (CUDA)",
               "threads=16 ngl=99 fa=on")]["decode tok/s"] == pytest.approx(90.0, rel=1e-3)
    # One farm's 4090, 3090 and 3060: three rows, none pooled.
    gpus = {h: row["decode tok/s"] for (m, h, _), row in by.items() if m == llama}
    assert gpus == pytest.approx({"NVIDIA GeForce RTX 4090 (CUDA)": 150.0, "NVIDIA GeForce RTX 3090 (CUDA)": 130.0,
                                  "NVIDIA GeForce RTX 3060 (CUDA)": 75.0, "Apple M2 Max (Metal)": 60.0}, rel=1e-3)
    # The Apple box: a Metal GPU row, not a CPU box with 0 cores.
    assert not any("0 cores" in h for h in board["hardware"])
    hardware = next(m for m in at.multiselect if m.label == "Hardware class")
    hardware.set_value(["CPU"]).run()
    assert any("No result matches" in i.value for i in at.info)  # every row here ran on a GPU
    # Tiers: the 18.5 GB MoE in 24 GB, not 8; n_cpu_moe 30 on the 12 GB 3060 in 12 GB, not 24.
    at = open_page("leaderboard")
    fit = [int(c.value.split(" fit ")[1].split()[0]) for c in at.caption if "combinations fit" in c.value]
    tables = {tier: set(df.value["model"]) for tier, df in zip(fit, at.dataframe)}
    assert "Qwen3.5-35B-A3B-Q4_K_M.gguf" in tables[12] and "Qwen3.5-35B-A3B-Q4_K_M.gguf" not in tables.get(8, set())
    assert "Qwen3-30B-A3B-Q4_K_M.gguf" in tables[24] and "Qwen3-30B-A3B-Q4_K_M.gguf" not in tables[16]
    moe = board[board["model"] == "Qwen3-30B-A3B-Q4_K_M.gguf"].iloc[0]
    assert float(moe["memory GiB"]) > 17 and moe["memory"] == "estimated"
