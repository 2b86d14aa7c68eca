from worker.contract import ModelFacts, Result, summarize
from orchestrator.ranking import estimated_memory_bytes, leaderboard, tier_for


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
