"""The torch engine's figures on this machine: decode speed against llama.cpp and the memory
roofline, MTP self-speculation (speedup, acceptance per head, losslessness), and an upcycled
8-expert top-2 MoE against its dense parent.

    PYTHONPATH=. TOKENFARM_MODELS_DIR=... python benchmarks/torch_engine.py [--n-gen 128]

Targets (issue 7): MTP >= 1.4x on CPU at F32 losslessly; torch decode >= 40 % of roofline.
It prints figures and ratios; it asserts nothing (timings are not tests). MTP heads must have
been trained first (`tokenfarm models train-mtp smollm2-135m --heads 2`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from farm.contract import EngineConfig, Job
from farm.memory import context_size
from farm.modelfiles import sha256_file
from farm.settings import load_settings
from worker.engines.torch import TorchBackend
from worker.engines.torch.model import ModelConfig, Transformer
from worker.models import resolve
from worker.speculative import greedy
from worker.tasks import measure_over_prompts


def triad_gbps(n: int = 16_000_000, reps: int = 5) -> float:
    """STREAM triad a = b + s * c in numpy: bytes moved (3 arrays) over the best time."""
    b, c = np.ones(n, np.float32), np.full(n, 2.0, np.float32)
    a = np.empty_like(b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.multiply(c, 3.0, out=a)
        np.add(a, b, out=a)
        best = min(best, time.perf_counter() - t0)
    # multiply reads c and writes a, add reads a and b and writes a: 5 array passes.
    return 5 * n * 4 / best / 1e9


def decode_bytes(model: Transformer, n_expert_used: int | None = None) -> int:
    """Weight bytes one decode step reads: every matrix once (the tied embedding as the output
    only, a lookup reads one row), and of MoE experts only the ones used."""
    total = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or name == "tok_embd.weight" and model.output.weight is not p:
            continue
        seen.add(id(p))
        n = p.numel() * p.element_size()
        if p.dim() == 3 and n_expert_used:  # (X, F, E) stacked experts
            n = n * n_expert_used // p.shape[0]
        total += n
    return total


def torch_decode_tok_s(model: Transformer, first: int, n_gen: int, reps: int) -> tuple[float, list[int]]:
    rates, tokens = [], []
    backend = TorchBackend.from_model(model, n_gen + 8)
    for _ in range(reps + 1):  # the first run warms up
        # The prefill of `first` gives the first token; n_gen - 1 timed decode steps the rest.
        run = greedy(backend, [first], n_gen - 1)
        rates.append((n_gen - 1) * 1e9 / run.decode_ns)
        tokens = run.tokens
    return statistics.median(rates[1:]), tokens


def llama_decode_tok_s(path, first: int, n_gen: int, reps: int, n_threads: int) -> tuple[float, list[int]]:
    from worker.engines.llamacpp import LlamaCppBackend

    be = LlamaCppBackend()
    be.load(path, EngineConfig(n_threads=n_threads), n_gen + 16)
    rates, tokens = [], []
    try:
        for _ in range(reps + 1):
            be.reset()
            token, out = first, []
            t0 = time.perf_counter_ns()
            for _ in range(n_gen):
                token = be.decode(token)
                out.append(token)
            rates.append(n_gen * 1e9 / (time.perf_counter_ns() - t0))
            tokens = out
    finally:
        be.close()
    return statistics.median(rates[1:]), tokens


def upcycle(dense: Transformer, n_expert: int, n_expert_used: int, seed: int = 0) -> Transformer:
    """An MoE whose experts are copies of each dense FFN (slightly perturbed, so they differ)
    with a random router: the measurement issue's upcycling, in memory."""
    c = dense.config
    cfg = ModelConfig(**{**c.__dict__, "n_expert": n_expert, "n_expert_used": n_expert_used})
    g = torch.Generator().manual_seed(seed)
    moe = Transformer(cfg, tied_output=dense.output.weight is dense.tok_embd.weight)
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    with torch.no_grad():
        for i, block in enumerate(dense.blocks):
            ffn = block.ffn
            for name, w in (("w_gate", ffn.w_gate.weight), ("w_up", ffn.w_up.weight), ("w_down", ffn.w_down.weight)):
                stacked = w[None].repeat(n_expert, 1, 1)
                state[f"blocks.{i}.ffn.{name}"] = stacked + 1e-3 * torch.randn(stacked.shape, generator=g)
            state[f"blocks.{i}.ffn.router.weight"] = 0.02 * torch.randn(n_expert, c.n_embd, generator=g)
    moe.load_state_dict(state, strict=False)
    if dense.output.weight is dense.tok_embd.weight:
        moe.output.weight = moe.tok_embd.weight
    return moe.eval()


def mtp_job(args, category: str, n_mtp: int = 1, p_min: float = 0.0) -> Job:
    return Job(job_id="bench", sweep_id="bench", index=0, model=args.model, quant="F32", engine="torch",
               technique="mtp", kind="tg", n_gen=args.n_gen, n_mtp=n_mtp, p_min=p_min, repetitions=args.reps,
               n_warmup=1, prompt_category=category, n_prompts=args.n_prompts)


def mtp_figures(backend: TorchBackend, path, sha: str, settings, args, category: str, n_mtp: int, p_min: float) -> None:
    """One MTP job over a category's chat-templated prompts, baseline timed in the same job."""
    job = mtp_job(args, category, n_mtp, p_min)
    try:
        m, extra = measure_over_prompts(job, backend, settings, sha)
    except Exception as exc:  # a missing head file is a figure we cannot print, not a crash
        print(f"mtp {category} n_mtp={n_mtp}: not measured ({exc})")
        return
    s = extra["speculation"]
    acc = s.acceptance_by_position
    # Head k's proposal counts only when heads 1..k-1 were right: its own hit rate is the ratio.
    given_previous = [a / b if b else 0.0 for a, b in zip(acc, [1.0, *acc[:-1]])]
    base_step_ns = statistics.fmean(s.baseline_samples_ns) / (args.n_gen * len(s.first_mismatch))
    reps = len(m.samples_ns)

    def per_pass(ns: int) -> float:  # in units of one plain decode step
        return ns / max(1, s.n_passes) / base_step_ns

    print(f"mtp {category} n_mtp={n_mtp} p_min={p_min}: {s.baseline_avg_ts:.1f} -> "
          f"{s.baseline_avg_ts * s.speedup:.1f} tok/s, speedup {s.speedup:.2f}x; acceptance by head "
          f"{[round(a, 3) for a in acc]} (given the heads before: {[round(a, 3) for a in given_previous]}); "
          f"{1 + s.mean_accepted_per_pass:.2f} tokens/pass; a pass costs {per_pass(s.verify_ns):.2f} (verify) + "
          f"{per_pass(s.draft_ns):.2f} (draft) plain steps; lossless {s.lossless}"
          f"{'' if s.lossless else ' (first mismatch per prompt: ' + str(s.first_mismatch) + ')'}; {reps} reps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-mtp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--p-min", type=float, nargs="+", default=[0.0, 0.3], help="MTP: stop proposing below this head probability")
    ap.add_argument("--categories", nargs="+", default=["chat", "code"], help="MTP: prompt categories")
    ap.add_argument("--n-prompts", type=int, default=0, help="MTP: prompts of each category; 0: all")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--skip-mtp", action="store_true")
    ap.add_argument("--skip-decode", action="store_true", help="skip torch vs llama.cpp decode and the roofline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Other processes share the cores: the load says how much the figures can be trusted.
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; "
          f"torch {torch.__version__}, {args.threads} threads")
    settings = load_settings()
    path, _ = resolve(args.model, "F32", settings.effective_models_dir)
    sha = sha256_file(path)
    backend = TorchBackend("cpu", "float32")
    # Room for the longest chat-templated prompt the MTP jobs decode after, as a worker makes.
    n_ctx = max([args.n_gen + 64, *(context_size(mtp_job(args, c)) for c in args.categories)])
    backend.load(path, EngineConfig(n_threads=args.threads), n_ctx)
    model = backend.model
    first = backend.tokenize("The", add_bos=True)[-1]

    if not args.skip_decode:
        decode_figures(model, path, first, args)
    if not args.skip_mtp:
        mtp_section(backend, path, sha, settings, args)
    backend.close()
    if not args.skip_moe:
        moe_figures(path, first, args)


def decode_figures(model: Transformer, path, first: int, args) -> None:
    gbps = triad_gbps()
    nbytes = decode_bytes(model)
    roofline = gbps * 1e9 / nbytes
    print(f"memory bandwidth (numpy triad): {gbps:.1f} GB/s; F32 decode reads {nbytes / 1e6:.0f} MB a token; "
          f"roofline {roofline:.1f} tok/s")

    t_tok_s, t_tokens = torch_decode_tok_s(model, first, args.n_gen, args.reps)
    l_tok_s, l_tokens = llama_decode_tok_s(path, first, args.n_gen, args.reps, args.threads)
    agree = next((i for i, (a, b) in enumerate(zip(t_tokens, l_tokens)) if a != b), len(t_tokens))
    print(f"decode tg{args.n_gen}: torch {t_tok_s:.1f} tok/s ({100 * t_tok_s / roofline:.0f} % of roofline), "
          f"llama.cpp {l_tok_s:.1f} tok/s ({100 * l_tok_s / roofline:.0f} %); torch / llama.cpp = {t_tok_s / l_tok_s:.2f}; "
          f"tokens agree for {agree}/{len(t_tokens)}")


def mtp_section(backend: TorchBackend, path, sha: str, settings, args) -> None:
    from worker.engines.torch.mtp import read_provenance

    training = read_provenance(path).get("training", {})
    if training:
        print(f"MTP heads: trained on {training.get('n_train_positions')} positions in "
              f"{training.get('generate_s', 0) + training.get('train_s', 0):.0f} s; held-out accuracy by head "
              f"{[round(a, 3) for a in training.get('heldout_accuracy_by_head', [])]}, held-out chain acceptance "
              f"{[round(a, 3) for a in training.get('heldout_chain_acceptance', [])]}")
    for category in args.categories:
        for n_mtp in args.n_mtp:
            for p_min in args.p_min:
                mtp_figures(backend, path, sha, settings, args, category, n_mtp, p_min)


def moe_figures(path, first: int, args) -> None:
    dense = TorchBackend("cpu", "float32")
    dense.load(path, EngineConfig(n_threads=args.threads), args.n_gen + 16)
    moe = upcycle(dense.model, 8, 2)
    d_tok_s, _ = torch_decode_tok_s(dense.model, first, args.n_gen // 2, args.reps)
    m_tok_s, _ = torch_decode_tok_s(moe, first, args.n_gen // 2, args.reps)
    d_bytes, m_bytes = decode_bytes(dense.model), decode_bytes(moe, n_expert_used=2)
    n_total = sum(p.numel() for p in moe.parameters())
    print(f"MoE 8x top-2 (upcycled, {n_total / 1e6:.0f} M params, {m_bytes / 1e6:.0f} MB active a token) "
          f"{m_tok_s:.1f} tok/s vs dense {d_tok_s:.1f}: MoE / dense = {m_tok_s / d_tok_s:.2f}; "
          f"roofline ratio (dense bytes / MoE active bytes) = {d_bytes / m_bytes:.2f}")
    dense.close()


if __name__ == "__main__":
    main()
