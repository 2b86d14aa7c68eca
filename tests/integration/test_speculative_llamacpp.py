"""Speculative decoding and prompt lookup on real llama.cpp: exact on an F32 target, KV rollback, pair check."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from farm.contract import EngineConfig, Job
from farm.prompts import load_prompts
from orchestrator.validation import result_problems
from tests.integration.conftest import MODELS_DIR
from worker.ngram import NgramCacheDrafter
from worker.speculative import (
    LookupDrafter,
    ModelDrafter,
    NgramDrafter,
    check_vocab_pair,
    greedy,
    speculative,
)

pytestmark = pytest.mark.integration

N_GEN = 24


@pytest.fixture(scope="module")
def paths(smollm2) -> dict[str, Path]:
    from worker.models import resolve

    return {q: resolve("smollm2-135m", q, MODELS_DIR)[0] for q in ("F32", "Q4_0")}


def loaded(path: Path):
    from worker.engines.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend()
    backend.load(path, EngineConfig(n_threads=1), 2048)
    return backend


@pytest.fixture(scope="module")
def target(paths):
    backend = loaded(paths["F32"])
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def prompts(target) -> list[list[int]]:
    texts = load_prompts("code", 1) + load_prompts("rewriting", 1)
    return [target.tokenize(target.chat_prompt(t), add_bos=True, special=True) for t in texts]


def test_spec_and_lookup_reproduce_greedy_token_for_token_on_an_f32_target(target, paths, prompts):
    draft = loaded(paths["Q4_0"])
    try:
        check_vocab_pair(target.token_texts(), draft.token_texts())
        for prompt in prompts:
            base = greedy(target, prompt, N_GEN)
            for n_draft in (2, 5):
                run = speculative(target, ModelDrafter(draft, n_draft), prompt, N_GEN)
                assert run.tokens == base.tokens, f"spec n_draft={n_draft}"
                assert run.n_drafted > 0 and run.n_passes < N_GEN
            run = speculative(target, LookupDrafter(n_draft=4, ngram_max=3), prompt, N_GEN)
            assert run.tokens == base.tokens, "lookup"
    finally:
        draft.close()


def test_llamacpps_ngram_drafters_reproduce_greedy_including_a_draft_from_the_bare_prompt(target, prompts):
    for prompt in prompts:
        base = greedy(target, prompt, N_GEN)
        # Keyed on one token, ngram-simple finds the prompt's last token earlier in it and drafts
        # before the first token: the prefill stops short and the first pass verifies that draft.
        on_prompt = NgramDrafter("ngram-simple", n_draft=3, size_n=1)
        on_prompt.start(prompt)
        assert on_prompt.propose(prompt, N_GEN), "the bare prompt should yield a draft"
        for drafter in (on_prompt, NgramDrafter("ngram-map-k", 4, 2), NgramDrafter("ngram-map-k4v", 4, 2),
                        NgramCacheDrafter(8)):
            run = speculative(target, drafter, prompt, N_GEN)
            assert run.tokens == base.tokens, getattr(drafter, "mode", "ngram-cache")
            assert target.n_past == len(prompt) + N_GEN  # every token but the last emitted one


def test_the_target_as_its_own_draft_is_always_accepted(target, paths, prompts):
    draft = loaded(paths["F32"])
    try:
        run = speculative(target, ModelDrafter(draft, 4), prompts[0], N_GEN)
        assert run.n_drafted > 0 and run.n_accepted == run.n_drafted
    finally:
        draft.close()


def test_decode_after_a_rejection_equals_decode_without_speculation(target, prompts):
    prompt = prompts[1]
    base = greedy(target, prompt, 8).tokens
    target.reset()
    first = target.prefill(prompt)
    # Tokens the target would never pick land in the cache, then are rolled back.
    wrong = [t for t in (11, 12, 13, 14, 15) if t != base[1]][:4]
    predicted = target.verify([first, *wrong])
    assert predicted[0] == base[1] and target.n_past == len(prompt) + 5
    target.truncate(len(prompt) + 1)
    out = [first, predicted[0]]
    for _ in range(7):
        out.append(target.decode(out[-1]))
    assert out == base


def test_a_draft_with_another_vocabulary_is_refused_before_any_measurement(tmp_path, paths, smollm2):
    from farm.settings import Settings
    from orchestrator.planning import plan
    from orchestrator.sweep import SweepError, SweepSpec
    from worker.tasks import execute

    # Same weights, one token's text changed in place (same length, so the file stays valid GGUF).
    data = paths["Q4_0"].read_bytes()
    needle = (7).to_bytes(8, "little") + b"ectable"
    assert data.count(needle) == 1
    other = tmp_path / "other-vocab.gguf"
    other.write_bytes(data.replace(needle, (7).to_bytes(8, "little") + b"ectablX"))
    job = Job(job_id=str(uuid.uuid4()), sweep_id="s", index=0, model="smollm2-135m", quant="F32", kind="tg",
              n_gen=8, repetitions=1, technique="spec", draft_model=str(other), draft_quant="Q4_0", n_draft=2,
              prompt_category="qa", n_prompts=1)
    result = execute(job, Settings(data_dir=tmp_path / "data", models_dir=MODELS_DIR, worker_name="w"))
    assert result.status == "failed" and result.speculation is None
    assert "token 49151 is b'ectablX' in the draft but b'ectable' in the target" in result.error
    assert result_problems(result, job) == []
    spec = SweepSpec(name="s", models=[{"name": "smollm2-135m", "quants": ["F32"]}], techniques=["spec"],
                     draft_models=[str(other)], prompt_categories=["qa"], n_prompt=[], n_gen=[8])
    with pytest.raises(SweepError, match="ectablX"):
        plan(spec, models_dir=MODELS_DIR)


SWEEP = """\
name: spec-road
models:
  - name: smollm2-135m
    quants: [F32]
techniques: [baseline, spec, lookup]
draft_models:
  - name: smollm2-135m
    quants: [Q4_0]
n_draft: [2]
prompt_categories: [rewriting]
n_prompts: 1
n_prompt: []
n_gen: [8]
n_threads: [1]
repetitions: 1
n_warmup: 0
"""


def test_a_speculative_sweep_runs_end_to_end_into_the_database(tmp_path, smollm2):
    import json

    from sqlalchemy import create_engine, select

    from orchestrator.db import ResultRow, session_scope
    from tests.integration.conftest import (
        at_head,
        service_env,
        tokenfarm,
        worker_process,
    )

    env = at_head(service_env(tmp_path / "data"))
    sweep = tmp_path / "spec.yaml"
    sweep.write_text(SWEEP)
    with worker_process(env, "spec-worker", tmp_path / "worker.log"):
        proc = tokenfarm(env, "sweep", "submit", str(sweep), "--wait", "--timeout", "500")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "worker.log").read_text()[-3000:]
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'tokenfarm.sqlite3'}")
    with session_scope(engine) as s:
        rows = {r.technique: r.result for r in s.scalars(select(ResultRow))}
    engine.dispose()
    assert set(rows) == {"baseline", "spec", "lookup"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["baseline"]["speculation"] is None and rows["baseline"]["prompt_category"] == "rewriting"
    spec = rows["spec"]["speculation"]
    assert spec["lossless"] and spec["first_mismatch"] == [None]
    assert 0.0 <= spec["acceptance_rate"] <= 1.0 and spec["n_drafted"] > 0 and len(spec["acceptance_by_position"]) == 2
    assert rows["spec"]["draft_sha256"] and rows["spec"]["draft_sha256"] != rows["spec"]["model_sha256"]
    table = tokenfarm(env, "results", "--technique", "spec")
    assert table.returncode == 0 and "break-even map (spec)" in table.stdout
    line = next(l for l in table.stdout.splitlines() if "Q4_0 | 2 |" in l)
    assert "rewriting" in line and f"{spec['acceptance_rate']:.2f}" in line and line.rstrip().endswith("yes |")
    only = json.loads(tokenfarm(env, "results", "--technique", "lookup", "--format", "json").stdout)
    assert [r["technique"] for r in only] == ["lookup"]
