"""llama.cpp-engine MTP and n-gram lookup against native llama.cpp on the same file and prompts.

Prints, per technique and prompt category, tokenfarm's tok/s and acceptance beside those of
llama.cpp's own `llama-speculative-simple` (`--spec-type draft-mtp`, `ngram-simple`,
`ngram-map-k`, `ngram-map-k4v`) at the same threads, n_draft and tokens, the ratio
tokenfarm ÷ native, tokenfarm's speedup over its own plain greedy decoding, and whether
tokenfarm's output equals its plain greedy output (first differing token per prompt). With
--crosscheck it also runs the torch engine's MTP on the same head (the F32 parent and the
heads beside it) and prints acceptance by position from both engines.

    flock /tmp/bench.lock python benchmarks/llamacpp_mtp.py --threads 2 --n-gen 128 \\
        --categories code chat --n-mtp 1 2 3 --quants F32 F16 Q8_0 --crosscheck

The native tools come from TOKENFARM_LLAMA_CPP_BIN (or --bin), built from the sources
llama-cpp-python vendors; without them only tokenfarm's figures are printed, and it says so.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from farm.contract import EngineConfig
from farm.prompts import load_prompts
from worker.engines.base import EngineError
from worker.speculative import MTPDrafter, NgramDrafter, Run, plain, speculative

NGRAM_MODES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v")


def native(bin_dir: Path, model: Path, prompt: str, spec_type: str, n_draft: int, n_gen: int, threads: int,
           ngram_n: int) -> dict | None:
    exe = bin_dir / "llama-speculative-simple"
    if not exe.exists():
        return None
    cmd = [str(exe), "-m", str(model), "-p", prompt, "-n", str(n_gen), "-t", str(threads), "-tb", str(threads),
           "--temp", "0", "--top-k", "1", "-c", "2048", "--spec-type", spec_type, "--spec-draft-n-max", str(n_draft),
           "--spec-draft-p-min", "0", "--ignore-eos"]
    if spec_type.startswith("ngram"):
        flag = {"ngram-simple": "simple", "ngram-map-k": "map-k", "ngram-map-k4v": "map-k4v"}[spec_type]
        cmd += [f"--spec-ngram-{flag}-size-n", str(ngram_n), f"--spec-ngram-{flag}-size-m", str(n_draft)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", out)
    if proc.returncode != 0 or m is None:
        print(f"  native {spec_type} failed (code {proc.returncode}): {out.strip().splitlines()[-1] if out.strip() else ''}")
        return None
    drafted = re.search(r"n_drafted = (\d+)", out)
    accepted = re.search(r"n_accept  = (\d+)", out)
    return {"n": int(m[1]), "s": float(m[2]), "drafted": int(drafted[1]) if drafted else 0,
            "accepted": int(accepted[1]) if accepted else 0}


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=Path(os.environ.get("TOKENFARM_MODELS_DIR", "~/.tokenfarm/models")).expanduser())
    ap.add_argument("--bin", type=Path, default=Path(os.environ.get("TOKENFARM_LLAMA_CPP_BIN", "")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--n-prompts", type=int, default=2)
    ap.add_argument("--categories", nargs="+", default=["code", "chat"])
    ap.add_argument("--n-mtp", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--n-draft", type=int, default=4, help="n-gram modes: most tokens per draft")
    ap.add_argument("--ngram-n", type=int, default=3)
    ap.add_argument("--quants", nargs="+", default=["F32"])
    ap.add_argument("--techniques", nargs="+", default=["mtp", *NGRAM_MODES])
    ap.add_argument("--crosscheck", action="store_true")
    args = ap.parse_args()

    from worker.engines.llamacpp_mtp import LlamaCppMTPBackend
    from worker.models import resolve

    have_native = bool(str(args.bin)) and (args.bin / "llama-speculative-simple").exists()
    if not have_native:
        print(f"native llama.cpp tools not found (TOKENFARM_LLAMA_CPP_BIN={args.bin or 'unset'}): tokenfarm only")
    cfg = EngineConfig(n_threads=args.threads)
    print(f"{'quant':5} {'technique':14} {'cat':5} {'n':>2} | {'tf tok/s':>8} {'x plain':>7} {'acc':>5} | "
          f"{'nat tok/s':>9} {'acc':>5} | {'tf/nat':>6} | first mismatch | acceptance by position")
    for quant in args.quants:
        path, _ = resolve("smollm2-135m-mtp", quant, args.models_dir)
        b = LlamaCppMTPBackend()
        b.load(path, cfg, 2048)
        for category in args.categories:
            texts = load_prompts(category, args.n_prompts)
            prompts = [b.tokenize(b.chat_prompt(t), add_bos=True, special=True) for t in texts]
            base = [plain(b, p, args.n_gen) for p in prompts]
            base_ns = sum(r.decode_ns for r in base)
            settings = [("mtp", n) for n in args.n_mtp] if "mtp" in args.techniques else []
            settings += [(mode, args.n_draft) for mode in NGRAM_MODES if mode in args.techniques]
            for tech, n in settings:
                runs: list[Run] = []
                for p in prompts:
                    drafter = MTPDrafter(b, b.mtp_context(n), n) if tech == "mtp" else \
                        NgramDrafter(tech, n, args.ngram_n)
                    runs.append(speculative(b, drafter, p, args.n_gen))
                ns = sum(r.decode_ns for r in runs)
                tf_ts = args.n_gen * len(prompts) / (ns / 1e9)
                drafted = sum(r.n_drafted for r in runs)
                acc = sum(r.n_accepted for r in runs) / drafted if drafted else 0.0
                by_pos = [sum(r.accepted_at[i] for r in runs) / max(1, sum(r.drafted_at[i] for r in runs))
                          for i in range(n)]
                mism = [first_mismatch(r.tokens, g.tokens) for r, g in zip(runs, base)]
                nat_ts = nat_acc = None
                if have_native:
                    spec_type = "draft-mtp" if tech == "mtp" else tech
                    res = [native(args.bin, path, t_chat, spec_type, n, args.n_gen, args.threads, args.ngram_n)
                           for t_chat in (b.chat_prompt(t) for t in texts)]
                    if all(res):
                        nat_ts = sum(r["n"] for r in res) / sum(r["s"] for r in res)
                        d = sum(r["drafted"] for r in res)
                        nat_acc = sum(r["accepted"] for r in res) / d if d else 0.0
                ratio = f"{tf_ts / nat_ts:6.2f}" if nat_ts else "   n/a"
                print(f"{quant:5} {tech:14} {category:5} {n:>2} | {tf_ts:8.1f} {base_ns / ns:7.2f} {acc:5.2f} | "
                      f"{(nat_ts or 0):9.1f} {(nat_acc if nat_acc is not None else 0):5.2f} | {ratio} | "
                      f"{mism} | {[round(x, 2) for x in by_pos]}", flush=True)
        if args.crosscheck and quant == "F32":
            crosscheck(b, args, cfg)
        b.close()


def crosscheck(lc, args, cfg) -> None:
    """Acceptance by position of the same head on both engines (n_mtp 1: the same computation)."""
    from worker.engines.torch import TorchBackend
    from worker.models import resolve

    f32, _ = resolve("smollm2-135m", "F32", args.models_dir)
    tb = TorchBackend()
    tb.load(f32, cfg, 2048)
    try:
        for category in args.categories:
            texts = load_prompts(category, args.n_prompts)
            for n in args.n_mtp:
                figures = []
                for name, backend in (("llamacpp", lc), ("torch", tb)):
                    t0 = time.perf_counter()
                    runs = []
                    for t in texts:
                        p = backend.tokenize(backend.chat_prompt(t), add_bos=True, special=True)
                        try:
                            ctx = backend.mtp_context(n)
                        except EngineError as exc:  # torch holds as many heads as were trained
                            figures.append(f"{name}: {exc}".splitlines()[0][:90])
                            break
                        runs.append(speculative(backend, MTPDrafter(backend, ctx, n), p, args.n_gen))
                    else:
                        by_pos = [sum(r.accepted_at[i] for r in runs) / max(1, sum(r.drafted_at[i] for r in runs))
                                  for i in range(n)]
                        figures.append(f"{name} {[round(x, 3) for x in by_pos]} ({time.perf_counter() - t0:.0f} s)")
                print(f"crosscheck {category} n_mtp={n}: " + "; ".join(figures), flush=True)
    finally:
        tb.close()


if __name__ == "__main__":
    main()
