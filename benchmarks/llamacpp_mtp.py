"""llama.cpp-engine MTP and n-gram lookup against native llama.cpp on the same file and prompts.

Prints, per technique and prompt category, tokenfarm's tok/s and acceptance beside those of
llama.cpp's own `llama-speculative-simple` (`--spec-type draft-mtp`, `ngram-simple`,
`ngram-map-k`, `ngram-map-k4v`, `ngram-cache`) at the same threads, draft size and tokens, the
ratio tokenfarm ÷ native, tokenfarm's speedup over its own plain greedy decoding, and whether
tokenfarm's output equals its plain greedy output (first differing token per prompt). With
--crosscheck it also runs the torch engine's MTP on the same F32 file (its NextN head, drafting
every position as llama.cpp does) and prints acceptance by position from both engines.

For the n-gram modes it also compares the drafts pass by pass: native runs with its debug log,
which names each pass's accepted and drafted counts and last token, and is asked for one token
more than tokenfarm so that both give every pass before the n_gen-th token the same budget
(native drafts without a limit once one token or none is left, tokenfarm never past its goal).
Native's counts are summed over those passes. `same passes` says, per prompt, on how many passes
from the first both traces agree (drafted, accepted, last token): all of them where the generated
tokens are the same. Where they are not, a line names the first differing pass and its tokens
(native's --ignore-eos bans the end-of-generation tokens that tokenfarm's greedy decoding emits).
ngram-cache drafts 8 tokens in both (native fixes 8); --n-draft is the others' m-gram size
(`--spec-ngram-*-size-m`).

    flock /tmp/bench.lock python benchmarks/llamacpp_mtp.py --threads 2 --n-gen 128 \\
        --categories code chat --n-mtp 1 2 3 --quants F32 F16 Q8_0 --crosscheck
    flock /tmp/bench.lock python benchmarks/llamacpp_mtp.py --techniques ngram-simple ngram-map-k \\
        ngram-map-k4v ngram-cache

The MTP technique runs on the MTP build (`smollm2-135m-mtp`, trained heads needed); n-gram
modes alone run on the plain catalogue model (`smollm2-135m`, derived to the quants asked).
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
from worker.ngram import NATIVE_CACHE_DRAFT, NgramCacheDrafter
from worker.speculative import MTPDrafter, NgramDrafter, Run, plain, speculative

NGRAM_MODES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-cache")
PASS_LOG = re.compile(r"accepted (\d+)/(\d+) draft tokens, the last target token is: \((\d+)\)")


def native(bin_dir: Path, model: Path, prompt: str, spec_type: str, n_draft: int, n_gen: int, threads: int,
           ngram_n: int, min_hits: int = 1) -> dict | None:
    """One llama-speculative-simple run; for the n-gram modes also its passes, from the debug log:
    (tokens emitted before the pass, drafted, accepted, last token)."""
    exe = bin_dir / "llama-speculative-simple"
    if not exe.exists():
        return None
    ngram = spec_type.startswith("ngram")
    cmd = [str(exe), "-m", str(model), "-p", prompt, "-n", str(n_gen + 1 if ngram else n_gen), "-t", str(threads),
           "-tb", str(threads), "--temp", "0", "--top-k", "1", "-c", "2048", "--spec-type", spec_type,
           "--spec-draft-n-max", str(n_draft), "--spec-draft-p-min", "0", "--ignore-eos"]
    if spec_type in ("ngram-simple", "ngram-map-k", "ngram-map-k4v"):
        flag = spec_type.removeprefix("ngram-")
        cmd += [f"--spec-ngram-{flag}-size-n", str(ngram_n), f"--spec-ngram-{flag}-size-m", str(n_draft),
                f"--spec-ngram-{flag}-min-hits", str(min_hits)]
    if ngram:
        cmd += ["-lv", "5"]  # the per-pass debug lines
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", out)
    if proc.returncode != 0 or m is None:
        print(f"  native {spec_type} failed (code {proc.returncode}): {out.strip().splitlines()[-1] if out.strip() else ''}")
        return None
    drafted = re.search(r"n_drafted = (\d+)", out)
    accepted = re.search(r"n_accept  = (\d+)", out)
    res = {"n": int(m[1]), "s": float(m[2]), "drafted": int(drafted[1]) if drafted else 0,
           "accepted": int(accepted[1]) if accepted else 0, "passes": None}
    if ngram:
        passes, e = [], 0
        for a, d, last in PASS_LOG.findall(proc.stderr):
            passes.append((e, int(d), int(a), int(last)))
            e += int(a) + 1
        # The passes tokenfarm also makes with the same budget: those begun before the n_gen-th token.
        kept = [p for p in passes if p[0] < n_gen]
        res.update(passes=kept, drafted=sum(p[1] for p in kept), accepted=sum(p[2] for p in kept))
    return res


class Traced:
    """A drafter that records each call: (tokens emitted before the pass, tokens drafted)."""

    def __init__(self, drafter, n_prompt: int) -> None:
        self.drafter, self.n_prompt, self.calls, self.drafts = drafter, n_prompt, [], []
        self.n_draft, self.q = drafter.n_draft, drafter.q
        self.drafts_on_prompt = getattr(drafter, "drafts_on_prompt", False)

    def start(self, prompt) -> None:
        self.calls, self.drafts = [], []
        self.drafter.start(prompt)

    def propose(self, seq, n_max, sampler=None):
        draft = self.drafter.propose(seq, n_max, sampler)
        self.calls.append((len(seq) - self.n_prompt, len(draft)))
        self.drafts.append(draft)
        return draft

    def passes(self, run: Run) -> list[tuple[int, int, int, int]]:
        """(emitted before, drafted, accepted, last token) per pass, as native's trace reads; the call
        on the bare prompt that drafted nothing stands for native's first pass, which the prefill made."""
        ends = [e for e, _ in self.calls[1:]] + [len(run.tokens)]
        return [(e, d, end - e - 1, run.tokens[end - 1]) for (e, d), end in zip(self.calls, ends)]


def same_passes(a: list, b: list) -> int:
    """Passes, from the first, on which two traces agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
    ap.add_argument("--n-draft", type=int, default=4, help="ngram-simple/-map-k/-map-k4v: the m-gram drafted")
    ap.add_argument("--ngram-n", type=int, default=3)
    ap.add_argument("--min-hits", type=int, default=1, help="ngram-map-k4v's key hits before drafting (native "
                    "takes it for every n-gram mode; only k4v reads it)")
    ap.add_argument("--quants", nargs="+", default=["F32"])
    ap.add_argument("--techniques", nargs="+", default=["mtp", *NGRAM_MODES], choices=["mtp", *NGRAM_MODES])
    ap.add_argument("--crosscheck", action="store_true")
    args = ap.parse_args()

    from worker.engines.llamacpp import LlamaCppBackend
    from worker.engines.llamacpp_mtp import LlamaCppMTPBackend
    from worker.models import resolve

    have_native = bool(str(args.bin)) and (args.bin / "llama-speculative-simple").exists()
    if not have_native:
        print(f"native llama.cpp tools not found (TOKENFARM_LLAMA_CPP_BIN={args.bin or 'unset'}): tokenfarm only")
    cfg = EngineConfig(n_threads=args.threads)
    with_mtp = "mtp" in args.techniques
    model, backend_class = ("smollm2-135m-mtp", LlamaCppMTPBackend) if with_mtp else ("smollm2-135m", LlamaCppBackend)
    print(f"{'quant':5} {'technique':14} {'cat':5} {'n':>2} | {'tf tok/s':>8} {'x plain':>7} {'drafted':>7} "
          f"{'acc':>5} {'rate':>5} | {'nat tok/s':>9} {'drafted':>7} {'acc':>5} {'rate':>5} | {'tf/nat':>6} | "
          f"same passes | first mismatch | acceptance by position")
    for quant in args.quants:
        path, _ = resolve(model, quant, args.models_dir)
        b = backend_class()
        b.load(path, cfg, 2048)
        texts_of = b.token_texts()
        for category in args.categories:
            texts = load_prompts(category, args.n_prompts)
            prompts = [b.tokenize(b.chat_prompt(t), add_bos=True, special=True) for t in texts]
            # Untimed warm-up, as llama-bench runs one: the first decode after a load faults the
            # mmap'd weights in and starts the threadpool, which made plain look many times slower.
            plain(b, prompts[0], min(8, args.n_gen))
            base = [plain(b, p, args.n_gen) for p in prompts]
            base_ns = sum(r.decode_ns for r in base)
            settings = [("mtp", n) for n in args.n_mtp] if with_mtp else []
            settings += [(mode, NATIVE_CACHE_DRAFT if mode == "ngram-cache" else args.n_draft)
                         for mode in NGRAM_MODES if mode in args.techniques]
            for tech, n in settings:
                runs: list[Run] = []
                traces, drafters = [], []
                for p in prompts:
                    if tech == "mtp":
                        drafter = MTPDrafter(b, b.mtp_context(n), n)
                    elif tech == "ngram-cache":
                        drafter = Traced(NgramCacheDrafter(n), len(p))
                    else:
                        hits = args.min_hits if tech == "ngram-map-k4v" else 1
                        drafter = Traced(NgramDrafter(tech, n, args.ngram_n, hits), len(p))
                    runs.append(speculative(b, drafter, p, args.n_gen))
                    traces.append(drafter.passes(runs[-1]) if tech != "mtp" else None)
                    drafters.append(drafter)
                ns = sum(r.decode_ns for r in runs)
                tf_ts = args.n_gen * len(prompts) / (ns / 1e9)
                drafted = sum(r.n_drafted for r in runs)
                accepted = sum(r.n_accepted for r in runs)
                by_pos = [sum(r.accepted_at[i] for r in runs) / max(1, sum(r.drafted_at[i] for r in runs))
                          for i in range(n)]
                mism = [first_mismatch(r.tokens, g.tokens) for r, g in zip(runs, base)]
                nat = None
                same = "n/a"
                if have_native:
                    spec_type = "draft-mtp" if tech == "mtp" else tech
                    res = [native(args.bin, path, t_chat, spec_type, n, args.n_gen, args.threads, args.ngram_n,
                                  args.min_hits)
                           for t_chat in (b.chat_prompt(t) for t in texts)]
                    if all(res):
                        nat = {"ts": sum(r["n"] for r in res) / sum(r["s"] for r in res),
                               "drafted": sum(r["drafted"] for r in res), "accepted": sum(r["accepted"] for r in res)}
                        if tech != "mtp":
                            same = " ".join(f"{same_passes(t, r['passes'])}/{len(r['passes'])}"
                                            for t, r in zip(traces, res))
                nat_cols = (f"{nat['ts']:9.1f} {nat['drafted']:7d} {nat['accepted']:5d} "
                            f"{nat['accepted'] / max(1, nat['drafted']):5.2f}") if nat else f"{'n/a':>9} {'':19}"
                ratio = f"{tf_ts / nat['ts']:6.2f}" if nat else "   n/a"
                print(f"{quant:5} {tech:14} {category:5} {n:>2} | {tf_ts:8.1f} {base_ns / ns:7.2f} {drafted:7d} "
                      f"{accepted:5d} {accepted / max(1, drafted):5.2f} | {nat_cols} | {ratio} | {same:11} | "
                      f"{mism} | {[round(x, 2) for x in by_pos]}", flush=True)
                if nat and tech != "mtp":
                    for i, (t, r) in enumerate(zip(traces, res)):
                        k = same_passes(t, r["passes"])
                        if k < min(len(t), len(r["passes"])):
                            # The same draft and another token after it: the engines decoded another
                            # greedy token (native's --ignore-eos bans end-of-generation tokens, which
                            # tokenfarm's greedy decoding emits); another draft on the same history
                            # would be the drafter's fault.
                            ours, theirs = t[k], r["passes"][k]
                            draft = [texts_of[x] for x in drafters[i].drafts[k]]
                            print(f"    prompt {i}: pass {k} differs, (emitted, drafted, accepted, last token) "
                                  f"tokenfarm {ours} {texts_of[ours[3]]!r} native {theirs} {texts_of[theirs[3]]!r}; "
                                  f"tokenfarm's draft {draft}", flush=True)
        if args.crosscheck and quant == "F32" and with_mtp:
            crosscheck(b, args, cfg)
        b.close()


def crosscheck(lc, args, cfg) -> None:
    """Acceptance by position of the same file's NextN head on both engines (the same computation
    at every position, in another order of float sums)."""
    from worker.engines.torch import TorchBackend
    from worker.models import resolve

    f32, _ = resolve("smollm2-135m-mtp", "F32", args.models_dir)
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
                        runs.append(speculative(backend, MTPDrafter(backend, backend.mtp_context(n), n), p, args.n_gen))
                    by_pos = [sum(r.accepted_at[i] for r in runs) / max(1, sum(r.drafted_at[i] for r in runs))
                              for i in range(n)]
                    figures.append(f"{name} {[round(x, 3) for x in by_pos]} ({time.perf_counter() - t0:.0f} s)")
                print(f"crosscheck {category} n_mtp={n}: " + "; ".join(figures), flush=True)
    finally:
        tb.close()


if __name__ == "__main__":
    main()
