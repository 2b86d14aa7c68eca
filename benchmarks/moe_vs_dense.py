"""MoE versus dense: decode tok/s of the upcycled 8-expert top-2 SmolLM2 over its dense parent.

Prints the measured ratio next to the one the roofline predicts (bytes read per token of the
dense model over those of the MoE; the bandwidth cancels), and each side's roofline_pct with
the host bandwidth measured by the worker's own probe. Both files at the same quant (Q8_0 by
default), alternating repetitions in one process.

    PYTHONPATH=. python benchmarks/moe_vs_dense.py [--quant Q8_0] [--n-gen 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics

from farm.contract import EngineConfig, Job
from farm.modelfiles import read_facts
from farm.settings import load_settings
from worker import hardware
from worker.engines.llamacpp import LlamaCppBackend, default_n_threads
from worker.measure import decode_context, measure, roofline_tok_s
from worker.models import resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--moe", default="smollm2-135m-moe8x2")
    args = ap.parse_args()
    models_dir = load_settings().effective_models_dir
    config = EngineConfig(n_threads=default_n_threads())
    sides = {}
    for label, name in (("dense", "smollm2-135m"), ("moe", args.moe)):
        path, _ = resolve(name, args.quant, models_dir)
        backend = LlamaCppBackend()
        backend.load(path, config, 256)
        job = Job(job_id=label, sweep_id="bench", index=0, model=name, quant=args.quant, kind="tg",
                  n_gen=args.n_gen, repetitions=1, n_warmup=1, config=config)
        sides[label] = (backend, job, read_facts(path), [])
    for _ in range(args.reps):
        for backend, job, _, samples in sides.values():
            samples += measure(backend, job).samples_ns
    host_gbps, _ = hardware.bandwidth()
    print(f"quant {args.quant}, tg{args.n_gen}, {args.reps} alternating reps, n_threads {config.n_threads}, "
          f"host bandwidth {host_gbps:.2f} GB/s (triad)")
    rate, ceiling = {}, {}
    for label, (backend, job, facts, samples) in sides.items():
        rate[label] = statistics.median(args.n_gen * 1e9 / ns for ns in samples)
        ceiling[label] = roofline_tok_s(host_gbps, facts.active_bytes, facts.kv_bytes_per_token, decode_context(job))
        print(f"{label}: {facts.model_type}, {facts.n_params / 1e6:.1f} M params, {facts.n_params_active / 1e6:.1f} M active, "
              f"{facts.active_bytes / 2**20:.1f} MiB read per token; {rate[label]:.2f} t/s, "
              f"roofline {ceiling[label]:.2f} t/s ({100 * rate[label] / ceiling[label]:.1f} %)")
        backend.close()
    print(f"moe / dense decode: measured {rate['moe'] / rate['dense']:.3f}, roofline predicts {ceiling['moe'] / ceiling['dense']:.3f}")


if __name__ == "__main__":
    main()
