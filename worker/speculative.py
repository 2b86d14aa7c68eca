"""Speculative decoding, prompt lookup and MTP, measured against plain decoding: the one loop.

Owns the draft-and-verify loop, the drafters (a draft model; the longest earlier match of the
text's last n-gram; MTP heads over the target's hidden states; llama.cpp's n-gram drafters are
worker/ngram.py's), the acceptance rules (greedy: the agreeing prefix; sampled: the rule of
Leviathan et al. and Chen et al., 2023), the vocabulary pair check, the
project's prompt set, and the per-prompt comparison that says whether a technique reproduced
the baseline's tokens. It sees engines only through the SpeculativeBackend protocol, so a fake
backend drives it in unit tests; the MTP heads' math and the distributions sampled acceptance
reads are the engine's (capabilities `last_hidden`, `probs`, `mtp_context`, asked for by the
drafter or the sampler that needs them, never by engine name). It knows nothing of Celery, the
database or model files.

Invariant of the loop: `seq` is prompt + every emitted token, and the target's KV cache holds
seq[:-1] between passes; the last emitted token is fed at the head of the next verify batch.

Sampled acceptance keeps draft token x with probability min(1, p(x)/q(x)); on rejection it
draws from the normalised residual max(0, p - q); after a fully accepted run it draws the extra
token from p. The output is then distributed exactly as sampling from the target alone.
Deterministic drafts (lookup, MTP) have a one-hot q.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from farm.contract import Job, Speculation
from farm.lookupcache import LookupCacheError, NgramCache, read_lookup_cache
from farm.modelfiles import vocab_mismatch
from farm.prompts import load_prompts
from worker.engines.base import EngineError, SpeculativeBackend
from worker.measure import speculation_block
from worker.ngram import NgramCacheDrafter, NgramDrafter


class PairError(EngineError):
    """A draft model cannot serve a target: their vocabularies differ."""


def check_vocab_pair(target_texts: Sequence[bytes], draft_texts: Sequence[bytes]) -> None:
    """Refuse a draft whose token ids do not mean the same text as the target's."""
    problem = vocab_mismatch(list(target_texts), list(draft_texts))
    if problem:
        raise PairError(problem)


class Sampler:
    """Draws tokens from a backend's distributions (`probs`, torch tensors: only an engine that
    offers them runs sampled decoding) at one temperature, from one seeded stream."""

    def __init__(self, temperature: float, seed: int) -> None:
        self.temperature, self.seed = temperature, seed
        self._generator = None

    def _stream(self, like):
        import torch

        # Seeded on the device the distributions live on: a CPU stream cannot draw from CUDA tensors.
        if self._generator is None or self._generator.device != like.device:
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
        return self._generator

    def probs(self, backend: SpeculativeBackend):
        """The backend's distributions (T, V) after each position of its last pass."""
        if not hasattr(backend, "probs"):
            raise EngineError(f"the {backend.name} engine offers no token distributions: sampled decoding needs them")
        return backend.probs(self.temperature)

    def draw(self, p) -> int:
        """One token from the distribution p (V,)."""
        import torch

        return int(torch.multinomial(p, 1, generator=self._stream(p)).item())

    def stack(self, qs: list):
        import torch

        return torch.stack(qs) if qs else None

    def accept(self, p, q, drafts: Sequence[int]) -> tuple[int, int]:
        """The sampled acceptance rule. p: target probabilities (k+1, V); q: draft probabilities
        (k, V), or None for deterministic drafts (one-hot q). Returns (n_accepted, next token)."""
        import torch

        g = self._stream(p)
        for i, x in enumerate(drafts):
            px = float(p[i, x])
            qx = float(q[i, x]) if q is not None else 1.0
            u = float(torch.rand((), generator=g, device=p.device))
            if u < min(1.0, px / qx):
                continue
            if q is not None:
                residual = torch.clamp(p[i] - q[i], min=0.0)
            else:
                residual = p[i].clone()
                residual[x] = 0.0
            total = float(residual.sum())
            if total <= 0.0:  # p == q: a rejection has probability 0; guard rounding
                residual, total = p[i], 1.0
            return i, self.draw(residual / total)
        return len(drafts), self.draw(p[len(drafts)])


class Drafter(Protocol):
    n_draft: int  # the most tokens one proposal holds
    q: object  # after propose: the draft distributions (k, V) it sampled from, or None (deterministic)

    def start(self, prompt: Sequence[int]) -> None:
        """A new sequence begins with prompt (called before the target's prefill)."""

    def propose(self, seq: Sequence[int], n_max: int, sampler: Sampler | None = None) -> list[int]:
        """Up to n_max tokens to follow seq; the target's last pass committed seq[:-1]. Called
        every pass, n_max 0 included: a drafter with a context of its own must see each.

        A drafter with `drafts_on_prompt` set is first called on the bare prompt, before the
        target has produced a token, as llama-speculative-simple drafts (worker/ngram.py)."""


class ModelDrafter:
    """Drafts with a smaller model; its KV cache follows the target's accepted tokens."""

    def __init__(self, draft: SpeculativeBackend, n_draft: int, p_min: float = 0.0) -> None:
        self.draft, self.n_draft, self.p_min = draft, n_draft, p_min
        self.q = None
        self._kv: list[int] = []  # tokens in the draft's KV cache, in order

    def start(self, prompt: Sequence[int]) -> None:
        self.draft.reset()
        self.draft.prefill(prompt)
        self._kv = list(prompt)

    def propose(self, seq: Sequence[int], n_max: int, sampler: Sampler | None = None) -> list[int]:
        self.q = None
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
        qs: list = []
        while True:
            if sampler is not None:
                q = sampler.probs(self.draft)[-1]
                token = sampler.draw(q)
                qs.append(q)
                top = float(q.max()) if self.p_min > 0.0 else 1.0
            else:
                top = self.draft.top_prob() if self.p_min > 0.0 else 1.0
            if top < self.p_min:
                break
            drafted.append(token)
            if len(drafted) >= min(self.n_draft, n_max):
                break
            self._kv.append(token)
            token = self.draft.decode(token)
        if sampler is not None:
            self.q = sampler.stack(qs[:len(drafted)])
        return drafted


class LookupDrafter:
    """Prompt lookup: propose what followed the latest earlier occurrence of the text's last n-gram."""

    q = None  # proposals are deterministic

    def __init__(self, n_draft: int, ngram_max: int = 3, ngram_min: int = 1) -> None:
        self.n_draft, self.ngram_max, self.ngram_min = n_draft, ngram_max, ngram_min

    def start(self, prompt: Sequence[int]) -> None:
        pass

    def propose(self, seq: Sequence[int], n_max: int, sampler: Sampler | None = None) -> list[int]:
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


class MTPDrafter:
    """Proposals from an engine's MTP heads, chained on the target's own hidden states.

    `context` is the engine's running state of the heads (torch: mtp.MTPContext, from the
    backend's `mtp_context`): start(position), add_hidden(position, hidden), propose(seq, n,
    p_min). The hidden states come from the target's `last_hidden` after each pass, of which
    the first rows are the positions that pass committed.
    """

    q = None  # proposals are the heads' argmax: deterministic

    def __init__(self, target: SpeculativeBackend, context, n_draft: int, p_min: float = 0.0) -> None:
        if not hasattr(target, "last_hidden"):
            raise EngineError(f"the {target.name} engine exposes no hidden states: MTP heads need them")
        self.target, self.context, self.n_draft, self.p_min = target, context, n_draft, p_min
        self._pass_start = 0  # position of the first token the target's last pass ran

    def start(self, prompt: Sequence[int]) -> None:
        # The prompt's hidden states are read at the first proposal: the prefill is then the last pass.
        self.context.start(0)
        self._pass_start = 0

    def propose(self, seq: Sequence[int], n_max: int, sampler: Sampler | None = None) -> list[int]:
        n_new = len(seq) - 1 - self._pass_start
        self.context.add_hidden(self._pass_start, self.target.last_hidden()[:n_new])
        # The next verify batch starts with seq[-1], at position len(seq) - 1.
        self._pass_start = len(seq) - 1
        if n_max <= 0:
            return []
        return self.context.propose(list(seq), min(n_max, self.n_draft), self.p_min)


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

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """Of the passes that drafted a token at position i, the fraction that kept it."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]


def plain(target: SpeculativeBackend, prompt: Sequence[int], n_gen: int, sampler: Sampler | None = None) -> Run:
    """Plain decoding, greedy or sampled: first token from the prefill, then n_gen timed decode steps."""
    target.reset()
    token = target.prefill(prompt)
    if sampler is not None:
        token = sampler.draw(sampler.probs(target)[-1])
    tokens = [token]
    t0 = time.perf_counter_ns()
    for _ in range(n_gen):
        token = target.decode(token)
        if sampler is not None:
            token = sampler.draw(sampler.probs(target)[-1])
        tokens.append(token)
    return Run(tokens=tokens, decode_ns=time.perf_counter_ns() - t0, n_passes=n_gen)


def greedy(target: SpeculativeBackend, prompt: Sequence[int], n_gen: int) -> Run:
    return plain(target, prompt, n_gen)


def speculative(target: SpeculativeBackend, drafter: Drafter, prompt: Sequence[int], n_gen: int,
                sampler: Sampler | None = None) -> Run:
    """Draft, verify in one target pass, keep the accepted prefix plus the target's own token.

    Greedy (no sampler), it emits exactly the tokens of `greedy` when verification is exact;
    sampled, its tokens are distributed as `plain`'s with the same sampler. Timed like `plain`
    (both models' prompt prefill outside the timer, the n_gen tokens after the first inside),
    but for a draft made from the bare prompt (below).
    """
    target.reset()
    drafter.start(prompt)
    seq = list(prompt)
    goal = len(prompt) + 1 + n_gen
    run = Run(tokens=[], decode_ns=0, drafted_at=[0] * drafter.n_draft, accepted_at=[0] * drafter.n_draft)
    # llama.cpp's n-gram drafters draft from the prompt before the first token. Where that yields
    # a draft, the prompt's last token is verified with it in the first timed pass (charging the
    # technique one token that plain decoding gets from its prefill); else the prefill gives the
    # first token as in plain decoding, and the drafter has seen the same calls as native's. The
    # drafter's time on the prompt counts as drafting either way.
    pending: list[int] = []  # the draft from the bare prompt, for the first pass to verify
    prompt_draft_ns = 0
    if getattr(drafter, "drafts_on_prompt", False) and len(prompt) > 1:
        t_draft = time.perf_counter_ns()
        pending = drafter.propose(seq, goal - len(seq) - 1, sampler)
        prompt_draft_ns = run.draft_ns = time.perf_counter_ns() - t_draft
    if pending:
        target.prefill(prompt[:-1])
    else:
        first = target.prefill(prompt)
        seq.append(first if sampler is None else sampler.draw(sampler.probs(target)[-1]))
    t0 = time.perf_counter_ns()
    while len(seq) < goal:
        t_draft = time.perf_counter_ns()
        if pending:
            drafted, pending = pending, []
        else:
            # Never draft past the goal: the verify pass itself adds one token.
            drafted = drafter.propose(seq, goal - len(seq) - 1, sampler)
        t_verify = time.perf_counter_ns()
        predicted = target.verify([seq[-1], *drafted])
        if sampler is None:
            n_ok = 0
            while n_ok < len(drafted) and drafted[n_ok] == predicted[n_ok]:
                n_ok += 1
            token = predicted[n_ok]
        else:
            n_ok, token = sampler.accept(sampler.probs(target), drafter.q, drafted)
        seq.extend(drafted[:n_ok])
        seq.append(token)
        # The target saw every drafted token; entries past the accepted ones are wrong history.
        target.truncate(len(seq) - 1)
        t_end = time.perf_counter_ns()
        run.draft_ns += t_verify - t_draft
        run.verify_ns += t_end - t_verify
        run.n_passes += 1
        for i in range(len(drafted)):
            run.drafted_at[i] += 1
            run.accepted_at[i] += i < n_ok
    run.decode_ns = time.perf_counter_ns() - t0 + prompt_draft_ns
    run.tokens = seq[len(prompt):]
    return run


def prompt_tokens(target: SpeculativeBackend, job: Job) -> list[list[int]]:
    """The job's prompts, each as one user turn in the target's chat template, tokenized."""
    texts = load_prompts(job.prompt_category, job.n_prompts)
    return [target.tokenize(target.chat_prompt(t), add_bos=True, special=True) for t in texts]


def make_drafter(job: Job, target: SpeculativeBackend, draft: SpeculativeBackend | None = None,
                 base_sha256: str | None = None) -> Drafter | None:
    """The job's drafter: a draft model (loaded by the caller), lookup, or the target's MTP heads."""
    if job.technique == "spec":
        if draft is None:
            raise EngineError("a spec job needs a loaded draft model")
        return ModelDrafter(draft, job.n_draft, job.p_min)
    if job.technique == "lookup":
        if job.lookup_mode == "ngram-cache":
            return NgramCacheDrafter(job.n_draft, static=load_cache(job.lookup_cache_static, "static"),
                                     dynamic=load_cache(job.lookup_cache_dynamic, "dynamic"))
        if job.lookup_mode != "longest":
            return NgramDrafter(job.lookup_mode, job.n_draft, job.ngram_size_n or job.ngram_max, job.ngram_min_hits)
        return LookupDrafter(job.n_draft, job.ngram_max)
    if job.technique == "mtp":
        if not hasattr(target, "mtp_context"):
            raise EngineError(f"the {target.name} engine runs no MTP heads: use the torch engine")
        return MTPDrafter(target, target.mtp_context(job.n_mtp, base_sha256), job.n_mtp, job.p_min)
    return None


def load_cache(path: str, kind: str) -> NgramCache | None:
    """A job's n-gram cache file (checked at submit; read again here, where it may have changed)."""
    if not path:
        return None
    try:
        return read_lookup_cache(Path(path))
    except OSError as exc:
        raise EngineError(f"cannot read the {kind} lookup cache {path}: {exc.strerror}; the file must be on the "
                          "worker at the path the sweep named") from exc
    except LookupCacheError as exc:
        raise EngineError(f"the {kind} lookup cache is not llama.cpp's n-gram cache format: {exc}") from exc


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
    def sampler(seed: int) -> Sampler | None:
        # Baseline and technique draw from one seed per repetition, as a pair.
        return Sampler(job.temperature, seed) if job.temperature > 0 else None

    for i in range(job.n_warmup):
        for prompt in prompts[:1]:
            plain(target, prompt, job.n_gen, sampler(job.seed + i))
            if drafter is not None:
                speculative(target, drafter, prompt, job.n_gen, sampler(job.seed + i))
    base_samples: list[int] = []
    samples: list[int] = []
    n_draft = drafter.n_draft if drafter is not None else 0
    total = Run(tokens=[], decode_ns=0, drafted_at=[0] * n_draft, accepted_at=[0] * n_draft)
    base_tokens: list[list[int]] = []
    tokens: list[list[int]] = []
    for i in range(job.repetitions):
        base_tokens, tokens = [], []
        base_ns = ns = 0
        for prompt in prompts:
            base = plain(target, prompt, job.n_gen, sampler(job.seed + i))
            base_ns += base.decode_ns
            base_tokens.append(base.tokens)
            if drafter is None:
                continue
            run = speculative(target, drafter, prompt, job.n_gen, sampler(job.seed + i))
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
    # Sampled decoding is not meant to equal the baseline's draw: its "mismatch" is recorded all the same.
    spec = speculation_block(
        job.n_gen * len(prompts), base_samples, samples, total.n_drafted, total.n_accepted, total.n_passes,
        total.drafted_at, total.accepted_at, total.draft_ns, total.verify_ns, base_tokens, tokens,
    )
    return PromptMeasurement(samples, spec, base_tokens, tokens)
