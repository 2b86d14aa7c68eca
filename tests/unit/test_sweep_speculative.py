"""Sweeps of decode techniques: expansion over drafts, n_draft, p_min and categories; pairs refused up front."""

from pathlib import Path

import gguf
import pytest

from orchestrator.planning import plan
from orchestrator.sweep import SweepError, SweepSpec


def tiny_gguf(path: Path, tokens: list[str]) -> Path:
    """A GGUF file with a tokenizer and one tensor: enough for header checks, not to run."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_token_list(tokens)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def spec_sweep(**kw) -> SweepSpec:
    base = dict(name="s", models=[{"name": "smollm2-135m", "quants": ["F32"]}], n_prompt=[], n_gen=[16],
                techniques=["baseline", "spec", "lookup"],
                draft_models=[{"name": "smollm2-135m", "quants": ["Q4_0", "Q2_K"]}],
                n_draft=[2, 4, 8], p_min=[0.0, 0.5], prompt_categories=["code", "qa"], n_prompts=2)
    return SweepSpec(**{**base, **kw})


def test_techniques_expand_over_their_own_options_and_categories():
    jobs = plan(spec_sweep(), sweep_id="s")
    by_tech = {t: [j for j in jobs if j.technique == t] for t in ("baseline", "spec", "lookup")}
    assert len(by_tech["baseline"]) == 2  # one per category
    assert len(by_tech["spec"]) == 2 * 3 * 2 * 2  # drafts x n_draft x p_min x categories
    assert len(by_tech["lookup"]) == 1 * 3 * 2  # ngram_max x n_draft x categories
    assert {(j.draft_quant, j.n_draft, j.p_min) for j in by_tech["spec"]} == {
        (q, n, p) for q in ("Q4_0", "Q2_K") for n in (2, 4, 8) for p in (0.0, 0.5)}
    assert all(j.prompt_category in ("code", "qa") and j.n_prompts == 2 and j.kind == "tg" for j in jobs)
    assert all(j.draft_model is None for j in by_tech["lookup"] + by_tech["baseline"])


def test_a_prefill_test_runs_only_as_baseline():
    jobs = plan(spec_sweep(n_prompt=[32]), sweep_id="s")
    pp = [j for j in jobs if j.kind == "pp"]
    assert len(pp) == 1 and pp[0].technique == "baseline" and pp[0].prompt_category is None


def test_decode_techniques_need_what_they_use():
    with pytest.raises(SweepError, match="prompt_categories"):
        plan(spec_sweep(prompt_categories=None))
    with pytest.raises(SweepError, match="draft_models"):
        plan(spec_sweep(draft_models=[]))
    with pytest.raises(ValueError, match="unknown prompt category"):
        spec_sweep(prompt_categories=["poems"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        spec_sweep(p_min=[1.5])


def test_a_draft_with_another_vocabulary_is_refused_from_the_headers(tmp_path):
    target = tiny_gguf(tmp_path / "target.gguf", ["<s>", "a", "b", "c"])
    same = tiny_gguf(tmp_path / "same.gguf", ["<s>", "a", "b", "c"])
    other = tiny_gguf(tmp_path / "other.gguf", ["<s>", "a", "x", "c"])
    shorter = tiny_gguf(tmp_path / "shorter.gguf", ["<s>", "a", "b"])
    spec = dict(models=[str(target)], draft_models=[str(same)], prompt_categories=["qa"], techniques=["spec"])
    assert len(plan(spec_sweep(**spec), sweep_id="s")) == 3 * 2  # n_draft x p_min
    with pytest.raises(SweepError, match=r"token 2 is b'x' in the draft but b'b' in the target"):
        plan(spec_sweep(**{**spec, "draft_models": [str(other)]}))
    with pytest.raises(SweepError, match="3 tokens, the target's 4"):
        plan(spec_sweep(**{**spec, "draft_models": [str(shorter)]}))


def test_an_upcycled_moe_target_is_checked_against_its_parent_s_vocabulary(tmp_path):
    """A derived MoE has no file of its own on the orchestrator: the pair check reads its
    catalogue parent's header, whose vocabulary the upcycle keeps."""
    from farm.modelfiles import catalogue_path

    models_dir = tmp_path / "models"
    parent = catalogue_path("smollm2-135m", models_dir)
    parent.parent.mkdir(parents=True)
    tiny_gguf(parent, ["<s>", "a", "b", "c"])
    other = tiny_gguf(tmp_path / "other.gguf", ["<s>", "a", "x", "c"])
    spec = spec_sweep(models=["smollm2-135m-moe8x2"], draft_models=[str(other)], prompt_categories=["qa"],
                      techniques=["spec"])
    with pytest.raises(SweepError, match=r"cannot serve target 'smollm2-135m-moe8x2'.*token 2 is b'x'"):
        plan(spec, sweep_id="s", models_dir=models_dir)
