"""recommend on hand-made Results whose right answer is known."""

import pytest

from orchestrator.recommend import THIN_RESULTS, recommend
from tests.results_factory import GIB, cpu, quality, result, speculation


def ladder():
    """One model in three quants on one 12 GB GPU: Q2_K fastest but worst, Q8_0 slowest but best."""
    out = []
    for quant, ts, size, kld, top1 in (("Q2_K", 90.0, 3 * GIB, 0.40, 0.80), ("Q4_K_M", 70.0, 5 * GIB, 0.03, 0.96),
                                       ("Q8_0", 40.0, 9 * GIB, 0.001, 0.995)):
        out += [result("m", quant, "tg", ts, size_bytes=size, peak_bytes=size + GIB, q=quality(kld, top1)),
                result("m", quant, "pp", ts * 20, size_bytes=size, peak_bytes=size + GIB)]
    return out


def test_ranked_by_decode_within_the_memory_asked_for():
    report = recommend(ladder(), vram_gb=8)
    # Q8_0 needs 10 GiB: it does not fit 8.
    assert [(r.quant, round(r.tg_ts)) for r in report.rows] == [("Q2_K", 90), ("Q4_K_M", 70)]
    top = report.rows[0]
    assert round(top.pp_ts) == 1800 and top.memory_bytes == 4 * GIB and top.memory_limit_bytes == 8 * GIB
    assert top.quality.kld_mean == pytest.approx(0.40) and "top-1 80.0%" in top.quality_text
    assert recommend(ladder(), vram_gb=12).rows[-1].quant == "Q8_0"


def test_min_agreement_drops_the_lossy_quant_and_says_so():
    report = recommend(ladder(), vram_gb=12, min_agreement=0.95)
    assert [r.quant for r in report.rows] == ["Q4_K_M", "Q8_0"]
    assert report.n_excluded_quality == 1 and any("top-1 agreement below 95%" in n for n in report.notes)


def test_quality_absent_reads_not_measured_and_min_agreement_excludes_it():
    plain = [result("m", "Q4_0", "tg", 50.0)]
    report = recommend(plain, vram_gb=8)
    assert report.rows[0].quality is None and report.rows[0].quality_text == "quality not measured"
    assert any("quality not measured" in n for n in report.notes)
    assert recommend(plain, vram_gb=8, min_agreement=0.9).rows == []


def test_a_flagged_worker_is_never_recommended():
    honest = result("m", "Q4_0", "tg", 30.0, worker="honest")
    liar = result("m", "Q2_K", "tg", 999.0, worker="liar")
    report = recommend([honest, liar], vram_gb=8, flagged_workers={"liar"})
    assert [r.quant for r in report.rows] == ["Q4_0"] and report.n_flagged_results == 1
    assert recommend([honest, liar], vram_gb=8).rows[0].quant == "Q2_K"


def test_thin_data_is_said_plainly_with_counts():
    report = recommend(ladder(), vram_gb=8)
    assert report.thin and report.n_results == 4 and report.n_workers == 1
    assert report.data_statement().startswith("thin data: 4 results from 1 worker fit 8 GB VRAM")
    many = [result("m", "Q4_0", "tg", 10.0 + i % 3, worker=f"w{i % 3}") for i in range(THIN_RESULTS)]
    full = recommend(many, vram_gb=8)
    assert not full.thin and full.data_statement() == f"{THIN_RESULTS} results from 3 workers fit 8 GB VRAM"
    assert recommend([], vram_gb=8).data_statement().startswith("no data")


def test_the_technique_that_gives_the_speed_is_named_with_its_figures():
    base = result("t", "Q4_K_M", "tg", 20.0)
    spec = result("t", "Q4_K_M", "tg", 34.0, technique="spec", draft_quant="Q4_0", spec=speculation(1.7, 0.78))
    report = recommend([base, spec], vram_gb=8)
    assert [r.technique for r in report.rows] == ["spec", "baseline"]
    assert report.rows[0].how == "Q4_K_M + spec with draft Q4_0 draft: 1.70x at 0.78 acceptance, lossless"
    assert report.rows[1].how == "Q4_K_M, plain decoding"


def test_workload_keeps_technique_runs_of_its_own_prompts():
    code_spec = result("t", "Q4_0", "tg", 60.0, technique="spec", category="code", spec=speculation(3.0, 0.9))
    chat_spec = result("t", "Q4_0", "tg", 25.0, technique="spec", category="chat", spec=speculation(1.2, 0.5))
    assert recommend([code_spec, chat_spec], vram_gb=8, workload="code").rows[0].tg_ts == pytest.approx(60.0, rel=1e-3)
    assert recommend([code_spec, chat_spec], vram_gb=8, workload="chat").rows[0].tg_ts == pytest.approx(25.0, rel=1e-3)


def test_ram_admits_what_a_cpu_box_measured_beyond_the_vram():
    big_cpu = result("big", "Q4_0", "tg", 4.0, hardware=cpu(), size_bytes=20 * GIB, peak_bytes=21 * GIB)
    assert recommend([big_cpu], vram_gb=8).rows == []
    rows = recommend([big_cpu], vram_gb=8, ram_gb=32).rows
    assert rows[0].fits == "RAM" and rows[0].memory_limit_bytes == 32 * GIB


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="use one of chat, code"):
        recommend([], vram_gb=8, workload="poetry")
    with pytest.raises(ValueError, match="positive"):
        recommend([], vram_gb=0)


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    from orchestrator.recommend import pareto_front

    # (tok/s, KLD): fast-lossy and slow-faithful are both on the front; the middle one is beaten by (80, 0.02).
    points = [(90.0, 0.4), (70.0, 0.03), (80.0, 0.02), (40.0, 0.0), (40.0, 0.0)]
    assert pareto_front(points) == [True, False, True, True, True]


def test_speeds_come_from_boxes_of_the_class_asked_for_when_there_are_any():
    from tests.results_factory import gpu

    small = result("m", "Q4_0", "tg", 40.0, hardware=gpu("RTX 2070", vram_gb=8, bandwidth_gbps=448))
    big = result("m", "Q4_0", "tg", 300.0, hardware=gpu("H100", vram_gb=80, bandwidth_gbps=3350))
    report = recommend([small, big], vram_gb=8)
    assert [r.hardware for r in report.rows] == ["RTX 2070"]
    assert "speeds measured on boxes of this class (GPUs of the 8 GB tier)" in report.notes
    # Nothing of the class measured: the other hardware's figures, named, and said so.
    report = recommend([big], vram_gb=8)
    assert [r.hardware for r in report.rows] == ["H100"] and report.notes[0].startswith("no box of this class")
