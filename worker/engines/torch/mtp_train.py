"""Training MTP heads on a frozen base model by self-distillation, on a CPU in minutes.

The text is the base model's own: greedy continuations of the project's prompts (the corpus,
worker/data/mtp_prompts.txt and any prompt files under worker/data/prompts/), generated in
batches with the base's KV cache. Head k at position i learns the base's token at i + k + 1
from the base's hidden state at i and the tokens in between (teacher forcing), with
cross-entropy; the base is never updated. Whole sequences are held out to report accuracy
on text the heads have not seen, both teacher-forced and as the greedy chain that speculation
runs (a head's proposal only counts when every head before it was right too).

It owns the data generation, the training loop and the figures; the heads themselves and
their file format are mtp.py's. It knows nothing of jobs or the CLI.
"""

from __future__ import annotations

import json
import logging
import random
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
    n_prompt: int = 12  # tokens of each prompt (BOS included); equal lengths batch without padding
    n_cont: int = 64  # greedy tokens the base adds to each prompt
    n_seq: int = 64
    heldout_frac: float = 0.125
    n_batch_gen: int = 64  # one decode step reads the weights once for the whole batch
    epochs: int = 6
    lr: float = 2e-3
    n_batch_train: int = 64  # positions per optimizer step: small data wants many small steps
    n_head_vocab: int = 4096  # 0: the whole vocabulary
    seed: int = 0


@dataclass
class TrainReport:
    config: dict
    n_train_positions: int
    n_heldout_positions: int
    n_head_vocab: int
    loss_by_epoch: list[float] = field(default_factory=list)
    heldout_accuracy_by_head: list[float] = field(default_factory=list)
    heldout_chain_acceptance: list[float] = field(default_factory=list)
    generate_s: float = 0.0
    train_s: float = 0.0


def prompt_texts() -> list[str]:
    """The project's prompt texts: corpus sentences, the MTP prompt list, prompt files."""
    data = resources.files("worker").joinpath("data")
    texts: list[str] = []
    corpus = data.joinpath("corpus.txt").read_text(encoding="utf-8")
    for paragraph in corpus.split("\n"):
        texts += [s.strip() + "." for s in paragraph.split(". ") if len(s.strip()) > 20]
    lines = data.joinpath("mtp_prompts.txt").read_text(encoding="utf-8").splitlines()
    texts += [ln for ln in lines if ln.strip() and not ln.startswith("## ")]
    prompts_dir = Path(str(data.joinpath("prompts")))
    if prompts_dir.is_dir():
        for f in sorted(prompts_dir.rglob("*")):
            if f.suffix == ".txt":
                texts += [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            elif f.suffix == ".jsonl":
                for ln in f.read_text(encoding="utf-8").splitlines():
                    if ln.strip():
                        row = json.loads(ln)
                        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                            texts.append(row["prompt"])
    return texts


def make_prompts(vocab: GGUFVocab, cfg: TrainConfig) -> list[list[int]]:
    """n_seq prompts of exactly n_prompt tokens: each text's start, windows of a text stream
    after that (the model has no padding mask, so a batch needs equal lengths)."""
    rng = random.Random(cfg.seed)
    bos = vocab.tokenize("", add_bos=True)
    body = cfg.n_prompt - len(bos)
    encoded = [vocab.tokenize(t, add_bos=False) for t in prompt_texts()]
    stream = [tok for ids in encoded for tok in ids]
    prompts = [bos + ids[:body] for ids in encoded if len(ids) >= body]
    while len(prompts) < cfg.n_seq:
        start = rng.randrange(0, len(stream) - body)
        prompts.append(bos + stream[start:start + body])
    rng.shuffle(prompts)
    return prompts[:cfg.n_seq]


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: list[list[int]], n_cont: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations of equal-length prompts; returns tokens (B, L) and the base's
    final hidden state at every position (B, L, E), L = prompt + n_cont."""
    ids = torch.tensor(prompts)  # (B, P)
    B, P = ids.shape
    cache = model.new_cache(P + n_cont, n_batch=B)
    logits, hidden = model(ids, 0, cache, all_logits=False)
    tokens, hiddens = [ids], [hidden]
    for step in range(n_cont):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(nxt)
        if step == n_cont - 1:
            break
        logits, hidden = model(nxt, P + step, cache, all_logits=False)
        hiddens.append(hidden)
    # The last token's hidden state is never an input: nothing after it is known.
    hiddens.append(torch.zeros_like(hidden))
    return torch.cat(tokens, 1), torch.cat(hiddens, 1)


def training_rows(tokens: torch.Tensor, hidden: torch.Tensor, n_prompt: int, n_mtp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (hidden at i, tokens i+1 .. i+n_mtp+1) for every i whose targets the base generated."""
    L = tokens.shape[1]
    first, last = n_prompt - 1, L - n_mtp - 2  # x[i+1] is the first generated token at i = P - 1
    h = hidden[:, first:last + 1].reshape(-1, hidden.shape[-1])  # (M, E)
    windows = torch.stack([tokens[:, first + 1 + j:last + 2 + j] for j in range(n_mtp + 1)], -1)  # (B, n, n_mtp+1)
    return h, windows.reshape(-1, n_mtp + 1)


def choose_vocab(targets: torch.Tensor, extra: list[int], n_vocab: int, n_head_vocab: int) -> torch.Tensor | None:
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


def head_loss(heads: MTPHeads, h: torch.Tensor, toks: torch.Tensor, index_of: torch.Tensor | None,
              cos, sin, w: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Summed cross-entropy of the heads, teacher-forced; also each head's argmax (as indices)."""
    loss = h.new_zeros(())
    preds = []
    for k in range(heads.n_mtp):
        h = heads.heads[k](h, heads.base.tok_embd(toks[:, k]), cos, sin)
        logits = heads.logits(h, k, w)
        target = toks[:, k + 1] if index_of is None else index_of[toks[:, k + 1]]
        loss = loss + F.cross_entropy(logits.float(), target, ignore_index=-100)
        preds.append(logits.argmax(-1))
    return loss, preds


@torch.no_grad()
def evaluate(heads: MTPHeads, h: torch.Tensor, toks: torch.Tensor, index_of, cos, sin) -> tuple[list[float], list[float]]:
    """Held-out accuracy per head (teacher-forced), and the greedy chain's acceptance by depth:
    the fraction of positions where heads 1..k all proposed the base's tokens."""
    w = heads.output_weight()
    _, preds = head_loss(heads, h, toks, index_of, cos, sin, w)
    teacher = [float((heads.to_token(p) == toks[:, k + 1]).float().mean()) for k, p in enumerate(preds)]
    chain, alive = [], torch.ones(len(h), dtype=torch.bool)
    hk, tok = h, toks[:, 0]
    for k in range(heads.n_mtp):
        hk = heads.heads[k](hk, heads.base.tok_embd(tok), cos, sin)
        tok = heads.to_token(heads.logits(hk, k, w).argmax(-1))
        alive &= tok == toks[:, k + 1]
        chain.append(float(alive.float().mean()))
    return teacher, chain


def distillation_text(base: Transformer, vocab: GGUFVocab, cfg: TrainConfig, cache_path: Path | None,
                      progress: Callable[[str], None]) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Prompts, the base's greedy continuations (B, L) and its hidden states (B, L, E); reused
    from cache_path when it was made with the same prompts and lengths (generation is the slow
    part of training on a CPU, and retraining with other settings needs the same text)."""
    prompts = make_prompts(vocab, cfg)
    key = json.dumps({"prompts": prompts, "n_cont": cfg.n_cont})
    if cache_path is not None and cache_path.exists():
        from safetensors import safe_open

        with safe_open(str(cache_path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                progress(f"reusing the base's continuations from {cache_path.name}")
                return prompts, f.get_tensor("tokens"), f.get_tensor("hidden")
    t0 = time.perf_counter()
    toks_all, hid_all = [], []
    for start in range(0, len(prompts), cfg.n_batch_gen):
        t, h = generate_batch(base, prompts[start:start + cfg.n_batch_gen], cfg.n_cont)
        toks_all.append(t)
        hid_all.append(h)
        progress(f"generated {start + t.shape[0]}/{len(prompts)} continuations ({time.perf_counter() - t0:.0f} s)")
    tokens, hidden = torch.cat(toks_all), torch.cat(hid_all)
    if cache_path is not None:
        from safetensors.torch import save_file

        save_file({"tokens": tokens.contiguous(), "hidden": hidden.float().contiguous()}, str(cache_path),
                  metadata={"key": key})
    return prompts, tokens, hidden


def train_heads(base: Transformer, vocab: GGUFVocab, cfg: TrainConfig,
                progress: Callable[[str], None] = log.info, cache_path: Path | None = None) -> tuple[MTPHeads, TrainReport]:
    torch.manual_seed(cfg.seed)
    for p in base.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    prompts, tokens, hidden = distillation_text(base, vocab, cfg, cache_path, progress)
    generate_s = time.perf_counter() - t0

    n_held = max(1, int(round(len(prompts) * cfg.heldout_frac)))
    h_train, y_train = training_rows(tokens[n_held:], hidden[n_held:], cfg.n_prompt, cfg.n_mtp)
    h_held, y_held = training_rows(tokens[:n_held], hidden[:n_held], cfg.n_prompt, cfg.n_mtp)
    prompt_tokens = [t for p in prompts[n_held:] for t in p]
    head_vocab = choose_vocab(y_train, prompt_tokens, base.config.n_vocab, cfg.n_head_vocab)
    index_of = None
    if head_vocab is not None:
        index_of = torch.full((base.config.n_vocab,), -100, dtype=torch.long)
        index_of[head_vocab] = torch.arange(len(head_vocab))

    heads = MTPHeads(base, cfg.n_mtp, head_vocab)
    heads.init_from_base()
    heads.train()
    cos, sin = heads.rope_identity()
    w = heads.output_weight().detach()
    opt = torch.optim.AdamW(heads.heads.parameters(), lr=cfg.lr, weight_decay=0.0)
    n_steps = cfg.epochs * ((len(h_train) + cfg.n_batch_train - 1) // cfg.n_batch_train)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=n_steps, pct_start=0.1)
    report = TrainReport(config=asdict(cfg), n_train_positions=len(h_train), n_heldout_positions=len(h_held),
                         n_head_vocab=len(head_vocab) if head_vocab is not None else base.config.n_vocab,
                         generate_s=generate_s)
    t1 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(h_train), generator=g)
        total, n = 0.0, 0
        for start in range(0, len(order), cfg.n_batch_train):
            rows = order[start:start + cfg.n_batch_train]
            loss, _ = head_loss(heads, h_train[rows], y_train[rows], index_of, cos, sin, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
            n += len(rows)
        report.loss_by_epoch.append(total / n / cfg.n_mtp)
        heads.eval()
        teacher, chain = evaluate(heads, h_held, y_held, index_of, cos, sin)
        heads.train()
        progress(f"epoch {epoch + 1}/{cfg.epochs}: loss {report.loss_by_epoch[-1]:.3f} per head, "
                 f"held-out accuracy by head {[round(a, 3) for a in teacher]}, chain {[round(a, 3) for a in chain]}")
    report.train_s = time.perf_counter() - t1
    report.heldout_accuracy_by_head, report.heldout_chain_acceptance = teacher, chain
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
        "method": "self-distillation on the base's greedy continuations of the project's prompts",
        "training": asdict(report),
    })
    return path, report
