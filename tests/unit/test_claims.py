"""claims on hand-made Results: each claim's verdicts (holds, refuted, not enough data) where the answer is known."""

from orchestrator.claims import (
    HOLDS,
    REFUTED,
    THIN,
    claim_lossless,
    claim_moe_active_speed,
    claim_moe_memory,
    claim_mtp,
    claim_prefill_untouched,
    claim_reading_speed,
    claim_spec_gain,
    claim_spec_poor_draft,
    claims,
)
from tests.results_factory import GIB, cpu, gpu, result, speculation


def verdicts(report):
    return {f.hardware_class: f.verdict for f in report.findings}


def mtp(speedup, acc):
    return result("t", "F16", "tg", 10 * speedup, technique="mtp", n_mtp=1, spec=speculation(speedup, acc))


def test_mtp_holds_refuted_and_thin():
    assert verdicts(claim_mtp([mtp(1.8, 0.87), mtp(1.7, 0.86)])) == {"GPU 12 GB": HOLDS}
    refuted = claim_mtp([mtp(1.1, 0.88), mtp(1.2, 0.9)])
    assert refuted.verdict == REFUTED and "median 1.15x at second-token acceptance 0.89" in refuted.findings[0].numbers
    assert claim_mtp([mtp(1.8, 0.87)]).verdict == THIN  # one run is not evidence
    low = claim_mtp([mtp(1.2, 0.5), mtp(1.3, 0.55)])
    assert low.verdict == THIN and "no run at 80%-95%" in low.findings[0].numbers
    # Second-token acceptance is the first draft position's, not the overall rate.
    deep = result("t", "F16", "tg", 18, technique="mtp", n_mtp=2, spec=speculation(1.8, 0.5, by_position=[0.88, 0.2]))
    assert claim_mtp([deep, deep]).verdict == HOLDS


def spec(speedup, acc, hw=None, lossless=True):
    return result("t", "F16", "tg", 10 * speedup, technique="spec", draft_quant="Q4_0", hardware=hw,
                  spec=speculation(speedup, acc, lossless=lossless))


def test_spec_gain_per_hardware_class():
    runs = [spec(2.0, 0.8), spec(1.8, 0.7), spec(1.1, 0.75, cpu()), spec(1.2, 0.8, cpu()), spec(0.5, 0.2)]
    report = claim_spec_gain(runs)
    assert verdicts(report) == {"GPU 12 GB": HOLDS, "CPU-only": REFUTED}
    assert report.verdict == REFUTED and "median 1.90x" in report.findings[0].numbers
    assert claim_spec_gain([spec(0.5, 0.2)]).verdict == THIN


def test_poor_draft_slower_than_none():
    assert claim_spec_poor_draft([spec(0.8, 0.3), spec(1.05, 0.35)]).verdict == HOLDS
    refuted = claim_spec_poor_draft([spec(1.1, 0.3), spec(1.05, 0.35)])
    assert refuted.verdict == REFUTED and refuted.findings[0].numbers.startswith("0 of 2 poor-draft runs slower")
    assert claim_spec_poor_draft([spec(2.0, 0.9), spec(2.0, 0.9)]).verdict == THIN


def decode(model, ts, size_gb, active_gb=0.0, n_expert=0, hw=None):
    return result(model, "Q4_0", "tg", ts, hardware=hw or gpu(bandwidth_gbps=360.0), size_bytes=int(size_gb * GIB),
                  active_bytes=int(active_gb * GIB), n_expert=n_expert)


def test_moe_decodes_at_its_active_size():
    # 360 GB/s: a dense 4 GiB file's roofline is ~84 tok/s; it reaches 50 % of it.
    dense = decode("dense", 42.0, 4)
    fast_moe = decode("moe", 150.0, 16, active_gb=1, n_expert=8)  # ~45 % of bandwidth / active bytes
    slow_moe = decode("moe", 25.0, 16, active_gb=1, n_expert=8)  # tracks its total size instead
    assert claim_moe_active_speed([dense, fast_moe]).verdict == HOLDS
    refuted = claim_moe_active_speed([dense, slow_moe])
    assert refuted.verdict == REFUTED and "ratio 0.15" in refuted.findings[0].numbers
    assert claim_moe_active_speed([fast_moe]).verdict == THIN  # nothing dense to compare with


def test_lossless():
    assert claim_lossless([spec(2.0, 0.8), mtp(1.8, 0.9)]).verdict == HOLDS
    refuted = claim_lossless([spec(2.0, 0.8), spec(2.0, 0.8, lossless=False)])
    assert refuted.verdict == REFUTED and "1 of 2 greedy runs diverged (spec 1/2), earliest at token 3" \
        in refuted.findings[0].numbers
    assert claim_lossless([decode("d", 10, 1)]).verdict == THIN


def test_prefill_untouched():
    base = result("t", "F16", "pp", 500.0)
    same = result("t", "F16", "pp", 480.0, technique="spec", draft_quant="Q4_0")
    worse = result("t", "F16", "pp", 300.0, technique="spec", draft_quant="Q4_0")
    assert claim_prefill_untouched([base, same]).verdict == HOLDS
    assert claim_prefill_untouched([base, worse]).verdict == REFUTED
    thin = claim_prefill_untouched([base, spec(2.0, 0.8)], classes=["GPU 12 GB"])
    assert thin.verdict == THIN and "decode (tg) tests" in thin.findings[0].numbers


def test_moe_memory_is_its_total_size():
    full = result("moe", "Q4_0", "tg", 50, size_bytes=16 * GIB, active_bytes=GIB, n_expert=8, peak_bytes=17 * GIB)
    paged = result("moe", "Q4_0", "tg", 50, size_bytes=16 * GIB, active_bytes=GIB, n_expert=8, peak_bytes=4 * GIB,
                   hardware=cpu())
    report = claim_moe_memory([full, paged])
    assert verdicts(report) == {"GPU 12 GB": HOLDS, "CPU-only": REFUTED}
    assert "peak memory 1.06x the file's total size (active weights 0.06x of it)" in report.findings[0].numbers
    assert claim_moe_memory([decode("dense", 10, 1)]).verdict == THIN


def test_reading_speed_names_the_largest_model_over_each_line():
    small = result("small", "Q4_0", "tg", 45.0, n_params=1_000_000_000)
    big = result("big", "Q4_0", "tg", 8.0, n_params=8_000_000_000, size_bytes=5 * GIB)
    report = claim_reading_speed([small, big])
    numbers = report.findings[0].numbers
    assert report.verdict == HOLDS
    assert ">= 7 tok/s: big Q4_0 baseline (8.0 tok/s, 8 GB tier)" in numbers
    assert ">= 10 tok/s: small" in numbers and ">= 30 tok/s: small Q4_0 baseline (45.0 tok/s" in numbers
    assert claim_reading_speed([result("slow", "F16", "tg", 3.0)]).verdict == REFUTED


def test_every_claim_answers_on_an_empty_farm_and_flagged_workers_are_no_evidence():
    reports = claims([])
    assert len(reports) == 8 and all(r.verdict == THIN and r.query and r.test for r in reports)
    liar = [mtp(1.8, 0.87), mtp(1.8, 0.87)]
    for r in liar:
        r.worker = "liar"
    assert claims(liar, flagged_workers={"liar"})[0].verdict == THIN
    assert claims(liar)[0].verdict == HOLDS


def test_classes_read_smallest_gpu_tier_first_then_cpu():
    runs = [spec(2.0, 0.8, gpu(vram_gb=80)), spec(2.0, 0.8, gpu(vram_gb=8)), spec(2.0, 0.8, cpu())] * 2
    assert [f.hardware_class for f in claim_spec_gain(runs).findings] == ["GPU 8 GB", "GPU 80 GB", "CPU-only"]
