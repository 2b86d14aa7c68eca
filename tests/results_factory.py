"""Hand-made Results for the recommend and claims tests: a few fields chosen, the rest consistent.

Each figure a test asserts on is set here by the test itself (tok/s, memory, acceptance, KLD), so
the right answer is known before the function under test runs.
"""

from __future__ import annotations

import hashlib
import itertools

from farm.contract import Conditions, Hardware, ModelFacts, Quality, Result, Speculation
from farm.stats import summarize

_ids = itertools.count()
GIB = 1 << 30


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def gpu(name: str = "NVIDIA GeForce RTX 3060", vram_gb: int = 12, bandwidth_gbps: float = 360.0) -> Hardware:
    return Hardware(cpu="Ryzen", n_cpu_cores=8, ram_bytes=64 * GIB, gpu=name, vram_bytes=vram_gb * GIB,
                    device_bandwidth_gbps=bandwidth_gbps, bandwidth_gbps=bandwidth_gbps)


def cpu(name: str = "Intel Core i7", bandwidth_gbps: float = 60.0) -> Hardware:
    return Hardware(cpu=name, n_cpu_cores=8, ram_bytes=32 * GIB, host_bandwidth_gbps=bandwidth_gbps,
                    bandwidth_gbps=bandwidth_gbps)


def quality(kld: float, top1: float, ref: str = "F16", ppl: float = 10.0) -> Quality:
    return Quality(reference_quant=ref, reference_sha256=sha(ref), text_name="wiki", text_sha256=sha("wiki"),
                   n_ctx=512, n_chunks=1, n_tokens_scored=511, kld_mean=kld, kld_median=kld, kld_p99=kld * 5,
                   kld_max=kld * 10, top1_agreement=top1, ppl=ppl * (1 + kld), ppl_reference=ppl,
                   kld_chunk_means=[kld], top1_chunk=[top1], nll_chunk_means=[1.0], nll_reference_chunk_means=[1.0])


def speculation(speedup: float, acceptance: float, lossless: bool = True,
                by_position: list[float] | None = None) -> Speculation:
    n_drafted = 1000
    n_accepted = int(n_drafted * acceptance)
    return Speculation(baseline_samples_ns=[10**9], baseline_avg_ts=10.0, speedup=speedup, n_drafted=n_drafted,
                       n_accepted=n_accepted, n_passes=400, acceptance_rate=n_accepted / n_drafted,
                       mean_accepted_per_pass=n_accepted / 400,
                       acceptance_by_position=by_position if by_position is not None else [acceptance],
                       draft_ns=1, verify_ns=1, first_mismatch=[None if lossless else 3], lossless=lossless)


def result(model: str = "m", quant: str = "Q4_0", kind: str = "tg", ts: float = 10.0, *, technique: str = "baseline",
           worker: str = "w1", hardware: Hardware | None = None, size_bytes: int = 1 * GIB, active_bytes: int = 0,
           n_params: int = 1_000_000_000, n_params_active: int = 0, n_expert: int = 0, peak_bytes: int = 0,
           q: Quality | None = None, spec: Speculation | None = None, category: str | None = None,
           draft_quant: str | None = None, n_mtp: int = 0, n_depth: int = 0, status: str = "ok") -> Result:
    """One Result; `kind` pp (pp512) or tg (tg128); its two samples give exactly `ts` tok/s."""
    hardware = hardware or gpu()
    n = 512 if kind == "pp" else 128
    ns = int(n * 1e9 / ts)
    avg, std = summarize(n, [ns, ns])
    test = (f"pp{n}" if kind == "pp" else f"tg{n}") + (f" @ d{n_depth}" if n_depth else "")
    technique_fields = {}
    if technique != "baseline":
        technique_fields = {"prompt_category": category or "chat", "n_prompts": 2,
                            "n_draft": 4 if technique != "mtp" else 0,
                            "draft_model": "draft" if technique == "spec" else None, "draft_quant": draft_quant,
                            "n_mtp": n_mtp}
    gpu_box = bool(hardware.gpu)
    return Result(
        job_id=f"job-{next(_ids)}", sweep_id="s", status=status, error="" if status == "ok" else "boom",
        worker=worker, model=model, model_sha256=sha(f"{model}/{quant}"), quant=quant, technique=technique,
        test=test, n_prompt=n if kind == "pp" else 0, n_gen=n if kind == "tg" else 0, n_depth=n_depth,
        repetitions=2, samples_ns=[ns, ns], avg_ts=avg, stddev_ts=std,
        model_facts=ModelFacts(size_bytes=size_bytes, n_params=n_params, n_params_active=n_params_active or n_params,
                               active_bytes=active_bytes or size_bytes, n_expert=n_expert,
                               n_expert_used=2 if n_expert else 0),
        hardware=hardware,
        conditions=Conditions(peak_vram_bytes=peak_bytes if gpu_box else 0,
                              peak_rss_bytes=0 if gpu_box else peak_bytes),
        quality=q, speculation=spec, **technique_fields)
