"""Plausible synthetic results for the dashboard's tests and its load benchmark.

It writes sweeps, jobs and results straight into an upgraded database in bulk (SQLAlchemy Core
executemany). Every result is a `farm.contract.Result` built through the schema (stats,
conditions, model facts, hardware, speculation) and self-consistent the way the collector checks
it: avg_ts and stddev_ts from the samples, speedup from the baseline samples, acceptance from the
counts. Every job is a valid `Job`. The app never calls it; it knows nothing of Streamlit.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy.engine import Engine

from farm.contract import (
    EVAL_TEXTS,
    PROMPT_CATEGORIES,
    Conditions,
    Hardware,
    Job,
    ModelFacts,
    Quality,
    Result,
    format_test_name,
)
from farm.identity import combine_sha256, output_sha256, tokens_sha256
from farm.stats import sample_stats, summarize
from orchestrator.db import JobRow, ResultRow, SweepRow

# (name, arch, total params, active params, n_expert, n_expert_used, (n_layer, n_kv_head, head_dim)):
# three MoE among dense models.
BASE_MODELS = [
    ("smollm2-135m", "llama", 135e6, 135e6, 0, 0, (30, 3, 64)),
    ("gemma3-270m", "gemma3", 270e6, 270e6, 0, 0, (18, 1, 256)),
    ("qwen3-1.7b", "qwen3", 1.7e9, 1.7e9, 0, 0, (28, 8, 128)),
    ("llama3.2-3b", "llama", 3.2e9, 3.2e9, 0, 0, (28, 8, 128)),
    ("qwen3-8b", "qwen3", 8.2e9, 8.2e9, 0, 0, (36, 8, 128)),
    ("gemma3-12b", "gemma3", 12e9, 12e9, 0, 0, (48, 8, 256)),
    ("mistral-small-24b", "llama", 24e9, 24e9, 0, 0, (40, 8, 128)),
    ("qwen3-32b", "qwen3", 32e9, 32e9, 0, 0, (64, 8, 128)),
    ("llama3.3-70b", "llama", 70e9, 70e9, 0, 0, (80, 8, 128)),
    ("qwen3-30b-a3b", "qwen3moe", 30.5e9, 3.3e9, 128, 8, (48, 4, 128)),
    ("gpt-oss-20b", "gpt-oss", 21e9, 3.6e9, 32, 4, (24, 8, 64)),
    ("smollm2-moe-8x", "llama", 620e6, 220e6, 8, 2, (30, 3, 64)),
]
# Bits per weight of each quant, for file sizes.
QUANT_BITS = {"F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.6, "Q4_K_M": 4.8, "Q4_0": 4.5, "Q2_K": 2.6}
# (worker, gpu, vram GiB, bandwidth GB/s, cpu, cores): GPU boxes of each tier and two CPU-only boxes.
# The bandwidth is the device's on a GPU box, the host's on a CPU-only one.
WORKERS = [
    ("rtx3060", "NVIDIA GeForce RTX 3060", 12, 360, "AMD Ryzen 5 5600X", 6),
    ("rtx4060ti", "NVIDIA GeForce RTX 4060 Ti 16GB", 16, 288, "Intel Core i5-13400", 10),
    ("rtx3090", "NVIDIA GeForce RTX 3090", 24, 936, "AMD Ryzen 9 5950X", 16),
    ("rtx4090", "NVIDIA GeForce RTX 4090", 24, 1008, "AMD Ryzen 9 7950X", 16),
    ("rtx5090", "NVIDIA GeForce RTX 5090", 32, 1792, "AMD Ryzen 9 9950X", 16),
    ("a6000", "NVIDIA RTX A6000", 48, 768, "AMD EPYC 7313", 16),
    ("h100", "NVIDIA H100 80GB HBM3", 80, 3350, "Intel Xeon Platinum 8480+", 56),
    ("rtx2070", "NVIDIA GeForce RTX 2070", 8, 448, "Intel Core i7-9700K", 8),
    ("nuc", "", 0, 60, "Intel Core i7-1260P", 12),
    ("epyc", "", 0, 180, "AMD EPYC 9354", 32),
]
TESTS = [("pp", 128, 0, 0), ("pp", 512, 0, 0), ("pp", 2048, 0, 0), ("tg", 0, 32, 0), ("tg", 0, 128, 0),
         ("tg", 0, 128, 1024), ("tg", 0, 128, 4096)]
TECHNIQUES = ["baseline", "baseline", "spec", "lookup"]
N_PROMPTS = 8
REPETITIONS = 5
DRAFT = ("smollm2-135m", "Q4_0")
# Mean KLD from the F16 reference per quant, about what llama-perplexity --kl-divergence reports for
# small models: the quality pass's ladder (issue 14).
QUANT_KLD = {"F16": 0.0, "Q8_0": 0.002, "Q6_K": 0.008, "Q4_K_M": 0.035, "Q4_0": 0.07, "Q2_K": 0.55}
START = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _model_file(base: tuple, quant: str) -> dict:
    name, arch, n_params, n_active, n_expert, n_used, (n_layer, n_kv_head, head_dim) = base
    bits = QUANT_BITS[quant]
    weight_bytes = int(n_params * bits / 8)
    facts = ModelFacts(
        arch=arch, model_type=f"{arch} {n_params / 1e9:.1f}B {quant}", size_bytes=weight_bytes + (6 << 20),
        n_params=int(n_params), file_type=quant, n_layer=n_layer, n_head=n_kv_head * 4, n_kv_head=n_kv_head,
        n_embd=n_kv_head * 4 * head_dim, head_dim=head_dim, n_ctx_train=32768, n_vocab=151936,
        quant_mix_bytes={quant: weight_bytes}, weight_bytes=weight_bytes, n_expert=n_expert, n_expert_used=n_used,
        n_params_active=int(n_active), active_bytes=int(n_active * bits / 8),
        kv_bytes_per_token=n_layer * n_kv_head * head_dim * 2 * 2)
    return {"model": name, "quant": quant, "sha": _sha(f"{name}/{quant}"), "facts": facts.model_dump(mode="json")}


def _hardware(worker: tuple) -> dict:
    _, gpu, vram_gib, bandwidth_gbps, cpu, cores = worker
    host_gbps = bandwidth_gbps if not gpu else 40.0 + 2.5 * cores
    return Hardware(cpu=cpu, n_cpu_cores=cores, ram_bytes=64 << 30, gpu=gpu, vram_bytes=vram_gib << 30,
                    os="Linux", gpu_driver="570.86" if gpu else "", cuda_version="12.8" if gpu else "",
                    host_bandwidth_gbps=host_gbps, device_bandwidth_gbps=bandwidth_gbps if gpu else 0.0,
                    bandwidth_gbps=bandwidth_gbps, backends="CUDA" if gpu else "CPU",
                    n_gpus=1 if gpu else 0).model_dump(mode="json")


def _samples(rng: random.Random, n_tokens: int, mean_ts: float) -> list[int]:
    return [max(1, int(n_tokens * 1e9 / max(mean_ts * rng.gauss(1.0, 0.03), 1e-3))) for _ in range(REPETITIONS)]


def _speculation(rng: random.Random, job: dict, n_tokens: int, avg_ts: float, samples_ns: list[int],
                 speedup_target: float) -> dict:
    """Counts that add up: each verify pass yields its accepted drafts plus one token of its own."""
    n_draft = job["n_draft"]
    baseline_samples_ns = _samples(rng, n_tokens, avg_ts / speedup_target)
    baseline_avg_ts, _ = summarize(n_tokens, baseline_samples_ns)
    acceptance = min(0.95, max(0.05, speedup_target / 2.8 + rng.gauss(0, 0.06)))
    per_pass = acceptance * n_draft
    n_generated = n_tokens * REPETITIONS
    n_passes = max(1, round(n_generated / (per_pass + 1)))
    n_accepted = min(n_generated - n_passes, n_passes * n_draft)
    n_drafted = n_passes * n_draft
    lossless = rng.random() < 0.5
    first_mismatch = [None if lossless or rng.random() < 0.4 else rng.randint(3, job["n_gen"] - 1)
                      for _ in range(job["n_prompts"])]
    lossless = all(m is None for m in first_mismatch)
    baseline_tokens, tokens = _greedy_tokens(job, first_mismatch)
    total_ns = sum(samples_ns)
    draft_share = rng.uniform(0.1, 0.35) if job["technique"] == "spec" else rng.uniform(0.005, 0.02)
    return {
        "baseline_samples_ns": baseline_samples_ns, "baseline_avg_ts": baseline_avg_ts,
        "speedup": avg_ts / baseline_avg_ts, "n_drafted": n_drafted, "n_accepted": n_accepted, "n_passes": n_passes,
        "acceptance_rate": n_accepted / n_drafted, "mean_accepted_per_pass": n_accepted / n_passes,
        "acceptance_by_position": [min(1.0, acceptance * 1.25 * 0.85 ** i) for i in range(n_draft)],
        "draft_ns": int(total_ns * draft_share), "verify_ns": int(total_ns * (0.95 - draft_share)),
        "first_mismatch": first_mismatch, "lossless": lossless,
        "baseline_sha256": [tokens_sha256(t) for t in baseline_tokens],
        "output_sha256": [tokens_sha256(t) for t in tokens],
    }


def _greedy_tokens(job: dict, first_mismatch: list[int | None] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Per prompt (one sequence for a plain test): baseline tokens and the technique's, which
    leave the baseline's at first_mismatch. A generator of its own, so the figures above draw
    the same numbers as before tokens were kept."""
    rng = random.Random(job["job_id"])
    first_mismatch = first_mismatch if first_mismatch is not None else [None]
    n = max(1, job["n_gen"])
    base = [[rng.randrange(2, 49_152) for _ in range(n)] for _ in first_mismatch]
    tech = [b if m is None else b[:m] + [b[m] + 1] + b[m + 1:] for b, m in zip(base, first_mismatch)]
    return base, tech


EVAL_TEXT_NAME = next(iter(EVAL_TEXTS))
N_QUALITY_CHUNKS = 8
QUALITY_N_CTX = 512


def _quality(mf: dict) -> dict:
    """A file's quality block, the same for every run of that file (a generator seeded by the file),
    over the shipped text, its statistics following from its samples as the collector checks."""
    rng = random.Random(mf["sha"])
    per_chunk = QUALITY_N_CTX - 1 - QUALITY_N_CTX // 2
    kld = QUANT_KLD[mf["quant"]] * rng.uniform(0.8, 1.25)
    chunks = [kld * rng.uniform(0.7, 1.3) for _ in range(N_QUALITY_CHUNKS)]
    # top-1 as counts of scored tokens, as a real pass gives it.
    top1 = [round(max(0.0, min(1.0, 1.0 - 0.9 * math.sqrt(c) * rng.uniform(0.9, 1.1))) * per_chunk) / per_chunk
            for c in chunks]
    nll_ref = [rng.uniform(2.3, 2.6) for _ in chunks]
    nll = [n + c for n, c in zip(nll_ref, chunks)]
    # Per-token percentiles: a long right tail above the chunk means, as KLD has.
    top = max(chunks) * 12
    pct = sorted(top * (i / 100) ** 4 for i in range(101))
    pct[50] = max(pct[50], min(chunks) * 0.6)
    pct = [max(a, b) for a, b in zip(pct, [0.0, *pct[:-1]])]
    return Quality(
        reference_quant="F16", reference_sha256=_sha(f"{mf['model']}/F16"), text_name=EVAL_TEXT_NAME,
        text_sha256=EVAL_TEXTS[EVAL_TEXT_NAME], n_ctx=QUALITY_N_CTX, n_chunks=len(chunks),
        n_tokens_scored=per_chunk * len(chunks), kld_mean=sum(chunks) / len(chunks), kld_median=pct[50],
        kld_p99=pct[99], kld_max=pct[100], kld_percentiles=pct,
        top1_agreement=sum(top1) / len(top1), ppl=math.exp(sum(nll) / len(nll)),
        ppl_reference=math.exp(sum(nll_ref) / len(nll_ref)), kld_chunk_means=chunks, top1_chunk=top1,
        nll_chunk_means=nll, nll_reference_chunk_means=nll_ref).model_dump(mode="json")


def job_spec(rng: random.Random, job_id: str, sweep_id: str, index: int, mf: dict, test: tuple,
             technique: str) -> dict:
    """A Job's fields: spec and lookup decode over a prompt category, as the sweep expands them."""
    kind, n_prompt, n_gen, n_depth = test
    spec = {"job_id": job_id, "sweep_id": sweep_id, "index": index, "model": mf["model"], "model_sha256": mf["sha"],
            "quant": mf["quant"], "technique": technique, "kind": kind, "n_prompt": n_prompt, "n_gen": n_gen,
            "n_depth": n_depth, "repetitions": REPETITIONS, "prompt_category": None, "n_prompts": 0,
            "draft_model": None, "draft_sha256": None, "draft_quant": None, "n_draft": 0, "p_min": 0.0,
            "ngram_max": 0}
    if technique == "baseline" and kind == "tg" and n_depth == 0:
        spec.update(quality=True, quality_n_ctx=QUALITY_N_CTX, quality_n_chunks=N_QUALITY_CHUNKS,
                    quality_reference_quant="F16")
    if technique != "baseline":
        spec.update(prompt_category=rng.choice(PROMPT_CATEGORIES), n_prompts=N_PROMPTS, n_draft=rng.choice([2, 4, 8]))
        if technique == "spec":
            spec.update(draft_model=DRAFT[0], draft_quant=DRAFT[1], draft_sha256=_sha("/".join(DRAFT)),
                        p_min=rng.choice([0.0, 0.5, 0.8]))
        else:
            spec.update(ngram_max=rng.choice([2, 3, 4]))
    return spec


def result_json(rng: random.Random, job: dict, mf: dict, worker: tuple, when: datetime, failed: bool = False) -> dict:
    """One Result as the collector stores it (Result.model_dump(mode="json")), physically plausible."""
    wname, gpu, vram_gib, bandwidth_gbps, cpu, cores = worker
    kind, n_prompt, n_gen, n_depth = job["kind"], job["n_prompt"], job["n_gen"], job["n_depth"]
    technique = job["technique"]
    facts = mf["facts"]
    # The worker's roofline: active weights plus the KV cache a decode step reads at its mean context.
    n_context = n_depth + 1 + (n_gen - 1) / 2
    roofline_tok_s = bandwidth_gbps * 1e9 / (facts["active_bytes"] + facts["kv_bytes_per_token"] * n_context)
    if kind == "tg":
        mean = roofline_tok_s * rng.uniform(0.45, 0.85)
    else:
        mean = roofline_tok_s * rng.uniform(8, 30) * (1.0 if gpu else 0.3) / (1 + n_prompt / 8192)
    speedup_target = 1.0
    if technique != "baseline":
        speedup_target = rng.uniform(0.7, 2.6) if technique == "spec" else rng.uniform(0.8, 1.9)
        mean *= speedup_target
    n_tokens = n_gen * job["n_prompts"] if job["prompt_category"] else (n_prompt if kind == "pp" else n_gen)
    memory = int(facts["size_bytes"] * 1.08 + (n_depth + n_prompt) * facts["kv_bytes_per_token"] + (400 << 20))
    data: dict = {
        "job_id": job["job_id"], "sweep_id": job["sweep_id"], "status": "ok", "worker": wname,
        "model": mf["model"], "model_sha256": mf["sha"], "source_sha256": mf["sha"], "model_facts": facts,
        "quant": mf["quant"], "technique": technique, "backend": "llamacpp", "test": format_test_name(
            kind, n_prompt, n_gen, n_depth), "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth,
        "config": {"n_threads": 0, "n_batch": 2048, "n_ubatch": 512, "n_gpu_layers": -1 if gpu else 0,
                   "flash_attn": bool(gpu)},
        "hardware": _hardware(worker), "versions": {"tokenfarm": "0.1.0", "llama_cpp": "0.3.36"},
        "started_at": when.isoformat(), "finished_at": (when + timedelta(seconds=20)).isoformat(),
        "prompt_category": job["prompt_category"], "n_prompts": job["n_prompts"], "draft_model": job["draft_model"],
        "draft_quant": job["draft_quant"], "draft_sha256": job["draft_sha256"] or "", "n_draft": job["n_draft"],
        "p_min": job["p_min"], "ngram_max": job["ngram_max"],
    }
    if failed:
        data.update(status="failed", error=rng.choice([
            "model file too large for this worker's VRAM", "llama_decode returned -1: KV cache full",
            "worker lost (heartbeat timeout)", "result rejected: avg_ts does not match the samples"]))
        return data
    samples_ns = _samples(rng, n_tokens, mean)
    avg, std = summarize(n_tokens, samples_ns)
    data.update({
        "repetitions": REPETITIONS, "samples_ns": samples_ns, "avg_ts": avg, "stddev_ts": std,
        "load_ns": 1_500_000_000, "stats": sample_stats(n_tokens, samples_ns).model_dump(mode="json"),
        "conditions": Conditions(
            n_threads=cores, flags={"flash_attn": bool(gpu), "n_gpu_layers": -1 if gpu else 0},
            peak_rss_bytes=memory if not gpu else 900 << 20, peak_vram_bytes=memory if gpu else 0,
            energy_per_token_j=(rng.uniform(0.2, 0.6) / avg * 1000 if gpu else None)).model_dump(mode="json"),
    })
    if kind == "pp":
        # Prefill from an empty cache plus the first token: a little longer than the timed prefill.
        data["ttft_samples_ns"] = [int(ns + 1e9 / roofline_tok_s) for ns in samples_ns]
        data["ttft_ns"] = int(statistics.median(data["ttft_samples_ns"]))
    else:
        data.update(decode_ts=avg, roofline_tok_s=roofline_tok_s, roofline_pct=100 * avg / roofline_tok_s)
    if technique != "baseline":
        data["speculation"] = _speculation(rng, job, n_tokens, avg, samples_ns, speedup_target)
        data["output_sha256"] = combine_sha256(data["speculation"]["baseline_sha256"])
    else:
        data["output_sha256"] = output_sha256(_greedy_tokens(job)[0])
        if kind == "tg" and n_depth == 0:
            data["quality"] = _quality(mf)
    return data


def validated(spec: dict, data: dict) -> tuple[dict, dict]:
    """The job and result through the schema, as the collector would store them."""
    job = Job.model_validate(spec)
    return job.model_dump(mode="json"), Result.model_validate(data).model_dump(mode="json")


def seed(engine: Engine, n_results: int, n_sweeps: int = 20, seed: int = 7, fail_fraction: float = 0.03,
         workers: list[tuple] | None = None) -> dict[str, int]:
    """Insert n_results results (with their sweeps and jobs) into an upgraded database; returns counts."""
    rng = random.Random(seed)
    workers = workers or WORKERS
    files = [_model_file(base, q) for base in BASE_MODELS for q in QUANT_BITS]
    per_sweep = math.ceil(n_results / n_sweeps)
    sweeps, jobs, results = [], [], []
    made = 0
    for s in range(n_sweeps):
        sweep_id = str(uuid.UUID(int=rng.getrandbits(128)))
        n_here = min(per_sweep, n_results - made)
        # The newest sweep is still running: some of its jobs queued or running, with no result yet.
        n_pending = n_here // 5 if s == n_sweeps - 1 else 0
        sweeps.append({"id": sweep_id, "name": f"sweep-{s:03d}", "spec": {"name": f"sweep-{s:03d}"},
                       "n_jobs": n_here + n_pending, "created_at": START + timedelta(days=s)})
        for i in range(n_here + n_pending):
            job_id = str(uuid.UUID(int=rng.getrandbits(128)))
            mf, worker = rng.choice(files), rng.choice(workers)
            test = rng.choice(TESTS)
            technique = rng.choice(TECHNIQUES) if test[0] == "tg" else "baseline"
            when = START + timedelta(days=s, seconds=30 * i)
            spec = job_spec(rng, job_id, sweep_id, i, mf, test, technique)
            if i >= n_here:
                jobs.append({"id": job_id, "sweep_id": sweep_id, "index": i, "spec": Job.model_validate(spec).model_dump(
                    mode="json"), "state": rng.choice(["queued", "running"]), "attempts": 0, "worker": None,
                    "error": None, "created_at": when, "updated_at": when})
                continue
            failed = rng.random() < fail_fraction
            spec, data = validated(spec, result_json(rng, spec, mf, worker, when, failed))
            jobs.append({"id": job_id, "sweep_id": sweep_id, "index": i, "spec": spec,
                         "state": "failed" if failed else "done", "attempts": 1, "worker": worker[0],
                         "error": data["error"] or None, "created_at": when, "updated_at": when})
            results.append({"job_id": job_id, "sweep_id": sweep_id, "status": data["status"], "worker": worker[0],
                            "model": mf["model"], "model_sha256": mf["sha"], "quant": mf["quant"],
                            "technique": technique, "backend": data["backend"], "test": data["test"],
                            "n_prompt": test[1], "n_gen": test[2], "n_depth": test[3], "avg_ts": data["avg_ts"],
                            "stddev_ts": data["stddev_ts"], "result": data, "created_at": when})
            made += 1
    with engine.begin() as conn:
        conn.execute(SweepRow.__table__.insert(), sweeps)
        for table, rows in ((JobRow.__table__, jobs), (ResultRow.__table__, results)):
            for start in range(0, len(rows), 20_000):
                conn.execute(table.insert(), rows[start:start + 20_000])
    return {"sweeps": len(sweeps), "jobs": len(jobs), "results": len(results)}
