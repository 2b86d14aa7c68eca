"""Speculation and MTP jobs on the torch engine: baseline and technique timed in one job.

`measure_technique` is the hook tasks.execute calls for a torch job whose technique is not
baseline. It times plain decoding and the technique alternately, prompt by prompt, over the
prompts of the job's category (so a noisy, shared machine slows both alike), reports the
technique's samples, and fills the same `Speculation` block as the llama.cpp engine: speedup,
acceptance statistics and losslessness (the greedy tokens compared with plain greedy decoding;
sampled decoding is recorded the same way, though it is not meant to match).

It owns the pairing of a job with a drafter (MTP heads beside the model file, a draft model
through the model store, or lookup); the loops are speculative.py's, the schema contract.py's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from farm.contract import QUANTS, Job
from farm.identity import output_sha256
from worker.engines.base import EngineError
from worker.engines.torch.backend import TorchBackend
from worker.engines.torch.mtp import MTPError, load_heads
from worker.engines.torch.speculative import (
    LookupDrafter,
    ModelDrafter,
    MTPDrafter,
    SpecStats,
    generate,
    synchronize,
)
from worker.measure import Measurement, speculation_block


def _draft_backend(job: Job, target: TorchBackend, models_dir: Path, n_ctx: int) -> tuple[TorchBackend, str]:
    from farm.modelfiles import read_facts, sha256_file
    from worker.models import resolve

    draft_ref = job.draft_model
    source = Path(draft_ref).expanduser()
    quant = job.draft_quant
    if quant is None:
        # Without a quant the draft runs as its file is (catalogue entries: their own quant).
        from farm.modelfiles import CATALOGUE

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
    """Time plain decoding and job.technique alternately over the category's prompts.

    Returns the technique's Measurement (a sample: one repetition's decode time summed over the
    prompts, as the llama.cpp engine's speculation reports it) and the Result fields it adds:
    the shared `Speculation` block and, for spec, the draft's sha256.
    """
    from worker.speculative import prompt_tokens

    model = backend.model
    device = backend.device
    prompts = prompt_tokens(backend, job)
    n_draft = job.n_mtp if job.technique == "mtp" else job.n_draft
    n_ctx = max(len(p) for p in prompts) + job.n_gen + n_draft + 16
    cache = model.new_cache(n_ctx)
    extra: dict = {}
    draft: TorchBackend | None = None
    if job.technique == "mtp":
        try:
            drafter = MTPDrafter(load_heads(model, model_path, job.n_mtp, base_sha256=model_sha256), n_ctx, job.p_min)
        except MTPError as exc:
            raise EngineError(str(exc)) from exc
    elif job.technique == "lookup":
        drafter = LookupDrafter(job.ngram_max, job.n_draft)
    elif job.technique == "spec":
        draft, extra["draft_sha256"] = _draft_backend(job, backend, models_dir, n_ctx)
        drafter = ModelDrafter(draft.model, draft.model.new_cache(n_ctx), job.n_draft, job.p_min)
    else:
        raise EngineError(f"technique {job.technique!r} is not one the torch engine runs as speculation")

    def run(seq: list[int], with_drafter: bool, seed: int) -> tuple[int, list[int], SpecStats]:
        prompt_hidden = None
        with torch.inference_mode():
            if len(seq) > 1:
                # The prefill is untimed for both; its hidden states are the MTP heads' context,
                # which the heads themselves read inside the timed decode.
                _, h = model(torch.tensor([seq[:-1]], device=device), 0, cache, all_logits=False)
                prompt_hidden = h[0]  # (P - 1, E)
        g = torch.Generator(device=device).manual_seed(seed)
        d = drafter if with_drafter else None
        if isinstance(d, ModelDrafter):
            d.generator = g
        synchronize(device)
        t0 = time.perf_counter_ns()
        out = generate(model, cache, seq, job.n_gen, drafter=d, n_draft=n_draft if d else 0,
                       temperature=job.temperature, generator=g, prompt_hidden=prompt_hidden)
        synchronize(device)
        return time.perf_counter_ns() - t0, out.tokens, out.stats

    try:
        for i in range(job.n_warmup):
            run(prompts[0], False, job.seed + i)
            run(prompts[0], True, job.seed + i)
        base_samples, samples = [], []
        stats = SpecStats()
        base_tokens: list[list[int]] = []
        tech_tokens: list[list[int]] = []
        for i in range(job.repetitions):
            base_tokens, tech_tokens = [], []
            base_ns = ns = 0
            for prompt in prompts:
                # Alternating prompt by prompt, so that load from other processes falls on both alike.
                t, toks, _ = run(prompt, False, job.seed + i)
                base_ns += t
                base_tokens.append(toks)
                t, toks, s = run(prompt, True, job.seed + i)
                ns += t
                tech_tokens.append(toks)
                stats.merge(s)
            base_samples.append(base_ns)
            samples.append(ns)
    finally:
        if draft is not None:
            draft.close()

    # Sampled decoding is not meant to equal greedy: its "mismatch" is recorded all the same.
    extra["speculation"] = speculation_block(
        job.n_gen * len(prompts), base_samples, samples, stats.n_drafted, stats.n_accepted, stats.n_passes,
        stats.drafted_by_position, stats.accepted_by_position, stats.draft_ns, stats.verify_ns,
        base_tokens, tech_tokens,
    )
    # The job's greedy identity is the baseline's, so it compares with any run of the same prompts.
    extra["output_sha256"] = output_sha256(base_tokens)
    return Measurement(samples_ns=samples, tokens=tech_tokens[-1] if tech_tokens else []), extra
