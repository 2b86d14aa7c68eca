"""Greedy speculative decoding and prompt lookup, measured against plain greedy decoding.

Owns the draft-and-verify loop, the two drafters (a draft model; n-grams of the text so far),
the vocabulary pair check, the project's prompt set, and the per-prompt comparison that says
whether a technique reproduced the baseline's tokens. It sees engines only through the
SpeculativeBackend protocol, so a fake backend drives it in unit tests; it knows nothing of
Celery, the database or model files.

Invariant of the loop: `seq` is prompt + every emitted token, and the target's KV cache holds
seq[:-1] between passes; the last emitted token is fed at the head of the next verify batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from farm.contract import Job, Speculation
from farm.modelfiles import vocab_mismatch
from farm.prompts import load_prompts
from worker.engines.base import EngineError, SpeculativeBackend
from worker.measure import speculation_block


class PairError(EngineError):
    """A draft model cannot serve a target: their vocabularies differ."""


def check_vocab_pair(target_texts: Sequence[bytes], draft_texts: Sequence[bytes]) -> None:
    """Refuse a draft whose token ids do not mean the same text as the target's."""
    problem = vocab_mismatch(list(target_texts), list(draft_texts))
    if problem:
        raise PairError(problem)


class ModelDrafter:
    """Drafts with a smaller model; its KV cache follows the target's accepted tokens."""

    def __init__(self, draft: SpeculativeBackend, n_draft: int, p_min: float = 0.0) -> None:
        self.draft, self.n_draft, self.p_min = draft, n_draft, p_min
        self._kv: list[int] = []  # tokens in the draft's KV cache, in order

    def start(self, prompt: Sequence[int]) -> None:
        self.draft.reset()
        self.draft.prefill(prompt)
        self._kv = list(prompt)

    def propose(self, seq: Sequence[int], n_max: int) -> list[int]:
        if n_max <= 0:
            return []
        # Roll back past the first token the target rejected; keep at least the last token to feed.
        keep = 0
        limit = min(len(self._kv), len(seq) - 1)
        while keep < limit and self._kv[keep] == seq[keep]:
            keep += 1
        self.draft.truncate(keep)
        self._kv = list(seq)
        token = self.draft.prefill(seq[keep:])
        drafted: list[int] = []
        while True:
            if self.p_min > 0.0 and self.draft.top_prob() < self.p_min:
                break
            drafted.append(token)
            if len(drafted) >= min(self.n_draft, n_max):
                break
            self._kv.append(token)
            token = self.draft.decode(token)
        return drafted


class LookupDrafter:
    """Prompt lookup: propose what followed the latest earlier occurrence of the text's last n-gram."""

    def __init__(self, n_draft: int, ngram_max: int = 3, ngram_min: int = 1) -> None:
        self.n_draft, self.ngram_max, self.ngram_min = n_draft, ngram_max, ngram_min

    def start(self, prompt: Sequence[int]) -> None:
        pass

    def propose(self, seq: Sequence[int], n_max: int) -> list[int]:
        n_max = min(self.n_draft, n_max)
        if n_max <= 0:
            return []
        # Longer n-grams first: a longer match predicts the continuation better.
        for n in range(min(self.ngram_max, len(seq) - 1), self.ngram_min - 1, -1):
            tail = list(seq[-n:])
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start] == tail[0] and list(seq[start:start + n]) == tail:
                    return list(seq[start + n:start + n + n_max])
        return []


@dataclass
class Run:
    """One generation: the tokens after the prompt and what producing them cost."""

    tokens: list[int]
    decode_ns: int
    draft_ns: int = 0
    verify_ns: int = 0
    n_passes: int = 0
    # Per draft position i: how often a token was drafted there and how often it was accepted.
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    @property
    def n_drafted(self) -> int:
        return sum(self.drafted_at)

    @property
    def n_accepted(self) -> int:
        return sum(self.accepted_at)


def greedy(target: SpeculativeBackend, prompt: Sequence[int], n_gen: int) -> Run:
    """Plain greedy decoding: first token from the prefill, then n_gen timed decode steps."""
    target.reset()
    token = target.prefill(prompt)
    tokens = [token]
    t0 = time.perf_counter_ns()
    for _ in range(n_gen):
        token = target.decode(token)
        tokens.append(token)
    return Run(tokens=tokens, decode_ns=time.perf_counter_ns() - t0, n_passes=n_gen)


def speculative(target: SpeculativeBackend, drafter, prompt: Sequence[int], n_gen: int) -> Run:
    """Draft, verify in one target pass, keep the agreeing prefix plus the target's own token.

    Emits exactly the tokens of `greedy` when verification is exact; timed like it (both
    models' prompt prefill outside the timer, the n_gen tokens after the first inside).
    """
    target.reset()
    drafter.start(prompt)
    seq = list(prompt)
    seq.append(target.prefill(prompt))
    goal = len(seq) + n_gen
    run = Run(tokens=[], decode_ns=0, drafted_at=[0] * getattr(drafter, "n_draft", 0),
              accepted_at=[0] * getattr(drafter, "n_draft", 0))
    t0 = time.perf_counter_ns()
    while len(seq) < goal:
        t_draft = time.perf_counter_ns()
        # Never draft past the goal: the verify pass itself adds one token.
        drafted = drafter.propose(seq, goal - len(seq) - 1)
        t_verify = time.perf_counter_ns()
        predicted = target.verify([seq[-1], *drafted])
        n_ok = 0
        while n_ok < len(drafted) and drafted[n_ok] == predicted[n_ok]:
            n_ok += 1
        seq.extend(drafted[:n_ok])
        seq.append(predicted[n_ok])
        # The target saw every drafted token; entries past the accepted ones are wrong history.
        target.truncate(len(seq) - 1)
        t_end = time.perf_counter_ns()
        run.draft_ns += t_verify - t_draft
        run.verify_ns += t_end - t_verify
        run.n_passes += 1
        for i in range(len(drafted)):
            run.drafted_at[i] += 1
            run.accepted_at[i] += i < n_ok
    run.decode_ns = time.perf_counter_ns() - t0
    run.tokens = seq[len(prompt):]
    return run


def prompt_tokens(target: SpeculativeBackend, job: Job) -> list[list[int]]:
    """The job's prompts, each as one user turn in the target's chat template, tokenized."""
    texts = load_prompts(job.prompt_category, job.n_prompts)
    return [target.tokenize(target.chat_prompt(t), add_bos=True, special=True) for t in texts]


def make_drafter(job: Job, draft: SpeculativeBackend | None):
    if job.technique == "spec":
        if draft is None:
            raise EngineError("a spec job needs a loaded draft model")
        return ModelDrafter(draft, job.n_draft, job.p_min)
    if job.technique == "lookup":
        return LookupDrafter(job.n_draft, job.ngram_max)
    return None


@dataclass
class PromptMeasurement:
    samples_ns: list[int]
    speculation: Speculation | None
    # Last repetition's tokens per prompt: baseline's, and the technique's.
    baseline_tokens: list[list[int]]
    tokens: list[list[int]]
    # The Measurement fields a prompt-set run has no use for: no prefill is timed, and every
    # sample is decode already.
    ttft_samples_ns: list[int] = field(default_factory=list)
    decode_samples_ns: list[int] = field(default_factory=list)


def measure_prompts(target: SpeculativeBackend, job: Job, prompts: list[list[int]], drafter=None) -> PromptMeasurement:
    """Warm-up, then per repetition every prompt decoded by the baseline and by the technique.

    A sample is one repetition's decode time summed over the prompts, so a job's tok/s weighs
    every prompt by its n_gen tokens. Baseline and technique alternate prompt by prompt so a
    machine that slows down over the job slows both alike.
    """
    for _ in range(job.n_warmup):
        for prompt in prompts[:1]:
            greedy(target, prompt, job.n_gen)
            if drafter is not None:
                speculative(target, drafter, prompt, job.n_gen)
    base_samples: list[int] = []
    samples: list[int] = []
    n_draft = job.n_draft if drafter is not None else 0
    total = Run(tokens=[], decode_ns=0, drafted_at=[0] * n_draft, accepted_at=[0] * n_draft)
    base_tokens: list[list[int]] = []
    tokens: list[list[int]] = []
    for _ in range(job.repetitions):
        base_tokens, tokens = [], []
        base_ns = ns = 0
        for prompt in prompts:
            base = greedy(target, prompt, job.n_gen)
            base_ns += base.decode_ns
            base_tokens.append(base.tokens)
            if drafter is None:
                continue
            run = speculative(target, drafter, prompt, job.n_gen)
            ns += run.decode_ns
            tokens.append(run.tokens)
            total.draft_ns += run.draft_ns
            total.verify_ns += run.verify_ns
            total.n_passes += run.n_passes
            total.drafted_at = [a + b for a, b in zip(total.drafted_at, run.drafted_at)]
            total.accepted_at = [a + b for a, b in zip(total.accepted_at, run.accepted_at)]
        base_samples.append(base_ns)
        samples.append(ns)
    if drafter is None:
        return PromptMeasurement(base_samples, None, base_tokens, base_tokens)
    spec = speculation_block(
        job.n_gen * len(prompts), base_samples, samples, total.n_drafted, total.n_accepted, total.n_passes,
        total.drafted_at, total.accepted_at, total.draft_ns, total.verify_ns, base_tokens, tokens,
    )
    return PromptMeasurement(samples, spec, base_tokens, tokens)
