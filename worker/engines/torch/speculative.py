"""Decoding loops on the torch Transformer: plain, and draft-then-verify with any drafter.

One loop serves every technique: a drafter proposes up to n tokens after the committed
sequence, the target runs [pending token + proposals] in one forward pass (logits at every
position), the agreeing prefix is kept with the target's own next token, and the KV cache is
rewound by position alone (the cache is written by absolute position, so the next pass simply
overwrites rejected entries). Drafters: a smaller model (`ModelDrafter`), n-gram lookup in
the sequence so far (`LookupDrafter`), and MTP heads (`MTPDrafter`).

Greedy (temperature 0) acceptance keeps a proposal when it equals the target's argmax, so the
output is the target's own greedy output. Sampled acceptance is the rule of Leviathan et al.
and Chen et al. (2023): keep draft token x with probability min(1, p(x)/q(x)); on rejection
draw from the normalised residual max(0, p - q); after a fully accepted run draw the extra
token from p. The output is then distributed exactly as sampling from the target alone.

It owns the loops, the acceptance rule and the counters; it knows nothing of jobs, files or
the measurement schema (techniques.py turns counters into Result fields).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from worker.engines.torch.kv_cache import KVCache
from worker.engines.torch.model import Transformer
from worker.engines.torch.mtp import MTPHeads


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SpecStats:
    n_passes: int = 0
    n_drafted: int = 0
    n_accepted: int = 0
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    draft_ns: int = 0
    verify_ns: int = 0

    def record(self, n_drafted: int, n_accepted: int) -> None:
        self.n_passes += 1
        self.n_drafted += n_drafted
        self.n_accepted += n_accepted
        for lst in (self.drafted_by_position, self.accepted_by_position):
            lst.extend([0] * (n_drafted - len(lst)))
        for i in range(n_drafted):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += i < n_accepted

    def merge(self, other: "SpecStats") -> None:
        self.n_passes += other.n_passes
        self.n_drafted += other.n_drafted
        self.n_accepted += other.n_accepted
        self.draft_ns += other.draft_ns
        self.verify_ns += other.verify_ns
        for mine, theirs in ((self.drafted_by_position, other.drafted_by_position),
                             (self.accepted_by_position, other.accepted_by_position)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, v in enumerate(theirs):
                mine[i] += v

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """Draft tokens accepted per target pass (the target's own token not counted)."""
        return self.n_accepted / self.n_passes if self.n_passes else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """Of the passes that drafted a token at position i, the fraction that kept it."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)]


class Drafter(Protocol):
    def start(self, seq: list[int], hidden: torch.Tensor | None) -> None:
        """A new sequence: seq[:-1] is in the target's cache; hidden (len(seq) - 1, E) their
        final hidden states from the prefill, when the caller kept them."""

    def propose(self, seq: list[int], hidden: torch.Tensor | None, n: int,
                temperature: float) -> tuple[list[int], torch.Tensor | None]:
        """Up to n tokens to follow seq, and their draft distributions (n, V) when sampled
        from one (None: the proposals are deterministic, q is one-hot). hidden (T, E): the
        target's hidden states of the T positions committed by the last pass (None before
        the first), seq[-T - 1:-1]."""


class MTPDrafter:
    """Proposals from MTP heads, chained on the target's hidden states, with a context of their
    own (mtp.MTPContext) that follows the committed sequence."""

    def __init__(self, heads: MTPHeads, n_ctx: int, p_min: float = 0.0) -> None:
        self.heads, self.p_min = heads, p_min
        self.context = heads.new_context(n_ctx)

    def start(self, seq, hidden):
        # Without the prompt's hidden states the heads' context begins at the pending token.
        n = 0 if hidden is None else hidden.shape[0]
        self.context.start(len(seq) - 1 - n, hidden)

    def propose(self, seq, hidden, n, temperature):
        if hidden is not None:
            self.context.add_hidden(len(seq) - 1 - hidden.shape[0], hidden)
        if n < 1 or self.context.n_hidden == 0:
            return [], None
        return self.context.propose(seq, n, self.p_min), None


class LookupDrafter:
    """Prompt lookup: the tokens that followed the latest earlier match of the last n-gram."""

    def __init__(self, ngram_max: int, n_draft: int, ngram_min: int = 1) -> None:
        self.ngram_max, self.ngram_min, self.n_draft = ngram_max, ngram_min, n_draft

    def start(self, seq, hidden):
        pass

    def propose(self, seq, hidden, n, temperature):
        n = min(n, self.n_draft)
        if n < 1:
            return [], None
        for size in range(min(self.ngram_max, len(seq) - 1), self.ngram_min - 1, -1):
            tail = seq[-size:]
            # Latest match first: recent text predicts the continuation best.
            for start in range(len(seq) - size - 1, -1, -1):
                if seq[start:start + size] == tail:
                    follow = seq[start + size:start + size + n]
                    if follow:
                        return follow, None
        return [], None


class ModelDrafter:
    """A smaller Transformer with its own KV cache, kept in step with the committed sequence."""

    def __init__(self, model: Transformer, cache: KVCache, n_draft: int, p_min: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.cache, self.n_draft, self.p_min = model, cache, n_draft, p_min
        self.generator = generator
        self.in_cache: list[int] = []  # the token at each position the draft cache holds

    def reset(self) -> None:
        self.in_cache = []

    def start(self, seq, hidden):
        self.reset()

    @torch.inference_mode()
    def propose(self, seq, hidden, n, temperature):
        n = min(n, self.n_draft)
        if n < 1:
            return [], None
        # Positions whose cached token still matches the committed sequence are reused.
        valid = 0
        for a, b in zip(self.in_cache, seq):
            if a != b:
                break
            valid += 1
        valid = min(valid, len(seq) - 1)  # at least the last token is run, for its logits
        device = self.model.tok_embd.weight.device
        feed = seq[valid:]
        self.in_cache = self.in_cache[:valid]
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        pos = valid
        for _ in range(n):
            ids = torch.tensor([feed], device=device)
            logits, _ = self.model(ids, pos, self.cache, all_logits=False)  # (1, 1, V)
            self.in_cache.extend(feed)
            pos += len(feed)
            logits = logits[0, -1].float()
            if temperature > 0:
                q = F.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(q, 1, generator=self.generator).item())
                qs.append(q)
                top = float(q.max())
            else:
                token = int(logits.argmax().item())
                top = float(F.softmax(logits, dim=-1).max()) if self.p_min > 0 else 1.0
            if drafts and top < self.p_min:
                break  # a draft this unsure would likely be rejected: verify what we have
            drafts.append(token)
            feed = [token]
        return drafts, (torch.stack(qs[:len(drafts)]) if temperature > 0 else None)


def accept_sampled(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int],
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """The sampled acceptance rule. p: target probabilities (k+1, V); q: draft probabilities
    (k, V), or None for deterministic drafts (one-hot q). Returns (n_accepted, next token)."""
    for i, x in enumerate(drafts):
        px = float(p[i, x])
        qx = float(q[i, x]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator))
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
        return i, int(torch.multinomial(residual / total, 1, generator=generator).item())
    k = len(drafts)
    return k, int(torch.multinomial(p[k], 1, generator=generator).item())


@dataclass
class Generation:
    tokens: list[int]
    stats: SpecStats


@torch.inference_mode()
def generate(model: Transformer, cache: KVCache, seq: list[int], n_gen: int,
             drafter: Drafter | None = None, n_draft: int = 0, temperature: float = 0.0,
             generator: torch.Generator | None = None, prompt_hidden: torch.Tensor | None = None) -> Generation:
    """n_gen tokens after seq. seq[:-1] must already be in the cache at positions
    [0, len(seq) - 1); seq[-1] is the pending token the first pass runs. prompt_hidden
    (len(seq) - 1, E): the prefill's hidden states of seq[:-1], for drafters that read them."""
    device = model.tok_embd.weight.device
    seq = list(seq)
    pos = len(seq) - 1
    stats = SpecStats()
    produced: list[int] = []
    hidden: torch.Tensor | None = None
    if drafter is not None:
        drafter.start(seq, prompt_hidden)
    while len(produced) < n_gen:
        # Never draft past n_gen: the target's own token always comes on top.
        n_max = min(n_draft, n_gen - len(produced) - 1) if drafter is not None else 0
        t0 = time.perf_counter_ns()
        # Called even for n_max = 0: a drafter with a context of its own must see every pass.
        drafts, q = drafter.propose(seq, hidden, n_max, temperature) if drafter is not None else ([], None)
        synchronize(device)
        t1 = time.perf_counter_ns()
        ids = torch.tensor([[seq[-1], *drafts]], device=device)  # (1, 1 + k)
        logits, h = model(ids, pos, cache, all_logits=drafter is not None)  # (1, 1 + k or 1, V)
        logits = logits[0].float()
        if temperature > 0:
            p = F.softmax(logits / temperature, dim=-1)
            n_acc, nxt = accept_sampled(p, q, drafts, generator)
        else:
            target = logits.argmax(-1).tolist()
            n_acc = 0
            while n_acc < len(drafts) and drafts[n_acc] == target[n_acc]:
                n_acc += 1
            nxt = target[n_acc]
        synchronize(device)
        t2 = time.perf_counter_ns()
        if drafter is not None:
            stats.draft_ns += t1 - t0
            stats.verify_ns += t2 - t1
            stats.record(len(drafts), n_acc)
        new = [*drafts[:n_acc], nxt]
        seq.extend(new)
        produced.extend(new)
        pos += 1 + n_acc
        hidden = h[0, :n_acc + 1]  # (1 + n_acc, E): the positions this pass committed
    return Generation(tokens=produced[:n_gen], stats=stats)
