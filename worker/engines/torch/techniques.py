"""Speculation and MTP jobs on the torch engine: baseline and technique timed in one job.

`measure_technique` is the hook tasks.execute calls for a torch job whose technique is not
baseline. It times plain decoding and the technique alternately on the same input (so a
noisy, shared machine slows both alike), reports the technique's samples as the job's
samples, and adds the speedup, acceptance statistics and losslessness (greedy: the tokens
compared with plain greedy decoding; sampled: not defined, left None).

It owns the pairing of a job with a drafter (MTP heads beside the model file, a draft model
through the model store, or lookup); the loops are speculative.py's, the schema contract.py's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from worker.contract import Job, QUANTS
from worker.engines.base import EngineError
from worker.engines.torch.backend import TorchBackend
from worker.engines.torch.mtp import MTPError, load_heads
from worker.engines.torch.speculative import (
    LookupDrafter, ModelDrafter, MTPDrafter, SpecStats, generate, synchronize,
)
from worker.measure import Measurement, input_tokens


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token; None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _draft_backend(job: Job, target: TorchBackend, models_dir: Path, n_ctx: int) -> tuple[TorchBackend, str]:
    from worker.models import read_facts, resolve, sha256_file

    draft_ref = job.draft_model
    source = Path(draft_ref).expanduser()
    quant = job.draft_quant
    if quant is None:
        # Without a quant the draft runs as its file is (catalogue entries: their own quant).
        from worker.models import CATALOGUE

        quant = CATALOGUE[draft_ref].quant if draft_ref in CATALOGUE else read_facts(source).file_type
    if quant not in QUANTS:
        raise EngineError(f"draft {draft_ref!r} has type {quant!r}, which cannot be derived: give draft_quant")
    path, _ = resolve(draft_ref, quant, models_dir)
    draft = TorchBackend(str(target.device), str(target.dtype).removeprefix("torch."))
    draft.load(path, job.config, n_ctx)
    if draft.n_vocab != target.n_vocab:
        draft.close()
        raise EngineError(f"draft {draft_ref!r} has {draft.n_vocab} tokens, the target {target.n_vocab}: "
                          "speculation needs one vocabulary; pick a draft of the same family")
    probe = "The farm woke before the sun. def f(x): return x * 2"
    if draft.tokenize(probe) != target.tokenize(probe):
        draft.close()
        raise EngineError(f"draft {draft_ref!r} tokenizes text differently from the target: pick a draft of the same family")
    return draft, sha256_file(path)


def measure_technique(backend: TorchBackend, job: Job, model_path: Path, model_sha256: str,
                      models_dir: Path) -> tuple[Measurement, dict]:
    """Time plain decoding and job.technique alternately; returns the technique's Measurement
    and the Result fields it adds."""
    model = backend.model
    device = backend.device
    context = input_tokens(backend, job.n_depth, job.prompt_source, job.seed)
    first = input_tokens(backend, 1, job.prompt_source, job.seed, offset=job.n_depth)
    seq = context + first
    n_draft = job.n_mtp if job.technique == "mtp" else job.n_draft
    n_ctx = len(seq) + job.n_gen + n_draft + 16
    cache = model.new_cache(n_ctx)
    extra: dict = {}
    draft: TorchBackend | None = None
    if job.technique == "mtp":
        try:
            drafter = MTPDrafter(load_heads(model, model_path, job.n_mtp, base_sha256=model_sha256))
        except MTPError as exc:
            raise EngineError(str(exc)) from exc
    elif job.technique == "lookup":
        drafter = LookupDrafter(job.ngram_max, job.n_draft)
    elif job.technique == "spec":
        draft, extra["draft_sha256"] = _draft_backend(job, backend, models_dir, n_ctx)
        drafter = ModelDrafter(draft.model, draft.model.new_cache(n_ctx), job.n_draft, job.p_min)
    else:
        raise EngineError(f"technique {job.technique!r} is not one the torch engine runs as speculation")

    def run(with_drafter: bool, seed: int) -> tuple[int, list[int], SpecStats]:
        with torch.inference_mode():
            if len(seq) > 1:
                model(torch.tensor([seq[:-1]], device=device), 0, cache, all_logits=False)
        g = torch.Generator(device=device).manual_seed(seed)
        d = drafter if with_drafter else None
        if isinstance(d, ModelDrafter):
            d.reset()
            d.generator = g
        synchronize(device)
        t0 = time.perf_counter_ns()
        out = generate(model, cache, seq, job.n_gen, drafter=d, n_draft=n_draft if d else 0,
                       temperature=job.temperature, generator=g)
        synchronize(device)
        return time.perf_counter_ns() - t0, out.tokens, out.stats

    try:
        for i in range(job.n_warmup):
            run(False, job.seed + i)
            run(True, job.seed + i)
        base_ns, tech_ns = [], []
        stats = SpecStats()
        base_tokens: list[int] = []
        tech_tokens: list[int] = []
        for i in range(job.repetitions):
            # Alternating, so that load from other processes falls on both alike.
            ns, base_tokens, _ = run(False, job.seed + i)
            base_ns.append(ns)
            ns, tech_tokens, s = run(True, job.seed + i)
            tech_ns.append(ns)
            stats.merge(s)
    finally:
        if draft is not None:
            draft.close()

    base_tok_s = sum(job.n_gen * 1e9 / ns for ns in base_ns) / len(base_ns)
    tech_tok_s = sum(job.n_gen * 1e9 / ns for ns in tech_ns) / len(tech_ns)
    greedy = job.temperature == 0.0
    divergence = first_divergence(tech_tokens, base_tokens) if greedy else None
    extra.update(
        speedup=tech_tok_s / base_tok_s,
        acceptance_rate=stats.acceptance_rate,
        mean_accepted_len=stats.mean_accepted_len,
        acceptance_by_position=stats.acceptance_by_position,
        lossless=(divergence is None) if greedy else None,
        first_divergence=divergence,
        draft_ns=stats.draft_ns,
        verify_ns=stats.verify_ns,
    )
    return Measurement(samples_ns=tech_ns, tokens=tech_tokens), extra
