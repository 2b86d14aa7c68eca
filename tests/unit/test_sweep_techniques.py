"""Sweep expansion of the speculation and MTP techniques: each option list multiplies only the
jobs of the technique that reads it, and a Job refuses options its technique cannot run."""


import pytest
from pydantic import ValidationError

from farm.contract import Job
from orchestrator.planning import plan
from orchestrator.sweep import SweepError, SweepSpec


def spec(**kw) -> SweepSpec:
    base = dict(name="t", models=["smollm2-135m"], quants=["F32"], n_prompt=[32], n_gen=[16], prompt_categories=["code"])
    return SweepSpec(**{**base, **kw})


def test_technique_options_multiply_only_their_own_jobs():
    jobs = plan(spec(engines=["torch"], techniques=["baseline", "mtp", "lookup", "spec"], n_mtp=[1, 2],
                       draft_models=[{"name": "smollm2-135m", "quants": ["Q4_0"]}], n_draft=[2, 4], ngram_max=[3]))
    by = {}
    for j in jobs:
        by.setdefault(j.technique, []).append(j)
    assert [j.test for j in by["baseline"]] == ["pp32", "tg16"]
    # Techniques only speed up decoding: no pp jobs for them.
    assert sorted(j.n_mtp for j in by["mtp"]) == [1, 2] and {j.kind for j in by["mtp"]} == {"tg"}
    assert sorted(j.n_draft for j in by["lookup"]) == [2, 4] and all(j.n_mtp == 0 for j in by["lookup"])
    assert sorted(j.n_draft for j in by["spec"]) == [2, 4]
    assert {(j.draft_model, j.draft_quant) for j in by["spec"]} == {("smollm2-135m", "Q4_0")}
    assert [j.index for j in jobs] == list(range(len(jobs)))


def test_llamacpp_mtp_needs_nextn_layers_and_spec_needs_drafts():
    # llama.cpp drafts with the file's own NextN layers: a plain file is refused at submit (issue 15).
    with pytest.raises(SweepError, match="this file carries no MTP layers; use engine torch with trained heads, "
                                         "or an MTP build of the model"):
        plan(spec(engines=["llamacpp", "torch"], techniques=["mtp"]))
    jobs = plan(spec(models=["smollm2-135m-mtp"], engines=["llamacpp"], techniques=["mtp"], n_mtp=[1, 2, 3]))
    assert {(j.engine, j.n_mtp) for j in jobs} == {("llamacpp", 1), ("llamacpp", 2), ("llamacpp", 3)}
    with pytest.raises(SweepError, match="draft_models"):
        plan(spec(engines=["torch"], techniques=["spec"]))


def test_job_refuses_techniques_without_their_options():
    common = dict(job_id="j", sweep_id="s", index=0, model="m", quant="F32", kind="tg", n_gen=8, prompt_category="code")
    with pytest.raises(ValidationError, match="n_mtp >= 1"):
        Job(**common, technique="mtp", engine="llamacpp", n_mtp=0)
    with pytest.raises(ValidationError, match="draft_model"):
        Job(**common, technique="spec", engine="torch", n_draft=2)
    with pytest.raises(ValidationError, match="ngram_max"):
        Job(**common, technique="lookup", engine="torch", n_draft=2)
    assert Job(**common, technique="mtp", engine="torch", n_mtp=2).n_mtp == 2


def test_mtp_jobs_vary_over_the_confidence_threshold_and_lookup_does_not():
    jobs = plan(spec(engines=["torch"], techniques=["mtp", "lookup"], n_mtp=[1], p_min=[0.0, 0.3],
                       n_draft=[3], ngram_max=[3]))
    assert sorted(j.p_min for j in jobs if j.technique == "mtp") == [0.0, 0.3]
    assert [j.p_min for j in jobs if j.technique == "lookup"] == [0.0]


def test_the_mtp_example_puts_every_technique_on_both_engines_over_one_file():
    # Issue 15: the torch engine reads the MTP build too, so one sweep compares llama.cpp's MTP,
    # draft-model spec, each lookup mode and torch's MTP on the same model, on both engines.
    from pathlib import Path

    from orchestrator.sweep import load_spec

    example = Path(__file__).resolve().parents[2] / "examples" / "mtp-llamacpp.yaml"
    jobs = plan(load_spec(example), base_dir=example.parent)
    assert {j.model for j in jobs} == {"smollm2-135m-mtp"}
    combos = {(j.engine, j.technique, j.lookup_mode if j.technique == "lookup" else "", j.n_mtp) for j in jobs}
    modes = ["longest", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-cache"]
    for engine in ("llamacpp", "torch"):
        want = {(engine, "baseline", "", 0), (engine, "spec", "", 0)}
        want |= {(engine, "mtp", "", n) for n in (1, 2, 3)} | {(engine, "lookup", m, 0) for m in modes}
        assert want <= combos, sorted(want - combos)
    assert len(combos) == 2 * (2 + 3 + len(modes))
    assert {(j.n_prompts, j.n_gen) for j in jobs} == {(2, 32)} and len(jobs) == 40
