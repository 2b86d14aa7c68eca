"""Training MTP heads on a frozen base model by self-distillation, on a CPU in minutes.

The text is the base model's own: greedy continuations of chat-templated requests, tokenized
exactly as the benchmark's prompts are (speculative.prompt_tokens), so the heads learn the
distribution they will be measured on. The requests are varied and written for this purpose:
chat questions from templates (worker/data/mtp_chat.json, worker/data/mtp_prompts.txt), code
requests asking for new code in a dozen languages, and edits of functions taken from the
Python standard library's own source (worker/data/mtp_code.json). The benchmark prompts
(farm/data/prompts/*.jsonl) are never used, and a request that equals one is dropped.

The continuations are generated in left-padded batches with the base's KV cache (one decode
step reads the weights once for the whole batch). Head k at position i learns the base's token
at i + k + 2 from the base's hidden states and the tokens up to i + k + 1 (teacher forcing,
MTPHeads.chain, whole sequences with causal attention), by cross-entropy; the base is never
updated. Whole sequences are held out to report accuracy on text the heads have not seen, both
teacher-forced and as the greedy chain that speculation runs (a head's proposal only counts
when every head before it was right too).

It owns the requests, the data generation, the training loop and the figures; the heads
themselves and their file format are mtp.py's. It knows nothing of jobs or the CLI.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import logging
import math
import random
import re
import sysconfig
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from worker.engines.torch.gguf_loader import GGUFVocab, load_model
from worker.engines.torch.model import Transformer
from worker.engines.torch.mtp import MTPHeads, save_heads

log = logging.getLogger("tokenfarm.mtp")


@dataclass(frozen=True)
class TrainConfig:
    n_mtp: int = 2
    # Chat requests (templates filled in, plus the plain prompt list). Chat text is harder to
    # predict than code: with 1,400 the heads accepted 0.55 on chat benchmark prompts, with
    # 2,400 0.62 (head 1; benchmarks/torch_engine.py).
    n_chat: int = 2400
    n_code: int = 1400  # code requests: half edits of standard-library code, half new code
    n_cont: int = 128  # greedy tokens the base adds to each request
    n_prompt_max: int = 320  # longer requests are skipped: they cost time and add no variety
    heldout_frac: float = 0.08
    n_batch_gen: int = 64  # sequences per generation batch (64 decodes a third faster than 32 on 2 cores)
    epochs: int = 6
    lr: float = 2e-3
    n_rows_batch: int = 768  # sequence positions (padding included) per optimizer step: many small steps
    n_head_vocab: int = 8192  # 0: the whole vocabulary
    # Weight of the feature loss: each head's normalised output against the base's own hidden
    # state at the position it stands for (EAGLE's regression target, far richer than a token).
    feature_weight: float = 1.0
    # Weight of the soft-label loss: cross-entropy against the base's whole distribution over
    # the head vocabulary at the position the target follows. A greedy token says only which
    # token won; the distribution also says by how much, and what came second.
    soft_weight: float = 1.0
    seed: int = 0


@dataclass
class TrainReport:
    config: dict
    n_requests: int
    n_train_positions: int
    n_heldout_positions: int
    n_head_vocab: int
    heldout_vocab_coverage: float = 0.0  # held-out targets the head vocabulary contains
    n_benchmark_prompts_dropped: int = 0
    loss_by_epoch: list[float] = field(default_factory=list)
    heldout_accuracy_by_head: list[float] = field(default_factory=list)
    heldout_chain_acceptance: list[float] = field(default_factory=list)
    heldout_tokens_per_pass: float = 0.0  # 1 + the chain's acceptances: the pass's yield if drafting were free
    generate_s: float = 0.0
    train_s: float = 0.0


# --- requests -----------------------------------------------------------------------------

def _data(name: str) -> str:
    return resources.files("worker").joinpath("data").joinpath(name).read_text(encoding="utf-8")


def benchmark_texts() -> set[str]:
    """Every benchmark prompt's text: none may be trained on."""
    texts = set()
    # The benchmark prompts are the contract's (farm/prompts.py reads them from farm/data).
    folder = resources.files("farm").joinpath("data").joinpath("prompts")
    for f in folder.iterdir():
        if f.name.endswith(".jsonl"):
            texts |= {json.loads(ln)["text"].strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()}
    return texts


def _fill(template: str, slots: dict[str, list[str]]) -> list[str]:
    names = re.findall(r"{(\w+)}", template)
    return [template.format(**dict(zip(names, values))) for values in itertools.product(*(slots[n] for n in names))]


def chat_requests(n: int, rng: random.Random) -> list[str]:
    """The plain prompt list, then templates filled in, drawn evenly across templates."""
    plain = [ln.strip() for ln in _data("mtp_prompts.txt").splitlines() if ln.strip() and not ln.startswith("#")]
    spec = json.loads(_data("mtp_chat.json"))
    pools = [_fill(t, spec) for t in spec["templates"]]
    for pool in pools:
        rng.shuffle(pool)
    # Round robin over the templates, so that a small n still sees every form.
    filled = [p for group in itertools.zip_longest(*pools) for p in group if p is not None]
    return (plain + filled)[:n]


def library_snippets(n_lines_min: int = 6, n_lines_max: int = 32, n_chars_max: int = 1400) -> list[str]:
    """Top-level functions and classes of the standard library's pure-Python modules, in file
    order: real code, on every machine that runs Python, never written for a benchmark."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            n_lines = node.end_lineno - node.lineno + 1
            text = ast.get_source_segment(source, node)
            if text and n_lines_min <= n_lines <= n_lines_max and len(text) <= n_chars_max:
                out.append(text)
    return out


def code_requests(n: int, rng: random.Random) -> list[str]:
    spec = json.loads(_data("mtp_code.json"))
    snippets = library_snippets()
    rng.shuffle(snippets)
    writes = [w for t in spec["writes"] for w in _fill(t, spec)]
    rng.shuffle(writes)
    out: list[str] = []
    for i in range(n):
        if i % 2 == 0 and snippets:
            code = snippets[(i // 2) % len(snippets)]
            out.append(f"{spec['edits'][rng.randrange(len(spec['edits']))]}\n\n```\n{code}\n```")
        else:
            out.append(writes[(i // 2) % len(writes)])
    return out


def requests(cfg: TrainConfig) -> tuple[list[str], int]:
    """The training requests in a seeded order, and how many were dropped as benchmark prompts."""
    rng = random.Random(cfg.seed)
    texts = chat_requests(cfg.n_chat, rng) + code_requests(cfg.n_code, rng)
    banned = benchmark_texts()
    # Greedy text of a repeated request is repeated text: it would weigh double, and a copy
    # on each side of the held-out split would flatter the held-out figures.
    unique = list(dict.fromkeys(texts))
    kept = [t for t in unique if t.strip() not in banned]
    rng.shuffle(kept)
    return kept, len(unique) - len(kept)


def request_tokens(vocab: GGUFVocab, texts: list[str], n_prompt_max: int) -> list[list[int]]:
    """Each request as one user turn in the model's chat template: the benchmark's tokenization."""
    out = [vocab.tokenize(vocab.chat_prompt(t), add_bos=True, special=True) for t in texts]
    return [ids for ids in out if len(ids) <= n_prompt_max]


# --- the base's text ----------------------------------------------------------------------

@dataclass
class Continuation:
    tokens: torch.Tensor  # (L,): prompt, then the base's greedy continuation
    hidden: torch.Tensor  # (L - 1, E): the base's final hidden state of every position with a successor
    n_prompt: int


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: list[list[int]], n_cont: int) -> list[Continuation]:
    """Greedy continuations of prompts of any lengths, left-padded into one batch; padding is
    masked from attention, and RoPE sees only relative positions, so each sequence continues
    as it would alone."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, P, dtype=torch.long)  # (B, P)
    valid = torch.ones(B, P + n_cont, dtype=torch.bool)  # (B, S)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        valid[b, :P - len(p)] = False
    cache = model.new_cache(P + n_cont, n_batch=B)
    logits, hidden = model(ids, 0, cache, all_logits=False, key_valid=valid[:, :P])
    tokens, hiddens = [ids], [hidden]
    for step in range(n_cont):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(nxt)
        if step == n_cont - 1:
            break  # the last token's hidden state is never an input: nothing after it is known
        logits, hidden = model(nxt, P + step, cache, all_logits=False, key_valid=valid[:, :P + step + 1])
        hiddens.append(hidden)
    t, h = torch.cat(tokens, 1), torch.cat(hiddens, 1)  # (B, P + n_cont), (B, P + n_cont - 1, E)
    return [Continuation(t[b, P - len(p):].clone(), h[b, P - len(p):].clone(), len(p)) for b, p in enumerate(prompts)]


def _continuation_key(prompt: list[int], n_cont: int) -> str:
    return hashlib.sha256(json.dumps([prompt, n_cont]).encode()).hexdigest()[:32]


def _read_continuations(cache_path: Path) -> dict[str, Continuation]:
    """The continuations stored at cache_path, by _continuation_key; empty if none are usable."""
    from safetensors import safe_open

    if not cache_path.exists():
        return {}
    with safe_open(str(cache_path), framework="pt") as f:
        keys = json.loads((f.metadata() or {}).get("keys", "null"))
        if not isinstance(keys, list):
            return {}  # an older cache keyed by its whole prompt list: generated again
        tokens, hidden = f.get_tensor("tokens"), f.get_tensor("hidden")
        n_prompt, n_tokens = f.get_tensor("n_prompt").tolist(), f.get_tensor("n_tokens").tolist()
    out, start, start_h = {}, 0, 0
    for key, P, L in zip(keys, n_prompt, n_tokens):
        out[key] = Continuation(tokens[start:start + L], hidden[start_h:start_h + L - 1], P)
        start, start_h = start + L, start_h + L - 1
    return out


def _write_continuations(cache_path: Path, seqs: dict[str, Continuation]) -> None:
    from safetensors.torch import save_file

    values = list(seqs.values())
    partial = cache_path.with_name(cache_path.name + ".partial")
    save_file({"tokens": torch.cat([s.tokens for s in values]).contiguous(),
               "hidden": torch.cat([s.hidden for s in values]).float().contiguous(),
               "n_prompt": torch.tensor([s.n_prompt for s in values]),
               "n_tokens": torch.tensor([len(s.tokens) for s in values])},
              str(partial), metadata={"keys": json.dumps(list(seqs))})
    partial.replace(cache_path)


def distillation_text(base: Transformer, prompts: list[list[int]], cfg: TrainConfig, cache_path: Path | None,
                      progress: Callable[[str], None]) -> list[Continuation]:
    """The base's greedy continuations of prompts. Each is kept in cache_path by its prompt and
    length, and reused: generation is the slow part of training on a CPU, and retraining with
    other settings, or with more requests, needs the same text again."""
    stored = _read_continuations(cache_path) if cache_path is not None else {}
    keys = [_continuation_key(p, cfg.n_cont) for p in prompts]
    missing = [i for i, k in enumerate(keys) if k not in stored]
    if len(missing) < len(prompts):
        progress(f"reusing {len(prompts) - len(missing)} of the base's {len(prompts)} continuations from {cache_path.name}")
    t0 = time.perf_counter()
    # Similar lengths batched together: less padding to compute.
    order = sorted(missing, key=lambda i: len(prompts[i]))
    for start in range(0, len(order), cfg.n_batch_gen):
        idx = order[start:start + cfg.n_batch_gen]
        for i, s in zip(idx, generate_batch(base, [prompts[i] for i in idx], cfg.n_cont)):
            stored[keys[i]] = s
        progress(f"generated {min(start + cfg.n_batch_gen, len(order))}/{len(order)} continuations "
                 f"({time.perf_counter() - t0:.0f} s)")
        if cache_path is not None and (start // cfg.n_batch_gen) % 8 == 7:
            _write_continuations(cache_path, stored)  # an interrupted run keeps what it made
    if cache_path is not None and missing:
        _write_continuations(cache_path, stored)
    return [stored[k] for k in keys]


# --- training -----------------------------------------------------------------------------

def choose_vocab(targets: torch.Tensor, extra: list[int], n_vocab: int, n_head_vocab: int) -> torch.Tensor | None:
    """The n_head_vocab tokens the base emits most often (FR-Spec's frequency-ranked drafting
    vocabulary), sorted; None for the whole vocabulary."""
    if not n_head_vocab or n_head_vocab >= n_vocab:
        return None
    counts = Counter(targets.flatten().tolist())
    counts.update(extra)
    ranked = [t for t, _ in counts.most_common(n_head_vocab)]
    # Fill with the lowest ids the text did not use, so the size is what was asked for.
    seen = set(ranked)
    fill = (t for t in range(n_vocab) if t not in seen)
    while len(ranked) < n_head_vocab:
        ranked.append(next(fill))
    return torch.tensor(sorted(ranked))


def batches(seqs: list[Continuation], n_rows: int, rng: random.Random | None) -> list[list[Continuation]]:
    """Sequences of similar length grouped so that B * L_max stays within n_rows; shuffled
    batch order when rng is given."""
    ordered = sorted(seqs, key=lambda s: len(s.tokens))
    out, cur = [], []
    for s in ordered:
        if cur and (len(cur) + 1) * len(s.tokens) > n_rows:
            out.append(cur)
            cur = []
        cur.append(s)
    if cur:
        out.append(cur)
    if rng is not None:
        rng.shuffle(out)
    return out


def collate(batch: list[Continuation], n_mtp: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Right-padded tokens (B, L) and hidden states (B, L, E), and per head k the (b, i) rows
    that are trained: positions from the prompt's last (where decoding proposes first) whose
    target i + k + 2 the base generated. Causal attention never looks right, so the padding
    needs no mask."""
    L = max(len(s.tokens) for s in batch)
    E = batch[0].hidden.shape[-1]
    tokens = torch.zeros(len(batch), L, dtype=torch.long)
    hidden = torch.zeros(len(batch), L, E, dtype=batch[0].hidden.dtype)
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    for b, s in enumerate(batch):
        tokens[b, :len(s.tokens)] = s.tokens
        hidden[b, :len(s.hidden)] = s.hidden
    for k in range(n_mtp):
        bs, is_ = [], []
        for b, s in enumerate(batch):
            i = torch.arange(s.n_prompt - 1, len(s.tokens) - k - 2)
            bs.append(torch.full_like(i, b))
            is_.append(i)
        rows.append((torch.cat(bs), torch.cat(is_)))
    return tokens, hidden, rows


def batch_loss(heads: MTPHeads, tokens, hidden, rows, index_of, w, feature_weight: float = 0.0,
               soft_weight: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Summed loss of the heads (cross-entropy against the base's token, plus feature_weight
    times the smooth-L1 distance of the normalised output to the base's hidden state at the
    position whose successor that token is, plus soft_weight times the cross-entropy against
    the base's distribution there); each head's argmax (token ids) and target."""
    outs = heads.chain(hidden, tokens)
    loss = hidden.new_zeros(())
    preds, targets = [], []
    for k, (h, (b, i)) in enumerate(zip(outs, rows)):
        normed = heads.heads[k].out_norm(h[b, i])  # (N, E)
        logits = normed @ w.T  # (N, V_head)
        target = tokens[b, i + k + 2]
        loss = loss + F.cross_entropy(logits.float(), target if index_of is None else index_of[target], ignore_index=-100)
        if feature_weight:
            loss = loss + feature_weight * F.smooth_l1_loss(normed, hidden[b, i + k + 1])
        if soft_weight:
            with torch.no_grad():
                teacher = F.softmax((hidden[b, i + k + 1] @ w.T).float(), dim=-1)  # (N, V_head)
            loss = loss + soft_weight * F.cross_entropy(logits.float(), teacher)
        preds.append(heads.to_token(logits.argmax(-1)))
        targets.append(target)
    return loss, preds, targets


@torch.no_grad()
def evaluate(heads: MTPHeads, seqs: list[Continuation], n_rows: int, index_of) -> tuple[list[float], list[float]]:
    """Held-out accuracy per head (teacher-forced), and the greedy chain's acceptance by depth:
    of the positions where every head has a target, the fraction where heads 1..k were all right."""
    w = heads.output_weight()
    right = [0] * heads.n_mtp
    total = [0] * heads.n_mtp
    chain_right = [0] * heads.n_mtp
    n_chain = 0
    for batch in batches(seqs, n_rows, None):
        tokens, hidden, rows = collate(batch, heads.n_mtp)
        _, preds, targets = batch_loss(heads, tokens, hidden, rows, index_of, w)
        hits = [p == t for p, t in zip(preds, targets)]
        for k, h in enumerate(hits):
            right[k] += int(h.sum())
            total[k] += len(h)
        # Rows of the last head are a prefix of every earlier head's, sequence by sequence.
        alive = torch.ones(len(rows[-1][0]), dtype=torch.bool)
        last_b, last_i = rows[-1]
        for k, h in enumerate(hits):
            b, i = rows[k]
            at = torch.zeros(len(batch), tokens.shape[1], dtype=torch.bool)
            at[b, i] = h
            alive &= at[last_b, last_i]
            chain_right[k] += int(alive.sum())
        n_chain += len(last_b)
    return [r / t for r, t in zip(right, total)], [c / n_chain for c in chain_right]


def train_epoch(heads: MTPHeads, train: list[Continuation], cfg: TrainConfig, opt, sched, index_of, w,
                rng: random.Random, progress: Callable[[int, float], None] = lambda n, loss: None) -> float:
    """One pass over the training sequences in shuffled batches; the mean loss per head."""
    total, n = 0.0, 0
    for batch in batches(train, cfg.n_rows_batch, rng):
        tokens, hidden, rows = collate(batch, cfg.n_mtp)
        loss, _, _ = batch_loss(heads, tokens, hidden, rows, index_of, w, cfg.feature_weight, cfg.soft_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.heads.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        total += float(loss.detach())
        n += 1
        progress(n, total / n / cfg.n_mtp)
    return total / max(1, n) / cfg.n_mtp


def train_heads(base: Transformer, vocab: GGUFVocab, cfg: TrainConfig,
                progress: Callable[[str], None] = log.info, cache_path: Path | None = None) -> tuple[MTPHeads, TrainReport]:
    torch.manual_seed(cfg.seed)
    for p in base.parameters():
        p.requires_grad_(False)
    texts, n_dropped = requests(cfg)
    prompts = request_tokens(vocab, texts, cfg.n_prompt_max)
    t0 = time.perf_counter()
    seqs = distillation_text(base, prompts, cfg, cache_path, progress)
    generate_s = time.perf_counter() - t0

    n_held = max(1, int(round(len(seqs) * cfg.heldout_frac)))
    held, train = seqs[:n_held], seqs[n_held:]
    targets = torch.cat([s.tokens[s.n_prompt:] for s in train])
    head_vocab = choose_vocab(targets, [], base.config.n_vocab, cfg.n_head_vocab)
    index_of = None
    if head_vocab is not None:
        index_of = torch.full((base.config.n_vocab,), -100, dtype=torch.long)
        index_of[head_vocab] = torch.arange(len(head_vocab))
    held_targets = torch.cat([s.tokens[s.n_prompt:] for s in held])
    coverage = 1.0 if index_of is None else float((index_of[held_targets] >= 0).float().mean())

    heads = MTPHeads(base, cfg.n_mtp, head_vocab)
    heads.init_from_base()
    heads.train()
    w = heads.output_weight().detach()
    opt = torch.optim.AdamW(heads.heads.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    n_per_epoch = len(batches(train, cfg.n_rows_batch, None))
    n_steps = cfg.epochs * n_per_epoch
    n_warmup = max(1, n_steps // 20)
    # Linear warm-up, then cosine decay to a tenth of the peak.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / n_warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / n_steps)))))
    report = TrainReport(
        config=asdict(cfg), n_requests=len(seqs),
        n_train_positions=sum(len(s.tokens) - s.n_prompt for s in train),
        n_heldout_positions=sum(len(s.tokens) - s.n_prompt for s in held),
        n_head_vocab=len(head_vocab) if head_vocab is not None else base.config.n_vocab,
        heldout_vocab_coverage=coverage, n_benchmark_prompts_dropped=n_dropped, generate_s=generate_s)
    progress(f"{len(train)} training and {len(held)} held-out sequences; head vocabulary {report.n_head_vocab} "
             f"tokens covers {coverage:.3f} of held-out targets; {n_steps} steps")
    t1 = time.perf_counter()
    teacher, chain = [], []
    for epoch in range(cfg.epochs):
        def step_progress(n: int, mean_loss: float, epoch: int = epoch) -> None:
            if n % 50 == 0:
                progress(f"step {n}/{n_per_epoch} of epoch {epoch + 1} ({time.perf_counter() - t1:.0f} s): "
                         f"loss {mean_loss:.3f} per head")

        report.loss_by_epoch.append(train_epoch(heads, train, cfg, opt, sched, index_of, w, rng, step_progress))
        heads.eval()
        teacher, chain = evaluate(heads, held, cfg.n_rows_batch, index_of)
        heads.train()
        progress(f"epoch {epoch + 1}/{cfg.epochs} ({time.perf_counter() - t1:.0f} s): loss {report.loss_by_epoch[-1]:.3f} "
                 f"per head, held-out accuracy by head {[round(a, 3) for a in teacher]}, chain {[round(a, 3) for a in chain]}")
    report.train_s = time.perf_counter() - t1
    report.heldout_accuracy_by_head, report.heldout_chain_acceptance = teacher, chain
    report.heldout_tokens_per_pass = 1 + sum(chain)
    return heads.eval(), report


def train_and_save(base_path: Path, base_sha256: str, cfg: TrainConfig,
                   progress: Callable[[str], None] = log.info) -> tuple[Path, TrainReport]:
    """Train heads for the GGUF at base_path (dequantized to float32) and save them beside it."""
    torch.manual_seed(cfg.seed)
    base = load_model(base_path, torch.float32, "cpu")
    vocab = GGUFVocab(base_path)
    try:
        heads, report = train_heads(base, vocab, cfg, progress, Path(str(base_path) + ".mtp-text.safetensors"))
    finally:
        vocab.close()
    path = save_heads(heads, base_path, {
        "base": str(base_path), "base_sha256": base_sha256, "torch": torch.__version__,
        "method": "self-distillation on the base's greedy continuations of chat-templated requests "
                  "(templated chat questions, code requests, standard-library code edits); no benchmark prompt",
        "training": asdict(report),
    })
    return path, report
