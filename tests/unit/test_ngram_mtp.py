"""llama.cpp's n-gram drafter modes as Job fields (issue 15; the drafters' rules are
tests/unit/test_ngram.py's), the mtp job rules on the llama.cpp engine, and the refusal at submit
of a file without NextN layers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from farm.contract import TECHNIQUE_FIELDS, Job, Result
from worker.speculative import NgramDrafter, make_drafter

BASE = dict(job_id="j", sweep_id="s", index=0, model="m", quant="F32", kind="tg", n_gen=8, prompt_category="code")


def test_lookup_mode_is_a_job_field_echoed_by_results():
    job = Job(**BASE, engine="llamacpp", technique="lookup", n_draft=4, ngram_max=3, lookup_mode="ngram-map-k4v",
              ngram_min_hits=2)
    assert isinstance(make_drafter(job, target=None), NgramDrafter)
    assert {"lookup_mode", "ngram_size_n", "ngram_min_hits"} <= set(TECHNIQUE_FIELDS)
    r = Result.failed(job, "w", "x")
    assert r.lookup_mode == "ngram-map-k4v" and r.ngram_min_hits == 2
    with pytest.raises(ValidationError):
        Job(**BASE, engine="llamacpp", technique="lookup", n_draft=4, ngram_max=3, lookup_mode="ngram-mod")


def test_mtp_runs_on_llamacpp_but_not_sampled_and_not_without_tokens_to_draft():
    Job(**BASE, engine="llamacpp", technique="mtp", n_mtp=2)
    with pytest.raises(ValidationError, match="n_mtp >= 1"):
        Job(**BASE, engine="llamacpp", technique="mtp", n_mtp=0)
    with pytest.raises(ValidationError, match="torch engine only"):
        Job(**BASE, engine="llamacpp", technique="mtp", n_mtp=2, temperature=0.7)


def test_submit_refuses_llamacpp_mtp_on_a_file_without_nextn_layers(tmp_path):
    from farm.contract import ModelFacts
    from orchestrator.planning import check_mtp_files
    from orchestrator.sweep import SweepError

    job = Job(**{**BASE, "model": "hf://o/r/plain.gguf"}, engine="llamacpp", technique="mtp", n_mtp=1)
    plain = ModelFacts(arch="llama", file_type="F32", n_layer=30)
    with pytest.raises(SweepError, match="this file carries no MTP layers; use engine torch with trained heads, "
                                         "or an MTP build of the model"):
        check_mtp_files([job], tmp_path, {job.model: plain})
    check_mtp_files([job], tmp_path, {job.model: plain.model_copy(update={"n_nextn_layers": 1})})
    torch_job = job.model_copy(update={"engine": "torch"})
    check_mtp_files([torch_job], tmp_path, {job.model: plain})  # torch: the project's heads, not the file's


def test_the_mtp_build_name_is_planned_from_its_parent(tmp_path):
    from farm.memory import facts_for

    facts = facts_for("smollm2-135m-mtp", "Q8_0", tmp_path)
    assert facts.n_nextn_layers == 1 and facts.arch == "glm4moe" and facts.file_type == "Q8_0"


def lookup_job(**kw) -> Job:
    return Job(**BASE, engine="llamacpp", technique="lookup", n_draft=4, **{"ngram_max": 3, **kw})


def test_lookup_jobs_refuse_settings_their_drafter_would_ignore():
    with pytest.raises(ValidationError, match="fixed 1- to 4-grams: its ngram_max is 4, not 3"):
        lookup_job(lookup_mode="ngram-cache")
    with pytest.raises(ValidationError, match="ngram_size_n does not apply"):
        lookup_job(lookup_mode="ngram-cache", ngram_max=4, ngram_size_n=2)
    with pytest.raises(ValidationError, match="apply to lookup_mode ngram-cache, not ngram-simple"):
        lookup_job(lookup_mode="ngram-simple", lookup_cache_static="static.bin")
    # llama.cpp takes --spec-ngram-map-k-min-hits but its key-only map never reads it.
    with pytest.raises(ValidationError, match="ngram_min_hits applies to lookup_mode ngram-map-k4v only"):
        lookup_job(lookup_mode="ngram-map-k", ngram_min_hits=2)
    with pytest.raises(ValidationError, match="lookup_mode longest matches up to ngram_max"):
        lookup_job(ngram_size_n=2)


def test_ngram_cache_job_loads_its_cache_files_and_results_echo_them(tmp_path):
    from farm.lookupcache import write_lookup_cache
    from worker.engines.base import EngineError
    from worker.ngram import NgramCacheDrafter

    static = tmp_path / "static.bin"
    write_lookup_cache({(1, 2): {3: 4}}, static)
    job = lookup_job(lookup_mode="ngram-cache", ngram_max=4, lookup_cache_static=str(static))
    drafter = make_drafter(job, target=None)
    assert isinstance(drafter, NgramCacheDrafter) and drafter.static == {(1, 2): {3: 4}} and drafter.dynamic == {}
    r = Result.failed(job, "w", "x")
    echoed = (r.lookup_mode, r.ngram_max, r.lookup_cache_static, r.lookup_cache_dynamic)
    assert echoed == ("ngram-cache", 4, str(static), "")
    gone = job.model_copy(update={"lookup_cache_dynamic": str(tmp_path / "gone.bin")})
    with pytest.raises(EngineError, match="cannot read the dynamic lookup cache .*gone.bin: No such file"):
        make_drafter(gone, target=None)


def sweep(**kw):
    from orchestrator.sweep import SweepSpec

    base = dict(name="t", models=["smollm2-135m"], quants=["F32"], n_prompt=[0], n_gen=[16], prompt_categories=["code"],
                techniques=["lookup"], n_draft=[4])
    return SweepSpec(**{**base, **kw})


def test_sweep_multiplies_ngram_cache_by_its_files_not_by_ngram_max(tmp_path):
    from farm.lookupcache import write_lookup_cache
    from orchestrator.planning import plan
    from orchestrator.sweep import count_jobs

    write_lookup_cache({(1,): {2: 1}}, tmp_path / "corpus.bin")
    spec = sweep(lookup_mode=["ngram-simple", "ngram-cache"], ngram_max=[2, 3], lookup_cache_static=["", "corpus.bin"])
    jobs = plan(spec, base_dir=tmp_path)
    got = [(j.lookup_mode, j.ngram_max, j.lookup_cache_static) for j in jobs]
    assert got == [("ngram-simple", 2, ""), ("ngram-simple", 3, ""),
                   ("ngram-cache", 4, ""), ("ngram-cache", 4, str(tmp_path / "corpus.bin"))]
    assert count_jobs(spec) == len(jobs)
    # A cache file listed for ngram-cache leaves the other modes' jobs alone.
    assert all(not j.lookup_cache_static for j in jobs if j.lookup_mode != "ngram-cache")


def test_sweep_refuses_cache_files_it_cannot_use_in_one_line(tmp_path):
    from orchestrator.planning import plan
    from orchestrator.sweep import SweepError, load_spec

    path = tmp_path / "s.yaml"
    path.write_text("name: t\nmodels: [smollm2-135m]\ntechniques: [lookup]\nprompt_categories: [code]\n"
                    "lookup_mode: [ngram-simple]\nlookup_cache_static: [corpus.bin]\n")
    with pytest.raises(SweepError, match="lookup_cache_static is read by lookup_mode ngram-cache only; add "
                                         "ngram-cache to lookup_mode"):
        load_spec(path)
    with pytest.raises(SweepError, match="lookup_cache_dynamic 'gone.bin': cannot read the file "
                                         r"\(No such file or directory\)"):
        plan(sweep(lookup_mode=["ngram-cache"], lookup_cache_dynamic=["gone.bin"]), base_dir=tmp_path)
    (tmp_path / "text.bin").write_bytes(b"not a cache")
    with pytest.raises(SweepError, match="lookup_cache_static: .*text.bin: 11 bytes is not a whole number of int32"):
        plan(sweep(lookup_mode=["ngram-cache"], lookup_cache_static=["text.bin"]), base_dir=tmp_path)


def test_the_break_even_map_names_each_lookup_drafter_apart():
    from orchestrator.report import lookup_name

    longest, simple = lookup_job(), lookup_job(lookup_mode="ngram-simple")
    cache = lookup_job(lookup_mode="ngram-cache", ngram_max=4, lookup_cache_static="/data/wiki.bin")
    names = [lookup_name(Result.failed(j, "w", "x")) for j in (longest, simple, cache)]
    assert names == ["(lookup)", "(lookup ngram-simple)", "(lookup ngram-cache, static wiki.bin)"]
