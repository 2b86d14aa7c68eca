"""The measurement core: warm-up, repetitions, timers and their raw samples.

Pure by design: it sees a Backend and a Job, never Celery, SQL or a model file, so it runs the
same from a worker, a benchmark script or a test with a fake backend.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Sequence

from farm.contract import Job, Speculation
from farm.identity import first_difference, tokens_sha256
from farm.stats import summarize
from worker.engines.base import Backend


@dataclass
class Measurement:
    samples_ns: list[int]
    # Greedy tokens of the last repetition: a fingerprint of what the model really computed.
    tokens: list[int] = field(default_factory=list)
    # Prefill from an empty cache to its greedy token (pp and pg at depth 0), per repetition.
    ttft_samples_ns: list[int] = field(default_factory=list)
    # The decode loop alone, per repetition (tg and pg), read from its own timer.
    decode_samples_ns: list[int] = field(default_factory=list)


@dataclass
class Run:
    total_ns: int
    tokens: list[int]
    prefill_ns: int = 0
    decode_ns: int = 0


def corpus_text() -> str:
    return resources.files("worker").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def input_tokens(backend: Backend, n: int, source: str, seed: int, offset: int = 0) -> list[int]:
    """n tokens of input: real text by default (MoE routing and lookup depend on real tokens)."""
    if n == 0:
        return []
    if source == "random":
        rng = random.Random(seed + offset)
        # Skip the low ids, where tokenizers keep their special and byte tokens.
        return [rng.randrange(min(256, backend.n_vocab - 1), backend.n_vocab) for _ in range(n)]
    text_tokens = backend.tokenize(corpus_text(), add_bos=False)
    bos = backend.tokenize("", add_bos=True)
    stream = (text_tokens * (1 + (offset + n) // max(1, len(text_tokens))))[offset:offset + n]
    # A sequence starts with BOS like a real prompt; only at the start of the context.
    return (bos + stream)[:n] if offset == 0 else stream


def run_once(backend: Backend, job: Job, context: Sequence[int], tokens: Sequence[int],
             known: Sequence[int] | None = None) -> Run:
    """One repetition from an empty cache: the untimed depth context, then the timed test.

    known: the greedy tokens an earlier repetition of the same test produced. They are fed back
    instead of asked for, where the engine can feed (backend.feed): a timed step is then a decode
    and a wait, as llama-bench's is, with no arg-max over the vocabulary; the computation is the
    same, since the tokens and their positions are the same."""
    backend.reset()
    next_token = backend.prefill(context) if context else None
    if job.kind in ("pp", "pg"):
        t0 = time.perf_counter_ns()
        token = backend.prefill(tokens)
        t1 = time.perf_counter_ns()
        if job.kind == "pp":
            return Run(t1 - t0, [token], prefill_ns=t1 - t0)
    else:
        token = next_token if next_token is not None else tokens[0]
        t0 = t1 = time.perf_counter_ns()
    feed = getattr(backend, "feed", None) if known is not None and len(known) == job.n_gen else None
    if feed is not None:
        # The last known token is the greedy successor of the last step: never fed.
        feed(token)
        for fed in known[:-1]:
            feed(fed)
        t2 = time.perf_counter_ns()
        return Run(t2 - t0, list(known), prefill_ns=t1 - t0, decode_ns=t2 - t1)
    produced: list[int] = []
    # Decode is timed directly, token by token, never derived as generate minus prefill.
    for _ in range(job.n_gen):
        token = backend.decode(token)
        produced.append(token)
    t2 = time.perf_counter_ns()
    return Run(t2 - t0, produced, prefill_ns=t1 - t0, decode_ns=t2 - t1)


def measure(backend: Backend, job: Job) -> Measurement:
    """Warm-up runs, then job.repetitions timed runs; every sample kept.

    The first run (the warm-up, or the first timed repetition without one) decodes greedily and
    its tokens are the Measurement's; later runs feed those tokens back (run_once)."""
    context = input_tokens(backend, job.n_depth, job.prompt_source, job.seed)
    n_input = job.n_prompt if job.kind in ("pp", "pg") else 1
    tokens = input_tokens(backend, n_input, job.prompt_source, job.seed, offset=job.n_depth)
    greedy: list[int] | None = None
    for _ in range(job.n_warmup):
        greedy = run_once(backend, job, context, tokens, greedy).tokens
    runs = []
    for _ in range(job.repetitions):
        runs.append(run_once(backend, job, context, tokens, greedy))
        greedy = runs[-1].tokens
    return Measurement(
        samples_ns=[r.total_ns for r in runs],
        tokens=runs[-1].tokens,
        ttft_samples_ns=[r.prefill_ns for r in runs] if job.kind != "tg" and job.n_depth == 0 else [],
        decode_samples_ns=[r.decode_ns for r in runs] if job.kind != "pp" else [],
    )


def decode_context(job: Job) -> float:
    """Mean number of cached positions a decode step of this job attends to."""
    start = job.n_depth + 1 + (job.n_prompt if job.kind == "pg" else 0)
    return start + (job.n_gen - 1) / 2


def roofline_tok_s(bandwidth_gbps: float, active_bytes: int, kv_bytes_per_token: int, n_context: float,
                   device_share: float = 0.0, device_bandwidth_gbps: float = 0.0) -> float:
    """Decode's memory-bound ceiling: each token reads the active weights and the KV cache once.

    bandwidth_gbps is the host's. device_share of those bytes sit in device memory (offloaded
    layers) and stream at device_bandwidth_gbps: a partial offload is bound by the sum of both
    reads, not by either bandwidth alone. Returns 0.0 when a bandwidth needed or the model's
    active bytes are unknown.
    """
    bytes_per_token = active_bytes + kv_bytes_per_token * n_context
    if active_bytes <= 0:
        return 0.0
    device_share = min(max(device_share, 0.0), 1.0)
    s_per_token = 0.0
    for share, gbps in ((device_share, device_bandwidth_gbps), (1.0 - device_share, bandwidth_gbps)):
        if share > 0:
            if gbps <= 0:
                return 0.0
            s_per_token += share * bytes_per_token / (gbps * 1e9)
    return 1.0 / s_per_token if s_per_token else 0.0


def device_share(engine: str, n_gpu_layers: int, n_layer: int, flags: dict) -> float:
    """The share of a decode step's weight reads served from device memory, from what the engine
    reports it ran with (flags: Conditions.flags): the torch engine is on its device whole; llama.cpp
    offloads n_gpu_layers of n_layer repeating layers, and only where its build can offload at all
    (a CPU build given -ngl 99 still reads every weight from host memory)."""
    if engine == "torch":
        return 1.0 if str(flags.get("device", "")).startswith("cuda") else 0.0
    if not flags.get("gpu_offload") or n_gpu_layers == 0:
        return 0.0
    if n_gpu_layers < 0 or n_layer <= 0 or n_gpu_layers >= n_layer:
        return 1.0
    return n_gpu_layers / n_layer


def speculation_block(n_tokens: int, baseline_samples_ns: list[int], samples_ns: list[int], n_drafted: int,
             n_accepted: int, n_passes: int, drafted_at: list[int], accepted_at: list[int], draft_ns: int,
             verify_ns: int, baseline_tokens: Sequence[Sequence[int]],
             tokens: Sequence[Sequence[int]]) -> Speculation:
    """The block from raw counts and per-prompt tokens, every ratio, verdict and hash derived
    here so engines cannot disagree on one."""
    first_mismatch = [first_difference(b, t) for b, t in zip(baseline_tokens, tokens, strict=True)]
    base_avg, _ = summarize(n_tokens, baseline_samples_ns)
    avg, _ = summarize(n_tokens, samples_ns)
    return Speculation(
        baseline_samples_ns=baseline_samples_ns, baseline_avg_ts=base_avg, speedup=avg / base_avg,
        n_drafted=n_drafted, n_accepted=n_accepted, n_passes=n_passes,
        acceptance_rate=n_accepted / n_drafted if n_drafted else 0.0,
        mean_accepted_per_pass=n_accepted / n_passes if n_passes else 0.0,
        acceptance_by_position=[a / d if d else 0.0 for a, d in zip(accepted_at, drafted_at)],
        draft_ns=draft_ns, verify_ns=verify_ns,
        first_mismatch=first_mismatch, lossless=all(m is None for m in first_mismatch),
        baseline_sha256=[tokens_sha256(b) for b in baseline_tokens],
        output_sha256=[tokens_sha256(t) for t in tokens],
    )
