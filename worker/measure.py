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

from worker.contract import Job
from worker.engines.base import Backend


@dataclass
class Measurement:
    samples_ns: list[int]
    # Greedy tokens of the last repetition: a fingerprint of what the model really computed.
    tokens: list[int] = field(default_factory=list)


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


def run_once(backend: Backend, job: Job, context: Sequence[int], tokens: Sequence[int]) -> tuple[int, list[int]]:
    """One repetition from an empty cache; returns (ns timed, greedy tokens produced)."""
    backend.reset()
    next_token = backend.prefill(context) if context else None
    if job.kind == "pp":
        t0 = time.perf_counter_ns()
        out = backend.prefill(tokens)
        return time.perf_counter_ns() - t0, [out]
    token = next_token if next_token is not None else tokens[0]
    produced: list[int] = []
    # Decode is timed directly, token by token, never derived as generate minus prefill.
    t0 = time.perf_counter_ns()
    for _ in range(job.n_gen):
        token = backend.decode(token)
        produced.append(token)
    return time.perf_counter_ns() - t0, produced


def measure(backend: Backend, job: Job) -> Measurement:
    """Warm-up runs, then job.repetitions timed runs; every sample kept."""
    context = input_tokens(backend, job.n_depth, job.prompt_source, job.seed)
    if job.kind == "pp":
        tokens = input_tokens(backend, job.n_prompt, job.prompt_source, job.seed, offset=job.n_depth)
    else:
        tokens = input_tokens(backend, 1, job.prompt_source, job.seed, offset=job.n_depth)
    for _ in range(job.n_warmup):
        run_once(backend, job, context, tokens)
    samples: list[int] = []
    produced: list[int] = []
    for _ in range(job.repetitions):
        ns, produced = run_once(backend, job, context, tokens)
        samples.append(ns)
    return Measurement(samples_ns=samples, tokens=produced)
