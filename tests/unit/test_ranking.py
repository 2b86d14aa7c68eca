from farm.contract import ModelFacts, Result
from farm.stats import summarize
from orchestrator.ranking import (
    Filters,
    Measurement,
    estimated_memory_bytes,
    leaderboard,
    pool,
    rank,
    tier_for,
)


def res(model, quant, test, n, ts, size=100 << 20, status="ok", sha=None):
    ns = int(n * 1e9 / ts)
    avg, std = summarize(n, [ns, ns])
    kind_pp = test.startswith("pp")
    return Result(job_id=f"{model}{quant}{test}", sweep_id="s", status=status, error="" if status == "ok" else "x",
                  worker="w", model=model, model_sha256=sha or (model + quant).ljust(64, "0"), quant=quant, test=test,
                  n_prompt=n if kind_pp else 0, n_gen=0 if kind_pp else n, repetitions=2, samples_ns=[ns, ns],
                  avg_ts=avg, stddev_ts=std, model_facts=ModelFacts(size_bytes=size))


def test_tiers():
    assert tier_for(1 << 30) == 8
    assert tier_for(9 << 30) == 12
    assert tier_for(500 << 30) == 80
    assert estimated_memory_bytes(10 << 30) > 10 << 30


def test_ranked_by_decode_speed_with_prefill_beside():
    rows = leaderboard([
        res("a", "Q4_1", "tg32", 32, 50.0), res("a", "Q4_1", "pp128", 128, 900.0),
        res("b", "Q8_0", "tg32", 32, 80.0), res("b", "Q8_0", "pp128", 128, 700.0),
        res("c", "Q4_0", "tg32", 32, 999.0, status="failed"),
    ])
    assert [(r.rank, r.model) for r in rows] == [(1, "b"), (2, "a")]
    assert round(rows[1].pp_ts) == 900 and rows[1].tg_test == "tg32"


def test_tier_filter_keeps_models_that_fit():
    big = res("big", "F16", "tg32", 32, 10.0, size=20 << 30)
    small = res("small", "Q4_0", "tg32", 32, 5.0)
    assert [r.model for r in leaderboard([big, small], tier_gb=8)] == ["small"]
    assert [r.model for r in leaderboard([big, small], tier_gb=24)] == ["big", "small"]


def m(model="a", quant="Q4_0", technique="baseline", test="tg32", ts=10.0, std=1.0, n_runs=1, worker="w",
      gpu="", n_depth=0, peak=None, ttft=None):
    kind_pp = test.startswith("pp")
    return Measurement(model=model, model_sha256=model.ljust(64, "0"), quant=quant, technique=technique,
                       backend="llamacpp", worker=worker, hardware=gpu or "cpu", test=test,
                       n_prompt=512 if kind_pp else 0, n_gen=0 if kind_pp else 32, n_depth=n_depth, avg_ts=ts,
                       stddev_ts=std, n_runs=n_runs, size_bytes=100 << 20, peak_memory_bytes=peak, ttft_ns=ttft,
                       gpu=gpu)


def test_pool_weights_runs_and_adds_the_spread_between_them():
    pooled = pool([m(ts=10.0, std=0.0, n_runs=1), m(ts=20.0, std=0.0, n_runs=3)])
    assert pooled.n_runs == 4 and pooled.avg_ts == 17.5
    assert abs(pooled.stddev_ts - (0.25 * 7.5 ** 2 + 0.75 * 2.5 ** 2) ** 0.5) < 1e-9


def test_filters_flagged_workers_and_depth():
    ms = [m("a", ts=50, worker="bad"), m("b", ts=20, gpu="RTX 4090", worker="gpu"), m("c", ts=10),
          m("c", test="tg32 @ d4096", n_depth=4096, ts=5), m("b", technique="spec", ts=30, gpu="RTX 4090", worker="gpu")]
    flagged = Filters(flagged_workers=frozenset({"bad"}))
    assert [r.model for r in rank(ms, flagged)] == ["b", "b", "c"]
    assert [r.model for r in rank(ms, Filters(hardware_classes=("CPU",)))] == ["a", "c"]
    assert [(r.model, r.technique) for r in rank(ms, Filters(techniques=("spec",)))] == [("b", "spec")]
    deep = rank(ms, Filters(n_depth=4096))
    assert [(r.model, r.tg_test) for r in deep] == [("c", "tg32 @ d4096")]


def test_a_technique_row_shows_its_baselines_prefill_and_measured_memory_beats_the_estimate():
    ms = [m("a", test="pp512", ts=900, ttft=2e8), m("a", ts=10, peak=3 << 30), m("a", technique="spec", ts=15)]
    rows = {r.technique: r for r in rank(ms, Filters(techniques=("spec", "baseline")))}
    assert rows["spec"].pp_ts == 900 and rows["spec"].ttft_ms == 200.0  # prefill and TTFT are untouched by speculation
    assert rows["baseline"].ttft_ms == 200.0
    assert rows["baseline"].memory_estimated is False and rows["baseline"].memory_bytes == 3 << 30
    assert rows["spec"].memory_estimated is True
