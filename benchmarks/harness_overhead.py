"""Harness overhead and repeatability: tokenfarm's pp512 and tg128 against native llama-bench.

SmolLM2-135M Q8_0, same threads, batch sizes and flags (-fa 0, -ngl 0) on all sides, alternating
repetition by repetition so a drifting machine affects each alike: tokenfarm's measurement core
and llama.cpp engine; the native `llama-bench` binary built from the same vendored llama.cpp
(TOKENFARM_LLAMA_CPP_BIN or --llama-cpp-bin: the folder holding it; never committed), one
repetition per call; and a bare llama_decode loop in this process (what llama-bench's inner loop
does: llama_batch_get_one, llama_decode, llama_synchronize). ours / native is the share of
llama.cpp's speed the harness keeps (target >= 0.97). Then the CV of tg128 over 5 repetitions.

    flock /tmp/bench.lock env PYTHONPATH=. TOKENFARM_LLAMA_CPP_BIN=/work/scratch/llama-build/bin \
        python benchmarks/harness_overhead.py [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import llama_cpp

from farm.contract import EngineConfig, Job
from farm.settings import load_settings
from farm.stats import sample_stats
from worker.engines.llamacpp import LlamaCppBackend, default_n_threads
from worker.measure import input_tokens, measure
from worker.models import resolve


class BareLoop:
    """The minimum llama-bench does per test, through llama-cpp-python's raw bindings."""

    def __init__(self, path: Path, n_threads: int, n_batch: int, n_ubatch: int, n_ctx: int) -> None:
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_ubatch
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        # Same attention path as the harness's default (flash_attn off): llama.cpp's own default
        # is "auto", which would compare two different kernels rather than two harnesses.
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = n_batch

    def pp(self, tokens: list[int]) -> int:
        llama_cpp.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter_ns()
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
        llama_cpp.llama_synchronize(self.ctx)
        return time.perf_counter_ns() - t0

    def tg(self, first: int, n_gen: int) -> int:
        llama_cpp.llama_memory_clear(self.mem, True)
        arr = (llama_cpp.llama_token * 1)(first)
        t0 = time.perf_counter_ns()
        for _ in range(n_gen):
            llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, 1))
            llama_cpp.llama_synchronize(self.ctx)
        return time.perf_counter_ns() - t0

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


class NativeBench:
    """The native llama-bench binary, one repetition per call (its own warm-up run skipped)."""

    def __init__(self, binary: Path, path: Path, config: EngineConfig) -> None:
        self.base = [str(binary), "-m", str(path), "-t", str(config.n_threads), "-b", str(config.n_batch),
                     "-ub", str(config.n_ubatch), "-ngl", "0", "-fa", "0", "-r", "1", "--no-warmup", "-o", "json"]

    def run(self, n_prompt: int, n_gen: int) -> float:
        out = subprocess.run([*self.base, "-p", str(n_prompt), "-n", str(n_gen)], capture_output=True, text=True,
                             check=True, timeout=600)
        return float(json.loads(out.stdout)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cv-reps", type=int, default=5, help="tg128 repetitions of the repeatability check; 0: skip it")
    ap.add_argument("--llama-cpp-bin", default=os.environ.get("TOKENFARM_LLAMA_CPP_BIN", ""),
                    help="folder holding the native llama-bench (default: $TOKENFARM_LLAMA_CPP_BIN)")
    args = ap.parse_args()
    binary = Path(args.llama_cpp_bin) / "llama-bench" if args.llama_cpp_bin else None
    if binary is None or not binary.exists():
        print(f"native llama-bench not found ({binary or 'set TOKENFARM_LLAMA_CPP_BIN or --llama-cpp-bin'}): "
              "comparing with the in-process bare loop only")
        binary = None
    path, _ = resolve("smollm2-135m", "Q8_0", load_settings().effective_models_dir)
    config = EngineConfig(n_threads=args.threads or default_n_threads())
    n_ctx = 768
    ours = LlamaCppBackend()
    ours.load(path, config, n_ctx)
    bare = BareLoop(path, config.n_threads, min(config.n_batch, n_ctx), config.n_ubatch, n_ctx)
    # One warm-up, a job's default: as in a worker, the timed run feeds the warm-up's greedy tokens
    # back and reads no logits, like llama-bench's step (worker/measure.py).
    base = dict(job_id="bench", sweep_id="bench", index=0, model=str(path), quant="Q8_0",
                repetitions=1, n_warmup=1, config=config)
    pp_job, tg_job = Job(kind="pp", n_prompt=512, **base), Job(kind="tg", n_gen=128, **base)
    prompt = input_tokens(ours, 512, "text", 42)
    first = prompt[0]
    # Warm both sides once (page cache, thread pools, allocator).
    measure(ours, pp_job), measure(ours, tg_job), bare.pp(prompt), bare.tg(first, 128)
    native = NativeBench(binary, path, config) if binary else None
    if native:
        native.run(16, 16)  # page cache and the binary's own start-up, once
    times: dict[str, list[int]] = {"ours pp512": [], "bare pp512": [], "ours tg128": [], "bare tg128": []}
    native_ts: dict[str, list[float]] = {"pp512": [], "tg128": []}
    for _ in range(args.reps):
        times["ours pp512"] += measure(ours, pp_job).samples_ns
        times["bare pp512"].append(bare.pp(prompt))
        if native:
            native_ts["pp512"].append(native.run(512, 0))
        times["ours tg128"] += measure(ours, tg_job).samples_ns
        times["bare tg128"].append(bare.tg(first, 128))
        if native:
            native_ts["tg128"].append(native.run(0, 128))
    rate = {k: statistics.median(n * 1e9 / ns for ns in v) for k, v in times.items()
            for n in [512 if "pp" in k else 128]}
    print(f"model {path.name}, n_threads {config.n_threads}, n_batch {config.n_batch}, n_ubatch {config.n_ubatch}, "
          f"flash_attn off, {args.reps} alternating reps (medians)")
    for test in ("pp512", "tg128"):
        ours_ts = rate[f"ours {test}"]
        line = f"{test}: tokenfarm {ours_ts:.2f} t/s, bare llama_decode {rate[f'bare {test}']:.2f} t/s " \
               f"(ratio {ours_ts / rate[f'bare {test}']:.4f})"
        if native:
            nat = statistics.median(native_ts[test])
            line += f", native llama-bench {nat:.2f} t/s (ratio {ours_ts / nat:.4f}, target >= 0.97)"
            # Each repetition's own ratio, tokenfarm's run beside the native run just after it: this
            # machine's speed drifts by more than the gap measured, and a pair shares the drift.
            n = 512 if test == "pp512" else 128
            pairs = sorted(n * 1e9 / ns / ts for ns, ts in zip(times[f"ours {test}"], native_ts[test]))
            line += f"; paired ratio median {statistics.median(pairs):.4f} [{pairs[0]:.3f}..{pairs[-1]:.3f}]"
        print(line)
    if not args.cv_reps:
        ours.close()
        bare.close()
        return
    rep_job = Job(kind="tg", n_gen=128, **{**base, "repetitions": args.cv_reps, "n_warmup": 1})
    m = measure(ours, rep_job)
    s = sample_stats(128, m.samples_ns)
    print(f"repeatability tg128 x{args.cv_reps}: median {s.median_ts:.2f} t/s, 95% CI [{s.ci95_low_ts:.2f}, {s.ci95_high_ts:.2f}], "
          f"CV {100 * s.cv:.2f} %{' (noisy)' if s.noisy else ''}")
    ours.close()
    bare.close()


if __name__ == "__main__":
    main()
