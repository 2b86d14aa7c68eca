"""Statistics of repetitions, pg tests, TTFT and the roofline: pure, against a fake backend."""

import math
import statistics

import pytest

from farm.contract import format_test_name, kind_of_test, tokens_per_run
from farm.stats import sample_stats, t975
from orchestrator.validation import result_problems
from tests.unit.test_measure import FakeBackend, job
from worker.measure import decode_context, measure, roofline_tok_s


def test_t_quantiles_match_published_values_and_approach_the_normal():
    assert t975(1) == pytest.approx(12.706, abs=1e-3)
    assert t975(4) == pytest.approx(2.776, abs=1e-3)
    # beyond the table the expansion must continue it smoothly (t(40) = 2.021, t(120) = 1.980)
    assert t975(40) == pytest.approx(2.021, abs=2e-3)
    assert t975(120) == pytest.approx(1.980, abs=2e-3)
    assert t975(31) < t975(30)
    with pytest.raises(ValueError):
        t975(0)


def test_sample_stats_against_a_hand_computation():
    samples = [1_000_000_000, 1_250_000_000, 800_000_000, 1_000_000_000, 2_000_000_000]
    rates = [100 * 1e9 / ns for ns in samples]  # 100, 80, 125, 100, 50
    s = sample_stats(100, samples)
    mean, std = statistics.fmean(rates), statistics.stdev(rates)
    assert s.median_ts == pytest.approx(100.0)
    assert (s.min_ts, s.max_ts) == pytest.approx((50.0, 125.0))
    half = 2.776 * std / math.sqrt(5)
    assert (s.ci95_low_ts, s.ci95_high_ts) == pytest.approx((mean - half, mean + half), rel=1e-4)
    assert s.cv == pytest.approx(std / mean)
    assert s.noisy  # a CV of ~27 % is a busy machine


def test_steady_samples_are_not_noisy_and_one_sample_has_no_spread():
    steady = sample_stats(128, [1_000_000_000, 1_010_000_000, 990_000_000])
    assert not steady.noisy and steady.cv < 0.05
    one = sample_stats(128, [2_000_000_000])
    assert one.cv == 0 and one.ci95_low_ts == one.ci95_high_ts == pytest.approx(64.0)


def test_pg_names_and_token_counts_follow_llama_bench():
    assert format_test_name("pg", 512, 128, 0) == "pp512+tg128"
    assert format_test_name("pg", 512, 128, 4096) == "pp512+tg128 @ d4096"
    assert kind_of_test("pp512+tg128") == "pg" and kind_of_test("pp512") == "pp"
    assert kind_of_test("tg128 @ d4096") == "tg"
    assert tokens_per_run("pg", 512, 128) == 640


def test_pg_prefills_then_decodes_with_ttft_and_decode_timed_apart():
    b = FakeBackend()
    m = measure(b, job(kind="pg", n_prompt=16, n_gen=4, repetitions=3, n_warmup=1))
    assert [c for c in b.calls if c[0] == "prefill"] == [("prefill", 16, 0)] * 4
    assert [c for c in b.calls if c[0] == "decode"][:4] == [("decode", 16 + i) for i in range(4)]
    assert len(m.ttft_samples_ns) == len(m.decode_samples_ns) == 3
    for total, ttft, dec in zip(m.samples_ns, m.ttft_samples_ns, m.decode_samples_ns):
        assert 0 < ttft <= total and 0 < dec <= total and ttft + dec <= total


def test_ttft_is_kept_for_pp_from_an_empty_cache_only():
    assert measure(FakeBackend(), job(kind="pp", n_prompt=8)).ttft_samples_ns
    assert measure(FakeBackend(), job(kind="pp", n_prompt=8, n_depth=8)).ttft_samples_ns == []
    tg = measure(FakeBackend(), job(kind="tg", n_gen=4))
    assert tg.ttft_samples_ns == [] and len(tg.decode_samples_ns) == 4


def test_roofline_counts_weights_and_the_kv_cache_at_depth():
    # 1 GB/s over 1 MB of weights: 1000 tok/s; 1000 positions of 1 KB of KV double the bytes.
    assert roofline_tok_s(1.0, 1_000_000, 1000, 0) == pytest.approx(1000.0)
    assert roofline_tok_s(1.0, 1_000_000, 1000, 1000) == pytest.approx(500.0)
    assert roofline_tok_s(0.0, 1_000_000, 1000, 0) == 0.0
    assert decode_context(job(kind="tg", n_gen=5, n_depth=100)) == pytest.approx(103.0)
    assert decode_context(job(kind="pg", n_prompt=10, n_gen=1)) == pytest.approx(11.0)


def test_a_pg_result_is_checked_against_prompt_plus_generated_tokens_and_its_stats():
    from farm.contract import Result
    from farm.identity import output_sha256
    from farm.stats import summarize

    j = job(kind="pg", n_prompt=64, n_gen=16, repetitions=3, model_sha256="a" * 64)
    samples = [900_000_000, 1_000_000_000, 1_100_000_000]
    avg, std = summarize(80, samples)
    r = Result(job_id=j.job_id, sweep_id=j.sweep_id, status="ok", worker="w", model=j.model, model_sha256="b" * 64,
               quant=j.quant, test=j.test, n_prompt=64, n_gen=16, repetitions=3, samples_ns=samples,
               avg_ts=avg, stddev_ts=std, stats=sample_stats(80, samples), output_sha256=output_sha256([[7]]))
    assert result_problems(r, j) == []
    forged = r.model_copy(update={"stats": r.stats.model_copy(update={"median_ts": 1000.0})})
    assert "stats.median_ts does not match the samples" in result_problems(forged, j)


def test_roofline_and_energy_figures_of_a_worker_result():
    from farm.contract import Hardware, ModelFacts
    from worker.measure import Measurement
    from worker.tasks import decode_figures, energy_per_token_j

    facts = ModelFacts(active_bytes=100_000_000, kv_bytes_per_token=10_000)
    hw = Hardware(host_bandwidth_gbps=10.0, device_bandwidth_gbps=1000.0)
    tg = job(kind="tg", n_gen=9, n_depth=995)  # mean context 1000: 110 MB per token
    figures = decode_figures(tg, Measurement(samples_ns=[1]), facts, hw, avg_ts=45.0)
    assert figures["roofline_tok_s"] == pytest.approx(10e9 / 110e6)
    assert figures["roofline_pct"] == pytest.approx(100 * 45.0 / (10e9 / 110e6))
    on_gpu = job(kind="tg", n_gen=9, n_depth=995, config={"n_gpu_layers": -1})
    offloading = {"gpu_offload": True}
    assert decode_figures(on_gpu, Measurement(samples_ns=[1]), facts, hw, 45.0, offloading)["roofline_tok_s"] == pytest.approx(1e12 / 110e6)
    # A CPU build of llama.cpp given -ngl -1 still reads every weight from host memory.
    cpu_build = decode_figures(on_gpu, Measurement(samples_ns=[1]), facts, hw, 45.0, {"gpu_offload": False})
    assert cpu_build["roofline_tok_s"] == pytest.approx(10e9 / 110e6)
    # Half the layers offloaded: half the bytes at each bandwidth, 1 / (55 MB / 1000 GB/s + 55 MB / 10 GB/s).
    half = job(kind="tg", n_gen=9, n_depth=995, config={"n_gpu_layers": 15})
    half_facts = facts.model_copy(update={"n_layer": 30})
    expected = 1 / (55e6 / 1e12 + 55e6 / 10e9)
    assert decode_figures(half, Measurement(samples_ns=[1]), half_facts, hw, 45.0, offloading)["roofline_tok_s"] == pytest.approx(expected)
    # The torch engine on CUDA is on the device whole, whatever n_gpu_layers says (llama.cpp's knob).
    on_cuda = job(kind="tg", n_gen=9, n_depth=995, engine="torch")
    assert decode_figures(on_cuda, Measurement(samples_ns=[1]), facts, hw, 45.0, {"device": "cuda:0"})["roofline_tok_s"] == pytest.approx(1e12 / 110e6)
    assert decode_figures(on_cuda, Measurement(samples_ns=[1]), facts, hw, 45.0, {"device": "cpu"})["roofline_tok_s"] == pytest.approx(10e9 / 110e6)
    pg = job(kind="pg", n_prompt=8, n_gen=2)
    assert decode_figures(pg, Measurement(samples_ns=[3], decode_samples_ns=[1_000_000_000]), facts, hw, 9.0)["decode_ts"] == 2.0
    assert decode_figures(job(kind="pp", n_prompt=8), Measurement(samples_ns=[1]), facts, hw, 1.0) == {}
    assert energy_per_token_j(tg, None, 5) is None
    # (n_warmup 2 + 4 repetitions) x (995 context + 9 generated) tokens for 6024 J
    assert energy_per_token_j(tg, 0, 6_024_000) == pytest.approx(1.0)


def test_float_mean_and_stdev_agree_with_the_exact_ones():
    import random
    import statistics

    from farm.stats import summarize

    rng = random.Random(3)
    for n in (2, 3, 5, 30):
        samples = [rng.randrange(10**6, 10**9) for _ in range(n)]
        rates = [1000 * 1e9 / ns for ns in samples]
        mean, std = summarize(1000, samples)
        assert math.isclose(mean, statistics.fmean(rates), rel_tol=1e-12)
        assert math.isclose(std, statistics.stdev(rates), rel_tol=1e-9)
