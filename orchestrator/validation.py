"""Validation of what a worker sends: a Result checked against its Job and against itself.

The worker is untrusted, so everything that can be recomputed from the samples and hashes a
Result carries is recomputed here. Pure: no database, no broker; the collector calls it and
decides what a refusal means.
"""

from __future__ import annotations

import itertools
import math

from farm.contract import (
    EVAL_TEXTS,
    TECHNIQUE_FIELDS,
    Capabilities,
    Job,
    Result,
    accelerators,
    backend_problems,
    kind_of_test,
    tokens_per_run,
)
from farm.identity import combine_sha256, is_sha256
from farm.stats import sample_stats, summarize


def result_problems(result: Result, job: Job | None = None, from_worker: bool = True) -> list[str]:
    """Why this Result cannot be what it claims; empty when it is result-consistent.

    A worker is untrusted, so the collector recomputes what can be recomputed. `from_worker`
    False: an operator's trusted import (llama-bench), whose tool hashes neither the model nor
    its output, so those two are not asked for; everything else is.
    """
    problems: list[str] = []
    if job is not None:
        for field in ("job_id", "sweep_id", "model", "quant", "technique", "test",
                      "n_prompt", "n_gen", "n_depth"):
            want = job.test if field == "test" else getattr(job, field)
            if getattr(result, field) != want:
                problems.append(f"{field} is {getattr(result, field)!r}, the job asked for {want!r}")
        if result.backend != job.engine:
            problems.append(f"backend is {result.backend!r}, the job asked for {job.engine!r}")
        if job.model_sha256 and result.source_sha256 and result.source_sha256 != job.model_sha256:
            problems.append("source_sha256 differs from the job's model_sha256")
        for field in TECHNIQUE_FIELDS:
            if field == "n_prompts" and job.n_prompts == 0:
                continue  # 0 asks for the whole category; the result says how many that was
            if getattr(result, field) != getattr(job, field):
                problems.append(f"{field} is {getattr(result, field)!r}, the job asked for {getattr(job, field)!r}")
    problems += hardware_problems(result, from_worker)
    if result.status == "failed":
        if not result.error:
            problems.append("a failed result must say why")
        return problems
    if job is not None and result.repetitions != job.repetitions:
        problems.append(f"repetitions is {result.repetitions}, the job asked for {job.repetitions}")
    if len(result.samples_ns) != result.repetitions:
        problems.append(f"{len(result.samples_ns)} samples for {result.repetitions} repetitions")
    if any(ns <= 0 for ns in result.samples_ns):
        problems.append("a sample is not a positive duration")
    if problems or not result.samples_ns:
        return problems or ["no samples"]
    n_tokens = tokens_per_run(kind_of_test(result.test), result.n_prompt, result.n_gen)
    if result.prompt_category and not result.test.startswith("pp"):
        n_tokens = result.n_gen * result.n_prompts
        if result.n_prompts < 1:
            return problems + ["a result over prompts must say how many (n_prompts)"]
    mean, std = summarize(n_tokens, result.samples_ns)
    if not math.isclose(mean, result.avg_ts, rel_tol=1e-6):
        problems.append(f"avg_ts {result.avg_ts:.6g} does not match the samples ({mean:.6g})")
    if not math.isclose(std, result.stddev_ts, rel_tol=1e-6, abs_tol=1e-9):
        problems.append(f"stddev_ts {result.stddev_ts:.6g} does not match the samples ({std:.6g})")
    if result.stats.median_ts and not math.isclose(
            result.stats.median_ts, sample_stats(n_tokens, result.samples_ns).median_ts, rel_tol=1e-6):
        problems.append("stats.median_ts does not match the samples")
    if from_worker and not result.model_sha256:
        problems.append("model_sha256 is missing")
    if from_worker and not is_sha256(result.output_sha256):
        problems.append("output_sha256 is missing or not a sha256 hex digest")
    if result.technique != "baseline":
        problems += _speculation_problems(result, n_tokens, mean)
    problems += quality_problems(result, job)
    return problems


def _no_gpu_backend(n_gpus: int, backends: str) -> str | None:
    if n_gpus and backends and not accelerators(backends):
        return (f"hardware.n_gpus is {n_gpus} but backends {backends!r} name no GPU backend: "
                "ggml's GPU devices come from one")
    return None


def hardware_problems(result: Result, from_worker: bool = True) -> list[str]:
    """What no real build reports of the hardware a Result ran on: a backend name no llama.cpp or
    torch build spells (farm.contract.GGML_BACKENDS), one twice; and, from a worker, llama.cpp GPU
    devices without a GPU backend, or an ok run on more GPUs (tensor_split's, main_gpu's) than it
    had (the engine refuses such a config at load). An import names no GPU count, so it is not
    held to one."""
    hw = result.hardware
    problems = [f"hardware.{p}" for p in backend_problems(hw.backends)]
    if not from_worker or problems:
        return problems
    if result.backend == "llamacpp" and (line := _no_gpu_backend(hw.n_gpus, hw.backends)):
        problems.append(line)
    named = result.config.n_gpus_named
    if result.status == "ok" and result.backend == "llamacpp" and named > hw.n_gpus:
        problems.append(f"config {result.config.named_gpus_text()} places the model on {named} devices on hardware "
                        f"with {hw.n_gpus} GPUs (n_gpus): llama.cpp's engine refuses that at load, so no run measured it")
    return problems


def capabilities_problems(caps: Capabilities) -> list[str]:
    """What no real worker announces of its machine: the same backend spellings as a Result's, and
    for a llama.cpp worker GPU devices without a GPU backend. Routing trusts n_gpus and the
    backends to send tensor splits and to label the box, so a wrong announcement is refused, not
    stored."""
    hw = caps.hardware
    problems = [f"capabilities.hardware.{p}" for p in backend_problems(hw.backends)]
    if not problems and "llamacpp" in caps.engines and (line := _no_gpu_backend(hw.n_gpus, hw.backends)):
        problems.append(f"capabilities.{line}")
    return problems


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def quality_problems(result: Result, job: Job | None = None) -> list[str]:
    """A quality block against its job and against its own samples (worker/quality.py's figures).

    The statistics are recomputed from the per-chunk samples: every chunk scores the same number
    of tokens (n_ctx - 1 - n_ctx // 2), so the means are plain means of the chunk means; ppl is
    exp of the mean nll; median, p99 and max are the percentiles' [50], [99] and [100]. Whether
    the reference is the model's is the collector's check against what the farm has stored
    (orchestrator/collector.py reference_problems); here, only what the message shows on itself:
    the reference quant measured against itself names its own file and scores ~0.
    """
    q = result.quality
    if job is not None and result.status == "ok" and job.quality and q is None:
        return ["the job asked for a quality pass and the result carries none"]
    if q is None:
        return []
    if job is not None and not job.quality:
        return ["a quality block the job did not ask for"]
    problems: list[str] = []
    if job is not None:
        if q.reference_quant != job.quality_reference_quant:
            problems.append(f"quality reference_quant is {q.reference_quant!r}, the job named {job.quality_reference_quant!r}")
        if q.n_ctx != job.quality_n_ctx:
            problems.append(f"quality n_ctx is {q.n_ctx}, the job asked for {job.quality_n_ctx}")
        if job.quality_n_chunks and q.n_chunks != job.quality_n_chunks:
            problems.append(f"quality n_chunks is {q.n_chunks}, the job asked for {job.quality_n_chunks}")
    if not is_sha256(q.reference_sha256) or not is_sha256(q.text_sha256):
        problems.append("quality reference_sha256 and text_sha256 must be sha256 hex digests")
    known_text = EVAL_TEXTS.get(q.text_name)
    if known_text is None:
        problems.append(f"quality text {q.text_name[:100]!r} is not one this farm ships (worker/data/)")
    elif q.text_sha256 != known_text:
        problems.append(f"quality text {q.text_name!r} has sha256 {q.text_sha256[:16]}..., not the shipped text's")
    per_chunk = q.n_ctx - 1 - q.n_ctx // 2
    samples = (q.kld_chunk_means, q.top1_chunk, q.nll_chunk_means, q.nll_reference_chunk_means)
    if any(len(x) != q.n_chunks for x in samples) or q.n_tokens_scored != q.n_chunks * per_chunk:
        return [*problems, (f"quality samples: {q.n_chunks} chunks of {q.n_ctx} score {q.n_chunks * per_chunk} "
                            "tokens and carry one sample per chunk in each list")]
    if any(not math.isfinite(x) or x < 0 for x in (*q.kld_chunk_means, *q.nll_chunk_means, *q.nll_reference_chunk_means)):
        problems.append("a quality chunk sample is negative or not finite")
        return problems
    if any(not 0.0 <= t <= 1.0 or abs(t * per_chunk - round(t * per_chunk)) > 1e-6 for t in q.top1_chunk):
        problems.append(f"a top1_chunk sample is not a count of {per_chunk} scored tokens")
    for name, value, want in (
        ("kld_mean", q.kld_mean, sum(q.kld_chunk_means) / q.n_chunks),
        ("top1_agreement", q.top1_agreement, sum(q.top1_chunk) / q.n_chunks),
        ("ppl", q.ppl, math.exp(sum(q.nll_chunk_means) / q.n_chunks)),
        ("ppl_reference", q.ppl_reference, math.exp(sum(q.nll_reference_chunk_means) / q.n_chunks)),
    ):
        if not _close(value, want):
            problems.append(f"quality {name} {value:.6g} does not follow from its chunk samples ({want:.6g})")
    pct = q.kld_percentiles
    if len(pct) != 101 or any(b < a for a, b in itertools.pairwise(pct)) or (pct and pct[0] < 0):
        problems.append("kld_percentiles must be the 101 non-decreasing per-token percentiles 0..100")
    else:
        for name, value, want in (("kld_median", q.kld_median, pct[50]), ("kld_p99", q.kld_p99, pct[99]),
                                  ("kld_max", q.kld_max, pct[100])):
            if not _close(value, want):
                problems.append(f"quality {name} {value:.6g} is not its percentile ({want:.6g})")
        if not pct[0] - 1e-9 <= q.kld_mean <= pct[100] + 1e-9 or max(q.kld_chunk_means) > pct[100] + 1e-9:
            problems.append("quality kld means lie outside the per-token range of its percentiles")
    if result.quant == q.reference_quant and result.model_sha256 and q.reference_sha256 != result.model_sha256:
        problems.append("the reference quant's own pass names another reference file than the one it measured")
    if q.reference_sha256 == result.model_sha256 and (q.kld_mean > SELF_KLD_MAX or q.top1_agreement < 0.999):
        problems.append(f"a file against itself scores KLD 0 and top-1 1.0, not {q.kld_mean:.3g} and {q.top1_agreement:.4f}")
    return problems


# The same file on the same engine gives the same logits; a cached reference made with other
# threads or batch sizes can differ by rounding only.
SELF_KLD_MAX = 1e-4


def _speculation_problems(result: Result, n_tokens: int, avg_ts: float) -> list[str]:
    s = result.speculation
    if s is None:
        return [f"a {result.technique} result must carry its speculation statistics"]
    problems: list[str] = []
    if result.technique == "spec" and not result.draft_sha256:
        problems.append("draft_sha256 is missing")
    if len(s.baseline_samples_ns) != result.repetitions or any(ns <= 0 for ns in s.baseline_samples_ns):
        problems.append("baseline_samples_ns must hold one positive duration per repetition")
    else:
        base, _ = summarize(n_tokens, s.baseline_samples_ns)
        if not math.isclose(base, s.baseline_avg_ts, rel_tol=1e-6):
            problems.append(f"baseline_avg_ts {s.baseline_avg_ts:.6g} does not match its samples ({base:.6g})")
        if not math.isclose(s.speedup, avg_ts / base, rel_tol=1e-6):
            problems.append(f"speedup {s.speedup:.6g} is not avg_ts / baseline_avg_ts ({avg_ts / base:.6g})")
    if s.n_accepted > s.n_drafted:
        problems.append("more tokens accepted than drafted")
    rate = s.n_accepted / s.n_drafted if s.n_drafted else 0.0
    if not 0.0 <= s.acceptance_rate <= 1.0 or not math.isclose(s.acceptance_rate, rate, abs_tol=1e-9):
        problems.append(f"acceptance_rate {s.acceptance_rate:.6g} is not n_accepted / n_drafted ({rate:.6g})")
    if any(not 0.0 <= a <= 1.0 for a in s.acceptance_by_position):
        problems.append("an acceptance by position lies outside [0, 1]")
    if s.n_passes and not math.isclose(s.mean_accepted_per_pass, s.n_accepted / s.n_passes, abs_tol=1e-9):
        problems.append("mean_accepted_per_pass is not n_accepted / n_passes")
    if len(s.first_mismatch) != result.n_prompts:
        problems.append(f"{len(s.first_mismatch)} losslessness verdicts for {result.n_prompts} prompts")
    if s.lossless != all(m is None for m in s.first_mismatch):
        problems.append("lossless disagrees with the per-prompt first mismatches")
    return problems + _token_hash_problems(result)

def _token_hash_problems(result: Result) -> list[str]:
    """The losslessness claim against the token hashes: a prompt is identical iff its hashes are."""
    s = result.speculation
    if len(s.baseline_sha256) != result.n_prompts or len(s.output_sha256) != result.n_prompts:
        return [f"{len(s.baseline_sha256)} baseline and {len(s.output_sha256)} technique token hashes "
                f"for {result.n_prompts} prompts"]
    if not all(is_sha256(h) for h in [*s.baseline_sha256, *s.output_sha256]):
        return ["a per-prompt token hash is not a sha256 hex digest"]
    problems = [f"prompt {i}: first_mismatch {m!r} contradicts the token hashes, which "
                f"{'agree' if b == t else 'differ'}"
                for i, (m, b, t) in enumerate(zip(s.first_mismatch, s.baseline_sha256, s.output_sha256))
                if (m is None) != (b == t)]
    if result.output_sha256 and result.output_sha256 != combine_sha256(s.baseline_sha256):
        problems.append("output_sha256 is not the hash of the per-prompt baseline token hashes")
    return problems
