"""Plausible synthetic results for the dashboard's tests and its load benchmark.

It writes sweeps, jobs and results straight into an upgraded database in bulk (SQLAlchemy Core
executemany), shaped like what workers send: today's Result fields plus the fields the
measurement, speculative and torch-engine issues add (medians, TTFT, roofline, MoE facts,
acceptance, losslessness), so every page has something to draw. The app never calls it; it
knows nothing of Streamlit.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy.engine import Engine

from orchestrator.db import JobRow, ResultRow, SweepRow

# (name, arch, total params, active params, n_expert, n_expert_used): two MoE among dense models.
BASE_MODELS = [
    ("smollm2-135m", "llama", 135e6, 135e6, 0, 0),
    ("gemma3-270m", "gemma3", 270e6, 270e6, 0, 0),
    ("qwen3-1.7b", "qwen3", 1.7e9, 1.7e9, 0, 0),
    ("llama3.2-3b", "llama", 3.2e9, 3.2e9, 0, 0),
    ("qwen3-8b", "qwen3", 8.2e9, 8.2e9, 0, 0),
    ("gemma3-12b", "gemma3", 12e9, 12e9, 0, 0),
    ("mistral-small-24b", "llama", 24e9, 24e9, 0, 0),
    ("qwen3-32b", "qwen3", 32e9, 32e9, 0, 0),
    ("llama3.3-70b", "llama", 70e9, 70e9, 0, 0),
    ("qwen3-30b-a3b", "qwen3moe", 30.5e9, 3.3e9, 128, 8),
    ("gpt-oss-20b", "gpt-oss", 21e9, 3.6e9, 32, 4),
    ("smollm2-moe-8x", "llama", 620e6, 220e6, 8, 2),
]
# Bits per weight of each quant, for file sizes.
QUANT_BITS = {"F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.6, "Q4_K_M": 4.8, "Q4_0": 4.5, "Q2_K": 2.6}
# (worker, gpu, vram GiB, bandwidth GB/s, cpu, cores): GPU boxes of each tier and two CPU-only boxes.
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
TECHNIQUES = ["baseline", "baseline", "spec", "lookup", "mtp"]
CATEGORIES = ["code", "summarization", "qa", "rewrite", "math", "chat"]
START = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _test_name(kind: str, n_prompt: int, n_gen: int, n_depth: int) -> str:
    name = f"pp{n_prompt}" if kind == "pp" else f"tg{n_gen}"
    return f"{name} @ d{n_depth}" if n_depth else name


def _model_file(rng: random.Random, base: tuple, quant: str) -> dict:
    name, arch, n_params, n_active, n_expert, n_used = base
    bits = QUANT_BITS[quant]
    return {
        "model": name, "quant": quant, "arch": arch,
        "sha": hashlib.sha256(f"{name}/{quant}".encode()).hexdigest(),
        "facts": {
            "arch": arch, "model_type": f"{arch} {n_params / 1e9:.1f}B {quant}",
            "size_bytes": int(n_params * bits / 8), "n_params": int(n_params), "file_type": quant,
            "n_params_active": int(n_active), "active_bytes_per_token": int(n_active * bits / 8),
            "n_expert": n_expert, "n_expert_used": n_used,
        },
    }


def result_json(rng: random.Random, job_id: str, sweep_id: str, mf: dict, worker: tuple, technique: str,
                test: tuple, when: datetime, failed: bool = False) -> dict:
    """One Result as the collector stores it, with physically plausible figures."""
    wname, gpu, vram_gib, bandwidth_gbps, cpu, cores = worker
    kind, n_prompt, n_gen, n_depth = test
    facts = mf["facts"]
    active = facts["active_bytes_per_token"] + n_depth * 64 * 1024
    roofline_tok_s = bandwidth_gbps * 1e9 / active
    if kind == "tg":
        efficiency = rng.uniform(0.45, 0.85)
        mean = roofline_tok_s * efficiency
    else:
        mean = roofline_tok_s * rng.uniform(8, 30) * (1.0 if gpu else 0.3) / (1 + n_prompt / 8192)
    speedup = None
    if technique != "baseline" and kind == "tg":
        speedup = rng.uniform(0.7, 2.6) if technique != "lookup" else rng.uniform(0.8, 1.9)
        mean *= speedup
    n_tokens = n_prompt if kind == "pp" else n_gen
    reps = 5
    rates = [max(mean * rng.gauss(1.0, 0.03), 1e-3) for _ in range(reps)]
    samples_ns = [int(n_tokens * 1e9 / r) for r in rates]
    rates = [n_tokens * 1e9 / ns for ns in samples_ns]
    avg, std = statistics.fmean(rates), statistics.stdev(rates)
    memory = int(facts["size_bytes"] * 1.08 + (n_depth + n_prompt) * 131072 + (400 << 20))
    data: dict = {
        "schema_version": 1, "job_id": job_id, "sweep_id": sweep_id, "status": "failed" if failed else "ok",
        "error": "", "worker": wname, "model": mf["model"], "model_sha256": mf["sha"], "source_sha256": mf["sha"],
        "model_facts": facts, "quant": mf["quant"], "technique": technique, "backend": "llamacpp",
        "test": _test_name(*test), "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth,
        "repetitions": reps, "samples_ns": samples_ns, "avg_ts": avg, "stddev_ts": std, "load_ns": 1_500_000_000,
        "config": {"n_threads": 0, "n_batch": 2048, "n_ubatch": 512, "n_gpu_layers": -1 if gpu else 0,
                   "flash_attn": bool(gpu)},
        "hardware": {"cpu": cpu, "n_cpu_cores": cores, "ram_bytes": 64 << 30, "gpu": gpu,
                     "vram_bytes": vram_gib << 30, "os": "Linux", "bandwidth_gbps": bandwidth_gbps},
        "versions": {"tokenfarm": "0.1.0", "llama_cpp": "0.3.36"},
        "started_at": when.isoformat(), "finished_at": (when + timedelta(seconds=20)).isoformat(),
        "median_ts": statistics.median(rates), "ci95_ts": [avg - 2.78 * std / math.sqrt(reps),
                                                            avg + 2.78 * std / math.sqrt(reps)],
        "cv": std / avg, "noisy": std / avg > 0.05,
        "ttft_ns": int(n_prompt * 1e9 / mean + 1e9 / roofline_tok_s) if kind == "pp" else None,
        "peak_rss_bytes": memory if not gpu else 900 << 20,
        "peak_vram_bytes": memory if gpu else None,
    }
    if kind == "tg":
        data["roofline_tok_s"] = roofline_tok_s
        data["roofline_pct"] = 100 * avg / roofline_tok_s
    if technique != "baseline":
        n_draft = rng.choice([2, 4, 8])
        acceptance = min(0.98, max(0.05, (speedup or 1.0) / 2.8 + rng.gauss(0, 0.06)))
        lossless = mf["quant"] == "F16" and rng.random() < 0.2 or rng.random() < 0.5
        data.update({
            "prompt_category": rng.choice(CATEGORIES), "n_draft": n_draft, "speedup": speedup,
            "acceptance_rate": acceptance, "mean_accepted_len": 1 + acceptance * n_draft * 0.7,
            "acceptance_by_position": [acceptance ** (i + 1) for i in range(n_draft)],
            "lossless": lossless, "first_divergence": None if lossless else rng.randint(3, n_gen or 32),
        })
        if technique == "spec":
            data.update({"p_min": rng.choice([0.0, 0.5, 0.8]), "draft_model": "smollm2-135m Q4_0"})
    if failed:
        data.update({"status": "failed", "error": rng.choice([
            "model file too large for this worker's VRAM", "llama_decode returned -1: KV cache full",
            "worker lost (heartbeat timeout)", "result rejected: avg_ts does not match the samples"]),
            "samples_ns": [], "avg_ts": 0.0, "stddev_ts": 0.0})
    return data


def seed(engine: Engine, n_results: int, n_sweeps: int = 20, seed: int = 7, fail_fraction: float = 0.03,
         workers: list[tuple] | None = None) -> dict[str, int]:
    """Insert n_results results (with their sweeps and jobs) into an upgraded database; returns counts."""
    rng = random.Random(seed)
    workers = workers or WORKERS
    files = [_model_file(rng, base, q) for base in BASE_MODELS for q in QUANT_BITS]
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
            spec = {"job_id": job_id, "sweep_id": sweep_id, "index": i, "model": mf["model"], "quant": mf["quant"],
                    "technique": technique, "kind": test[0], "n_prompt": test[1], "n_gen": test[2],
                    "n_depth": test[3]}
            if i >= n_here:
                jobs.append({"id": job_id, "sweep_id": sweep_id, "index": i, "spec": spec,
                             "state": rng.choice(["queued", "running"]), "attempts": 0, "worker": None,
                             "error": None, "created_at": when, "updated_at": when})
                continue
            failed = rng.random() < fail_fraction
            data = result_json(rng, job_id, sweep_id, mf, worker, technique, test, when, failed)
            jobs.append({"id": job_id, "sweep_id": sweep_id, "index": i, "spec": spec,
                         "state": "failed" if failed else "done", "attempts": 1, "worker": worker[0],
                         "error": data["error"] or None, "created_at": when, "updated_at": when})
            results.append({"job_id": job_id, "sweep_id": sweep_id, "status": data["status"], "worker": worker[0],
                            "model": mf["model"], "model_sha256": mf["sha"], "quant": mf["quant"],
                            "technique": technique, "backend": "llamacpp", "test": data["test"],
                            "n_prompt": test[1], "n_gen": test[2], "n_depth": test[3], "avg_ts": data["avg_ts"],
                            "stddev_ts": data["stddev_ts"], "result": data, "created_at": when})
            made += 1
    with engine.begin() as conn:
        conn.execute(SweepRow.__table__.insert(), sweeps)
        for table, rows in ((JobRow.__table__, jobs), (ResultRow.__table__, results)):
            for start in range(0, len(rows), 20_000):
                conn.execute(table.insert(), rows[start:start + 20_000])
    return {"sweeps": len(sweeps), "jobs": len(jobs), "results": len(results)}
