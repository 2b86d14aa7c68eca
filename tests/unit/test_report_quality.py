"""KLD and top-1 columns in `tokenfarm results --format md` and the leaderboard rows, when measured."""

import re

from orchestrator.planning import plan
from orchestrator.ranking import leaderboard
from orchestrator.report import leader_cells, render_results
from orchestrator.sweep import SweepSpec
from tests.unit.test_collector import result_for
from tests.unit.test_collector_quality import REF, block


def results():
    jobs = plan(SweepSpec(name="q", models=[{"name": "smollm2-135m", "quants": ["F32", "Q4_0"]}], n_prompt=[16],
                          n_gen=[8], repetitions=2, quality=True, quality_n_ctx=32, quality_n_chunks=2), sweep_id="s")
    out = []
    for j in jobs:
        q = block(REF, same=j.quant == "F32") if j.quality else None
        out.append(result_for(j, model_sha256=REF if j.quant == "F32" else "b" * 64, quality=q))
    return out


def test_markdown_shows_quality_columns_only_when_measured():
    rs = results()
    md = render_results(rs, "md")
    assert re.search(r"\| +KLD +\| +top-1 +\| +ppl +\|", md.splitlines()[0])
    q4 = next(r for r in rs if r.quality and r.quant == "Q4_0").quality
    assert re.search(rf"{q4.kld_mean:.5f} +\| +{q4.top1_agreement:.4f}", md)
    assert "KLD" not in render_results([r.model_copy(update={"quality": None}) for r in rs], "md")


def test_leaderboard_rows_carry_the_files_quality():
    rows = {r.quant: r for r in leaderboard(results())}
    assert rows["F32"].kld_mean == 0.0 and rows["F32"].top1_agreement == 1.0
    assert rows["Q4_0"].kld_mean > 0 and leader_cells(rows["Q4_0"])[-2] == f"{rows['Q4_0'].kld_mean:.4f}"
