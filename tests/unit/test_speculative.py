"""The draft-and-verify loop against fake backends whose greedy next token is a known function."""

from __future__ import annotations

import pytest

from farm.contract import PROMPT_CATEGORIES, Job, Result
from farm.identity import first_difference, output_sha256
from farm.prompts import load_prompts
from farm.stats import summarize
from orchestrator.validation import result_problems
from worker.speculative import (
    LookupDrafter,
    ModelDrafter,
    PairError,
    check_vocab_pair,
    greedy,
    measure_prompts,
    speculative,
)

N_VOCAB = 97


def rule(history: list[int]) -> int:
    """The fake target's greedy next token: never 0, depends on the last two tokens."""
    a, b = (history[-2] if len(history) > 1 else 0), history[-1]
    return 1 + (a * 7 + b * 13 + len(history) % 5) % (N_VOCAB - 1)


class FakeBackend:
    """Keeps its KV cache as the list of tokens it holds, so tests can look inside it."""

    name = "fake"

    def __init__(self, next_token=rule, prob: float = 0.9) -> None:
        self.next_token, self.prob = next_token, prob
        self.kv: list[int] = []
        self.n_verify_calls = 0

    @property
    def n_vocab(self) -> int:
        return N_VOCAB

    @property
    def n_past(self) -> int:
        return len(self.kv)

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return ([1] if add_bos else []) + [2 + ord(c) % (N_VOCAB - 2) for c in text]

    def chat_prompt(self, user_text: str) -> str:
        return user_text

    def reset(self) -> None:
        self.kv = []

    def prefill(self, tokens) -> int:
        self.kv.extend(tokens)
        return self.next_token(self.kv)

    def decode(self, token: int) -> int:
        return self.prefill([token])

    def verify(self, tokens) -> list[int]:
        self.n_verify_calls += 1
        out = []
        for t in tokens:
            self.kv.append(t)
            out.append(self.next_token(self.kv))
        return out

    def truncate(self, n_past: int) -> None:
        assert 0 <= n_past <= len(self.kv)
        del self.kv[n_past:]

    def top_prob(self) -> float:
        return self.prob

    def token_texts(self) -> list[bytes]:
        return [f"t{i}".encode() for i in range(N_VOCAB)]

    def versions(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


PROMPT = [1, 5, 9, 14, 3, 5, 9, 22]


def test_a_draft_that_always_agrees_is_fully_accepted_and_lossless():
    target = FakeBackend()
    base = greedy(target, PROMPT, 40)
    run = speculative(target, ModelDrafter(FakeBackend(), n_draft=4), PROMPT, 40)
    assert run.tokens == base.tokens and len(run.tokens) == 41
    assert run.n_drafted > 0 and run.n_accepted == run.n_drafted
    # 40 tokens at up to 4 drafted + 1 own token per pass.
    assert run.n_passes == 8
    assert run.accepted_at == run.drafted_at


def test_a_draft_that_never_agrees_is_never_accepted_and_still_lossless():
    target = FakeBackend()
    base = greedy(target, PROMPT, 30)
    draft = FakeBackend(next_token=lambda history: 0)  # the target never emits 0
    run = speculative(target, ModelDrafter(draft, n_draft=3), PROMPT, 30)
    assert run.tokens == base.tokens
    assert run.n_drafted > 0 and run.n_accepted == 0
    assert run.n_passes == 30


def test_kv_caches_hold_exactly_the_accepted_history_after_rejections():
    target = FakeBackend()
    # A draft that agrees except at every third step of its own history: partial acceptance.
    draft = FakeBackend(next_token=lambda h: 0 if len(h) % 3 == 0 else rule(h))
    drafter = ModelDrafter(draft, n_draft=4)
    run = speculative(target, drafter, PROMPT, 25)
    assert 0 < run.n_accepted < run.n_drafted
    seq = PROMPT + run.tokens
    # The target holds everything but the last emitted token, never a rejected one.
    assert target.kv == seq[:-1]
    # The next round rolls the draft back past its rejected tokens: its cache is then the sequence.
    assert draft.kv != seq
    drafter.propose(seq, 1)
    assert draft.kv == seq


def test_p_min_stops_drafting_when_the_draft_is_unsure():
    target = FakeBackend()
    run = speculative(target, ModelDrafter(FakeBackend(prob=0.2), n_draft=4, p_min=0.5), PROMPT, 10)
    assert run.n_drafted == 0 and run.n_passes == 10
    assert run.tokens == greedy(target, PROMPT, 10).tokens


def test_lookup_proposes_what_followed_the_latest_earlier_ngram():
    drafter = LookupDrafter(n_draft=3, ngram_max=2)
    assert drafter.propose([7, 1, 2, 3, 4, 9, 1, 2], 10) == [3, 4, 9]
    assert drafter.propose([7, 1, 2, 3, 4, 9, 1, 2], 2) == [3, 4]
    # No bigram match: fall back to the latest unigram match.
    assert drafter.propose([5, 6, 8, 6], 10) == [8, 6]
    assert drafter.propose([1, 2, 3], 10) == []


def test_lookup_reproduces_greedy():
    target = FakeBackend()
    prompt = PROMPT * 3
    run = speculative(target, LookupDrafter(n_draft=4, ngram_max=3), prompt, 30)
    assert run.tokens == greedy(target, prompt, 30).tokens
    assert target.kv == (prompt + run.tokens)[:-1]


def test_a_pair_with_another_vocabulary_is_refused():
    texts = FakeBackend().token_texts()
    check_vocab_pair(texts, list(texts))
    with pytest.raises(PairError, match="vocabulary has 96 tokens"):
        check_vocab_pair(texts, texts[:-1])
    with pytest.raises(PairError, match="token 5"):
        check_vocab_pair(texts, texts[:5] + [b"other"] + texts[6:])


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_every_category_has_ten_prompts():
    for category in PROMPT_CATEGORIES:
        prompts = load_prompts(category)
        assert len(prompts) >= 10 and len(set(prompts)) == len(prompts), category
    assert len(load_prompts("code", 3)) == 3


def spec_job(**kw) -> Job:
    base = dict(job_id="j", sweep_id="s", index=0, model="m", quant="F32", kind="tg", n_gen=12, repetitions=2,
                n_warmup=1, technique="spec", draft_model="d", n_draft=3, prompt_category="qa", n_prompts=3)
    return Job(**{**base, **kw})


def result_for(job: Job, target: FakeBackend, drafter) -> Result:
    prompts = [target.tokenize(t) for t in load_prompts(job.prompt_category, job.n_prompts)]
    m = measure_prompts(target, job, prompts, drafter)
    avg, std = summarize(job.n_tokens, m.samples_ns)
    return Result(job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker="w", model=job.model,
                  model_sha256="a" * 64, draft_sha256="b" * 64, quant=job.quant, technique=job.technique,
                  test=job.test, n_gen=job.n_gen, repetitions=job.repetitions, samples_ns=m.samples_ns,
                  avg_ts=avg, stddev_ts=std, prompt_category=job.prompt_category, n_prompts=job.n_prompts,
                  draft_model=job.draft_model, n_draft=job.n_draft, speculation=m.speculation,
                  output_sha256=output_sha256(m.baseline_tokens))


def test_measured_statistics_are_consistent_and_acceptance_matches_the_draft():
    job = spec_job()
    target = FakeBackend()
    agreeing = result_for(job, target, ModelDrafter(FakeBackend(), job.n_draft))
    assert result_problems(agreeing, job) == []
    s = agreeing.speculation
    assert s.acceptance_rate == 1.0 and s.lossless and s.first_mismatch == [None] * 3
    assert s.acceptance_by_position == [1.0, 1.0, 1.0]
    never = result_for(job, target, ModelDrafter(FakeBackend(next_token=lambda h: 0), job.n_draft))
    assert result_problems(never, job) == [] and never.speculation.acceptance_rate == 0.0


def test_forged_speculation_statistics_are_caught():
    job = spec_job()
    good = result_for(job, FakeBackend(), ModelDrafter(FakeBackend(), job.n_draft))
    s = good.speculation
    forged = {
        "acceptance_rate": s.model_copy(update={"acceptance_rate": 1.5}),
        "speedup": s.model_copy(update={"speedup": s.speedup * 2}),
        "lossless": s.model_copy(update={"first_mismatch": [None, 4, None]}),
        "accepted than drafted": s.model_copy(update={"n_accepted": s.n_drafted + 1}),
        "position": s.model_copy(update={"acceptance_by_position": [1.0, 2.0, 1.0]}),
    }
    for word, bad in forged.items():
        problems = result_problems(good.model_copy(update={"speculation": bad}), job)
        assert any(word in p for p in problems), (word, problems)
    assert result_problems(good.model_copy(update={"speculation": None}), job)
    assert result_problems(good.model_copy(update={"n_draft": 8}), job)


def test_a_spec_job_needs_its_options():
    with pytest.raises(ValueError, match="draft_model"):
        spec_job(draft_model=None)
    with pytest.raises(ValueError, match="prompt_category"):
        spec_job(prompt_category=None)
    with pytest.raises(ValueError, match="ngram_max"):
        spec_job(technique="lookup", draft_model=None)
    with pytest.raises(ValueError, match="unknown prompt category"):
        spec_job(prompt_category="poetry")
