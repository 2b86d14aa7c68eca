"""The cost of the quality pass and SmolLM2's KLD ladder, through worker/quality.py and one engine.

    PYTHONPATH=. TOKENFARM_MODELS_DIR=... python benchmarks/quality_pass.py [--engine llamacpp|torch]
        [--n-ctx 512] [--n-chunks 0] [--quants F32,F16,Q8_0,Q4_K_M,Q4_0,Q2_K]

Prints seconds of the reference pass (F32, made once per model and cached in a real job) and
of each quant's scoring pass, and per quant KLD mean/median/p99, top-1 agreement and both
perplexities. The reference is F32 derived by llama.cpp from the catalogue's Q4_1 file, a
dequantized upcast: F32, F16 and Q8_0 hold (nearly) the Q4_1 weights, so they score near 0;
the ladder measures what each quant loses beyond Q4_1. It asserts nothing (timings are not
tests); run it under `flock /tmp/bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import time

from farm.contract import EngineConfig
from farm.settings import load_settings
from worker import quality as wq
from worker.engines import create_backend
from worker.models import resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="llamacpp", choices=["llamacpp", "torch"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--n-chunks", type=int, default=0, help="0: the whole text")
    ap.add_argument("--quants", default="F32,F16,Q8_0,Q4_K_M,Q4_0,Q2_K")
    args = ap.parse_args()
    models_dir = load_settings().effective_models_dir
    config = EngineConfig()
    text = wq.eval_text()

    def loaded(quant: str):
        path = resolve(args.model, quant, models_dir)[0]
        backend = create_backend(args.engine)
        t0 = time.perf_counter()
        backend.load(path, config, max(512, args.n_ctx))
        return backend, time.perf_counter() - t0

    ref_backend, _ = loaded("F32")
    chunks = wq.text_chunks(ref_backend.tokenize, text, args.n_ctx, args.n_chunks)
    ref, ref_ns = wq.reference_pass(ref_backend.chunk_logits, chunks, args.n_ctx)
    ref_backend.close()
    n_tokens = len(chunks) * args.n_ctx
    print(f"{args.model} on {args.engine}: {len(chunks)} chunks x {args.n_ctx} tokens ({n_tokens} evaluated, "
          f"{len(ref.targets)} scored), reference F32 top-{ref.top_k} keeps {ref.mass_kept:.4f} of the mass")
    print(f"reference pass: {ref_ns / 1e9:.1f} s ({n_tokens / (ref_ns / 1e9):.0f} tok/s)")
    print("| quant | load s | pass s | tok/s | KLD mean | KLD median | KLD p99 | top-1 | ppl | ppl ref |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for quant in args.quants.split(","):
        backend, load_s = loaded(quant)
        s = wq.score(ref, backend.chunk_logits, chunks)
        backend.close()
        f = wq.figures(s)
        pass_s = s.pass_ns / 1e9
        print(f"| {quant} | {load_s:.1f} | {pass_s:.1f} | {n_tokens / pass_s:.0f} | {f.kld_mean:.5f} | "
              f"{f.kld_median:.5f} | {f.kld_p99:.4f} | {f.top1_agreement:.4f} | {f.ppl:.3f} | {f.ppl_reference:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
