"""llama.cpp's n-gram drafter modes (issue 15), the mtp job rules on the llama.cpp engine, and the
refusal at submit of a file without NextN layers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from farm.contract import TECHNIQUE_FIELDS, Job, Result
from worker.speculative import NgramDrafter, make_drafter

BASE = dict(job_id="j", sweep_id="s", index=0, model="m", quant="F32", kind="tg", n_gen=8, prompt_category="code")


def test_ngram_simple_copies_what_followed_the_latest_earlier_key():
    seq = [1, 2, 3, 7, 8, 9, 10, 5, 2, 3, 4, 4, 6, 6, 0, 0, 0, 1, 2, 3]
    d = NgramDrafter("ngram-simple", n_draft=3, size_n=3)
    # Key (1, 2, 3): inp ends ... 1, 2 and sampled 3; its earlier occurrence at 0 is skipped (j > 0),
    # so the key (2, 3) of size 2 finds position 8 (the latest): 4, 4, 6 follow.
    assert d.propose(seq, 8) == []  # position 0 never counts, as in llama.cpp
    d2 = NgramDrafter("ngram-simple", n_draft=3, size_n=2)
    assert d2.propose(seq, 8) == [4, 4, 6]
    assert d2.propose(seq, 2) == [4, 4]  # never past the goal
    assert d2.propose(seq[:5], 8) == []  # too short a history


def test_ngram_map_k_needs_min_hits_and_k4v_picks_the_most_frequent_value():
    seq = [9, 5, 6, 1, 1, 5, 6, 2, 2, 5, 6, 2, 2, 5, 6, 1, 1, 0, 0, 0, 5, 6]
    assert NgramDrafter("ngram-map-k", 2, 2, min_hits=5).propose(seq, 8) == []
    assert NgramDrafter("ngram-map-k", 2, 2, min_hits=2).propose(seq, 8) == [1, 1]  # the latest
    # Values after (5, 6): (1, 1) twice, (2, 2) twice; ties go to the latest seen first: (1, 1).
    assert NgramDrafter("ngram-map-k4v", 2, 2, min_hits=2).propose(seq, 8) == [1, 1]
    seq2 = seq[:-2] + [5, 6, 2, 2, 0, 5, 6]
    assert NgramDrafter("ngram-map-k4v", 2, 2, min_hits=2).propose(seq2, 8) == [2, 2]
    assert NgramDrafter("ngram-map-k4v", 2, 2, min_hits=4).propose(seq2, 8) == []


def test_lookup_mode_is_a_job_field_echoed_by_results():
    job = Job(**BASE, engine="llamacpp", technique="lookup", n_draft=4, ngram_max=3, lookup_mode="ngram-map-k4v",
              ngram_min_hits=2)
    assert isinstance(make_drafter(job, target=None), NgramDrafter)
    assert {"lookup_mode", "ngram_size_n", "ngram_min_hits"} <= set(TECHNIQUE_FIELDS)
    r = Result.failed(job, "w", "x")
    assert r.lookup_mode == "ngram-map-k4v" and r.ngram_min_hits == 2
    with pytest.raises(ValidationError):
        Job(**BASE, engine="llamacpp", technique="lookup", n_draft=4, ngram_max=3, lookup_mode="ngram-cache")


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
