"""Our speculative loop against llama-cpp-python's own `Llama(draft_model=...)` path, and against plain greedy.

Pair: SmolLM2-135M F32 target, Q4_0 draft (both derived by the project's own code), the code
prompts, the same n_draft. Every rate counts the n_gen tokens after the first one, which each
path produces right after the prompt's prefill, so prefill is outside every timer.
Also reports losslessness (first differing token against plain greedy) on F32 and F16 targets.

    PYTHONPATH=. python benchmarks/speculative.py [--n-prompts 3 --n-gen 32 --n-draft 4 --threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from farm.contract import EngineConfig
from farm.identity import first_difference
from farm.prompts import load_prompts
from worker.engines.llamacpp import LlamaCppBackend
from worker.models import resolve
from worker.speculative import ModelDrafter, greedy, speculative

MODELS_DIR = Path(os.environ.get("TOKENFARM_MODELS_DIR", Path.home() / ".local/share/tokenfarm/models"))


def load(path: Path, n_threads: int) -> LlamaCppBackend:
    backend = LlamaCppBackend()
    backend.load(path, EngineConfig(n_threads=n_threads), 4096)
    return backend


def ours(target_path: Path, draft_path: Path, prompts_text: list[str], args) -> dict:
    target, draft = load(target_path, args.threads), load(draft_path, args.threads)
    try:
        prompts = [target.tokenize(target.chat_prompt(t), add_bos=True, special=True) for t in prompts_text]
        base_ns = spec_ns = drafted = accepted = 0
        mismatches, base_tokens = [], []
        for prompt in prompts:
            base = greedy(target, prompt, args.n_gen)
            run = speculative(target, ModelDrafter(draft, args.n_draft), prompt, args.n_gen)
            base_ns += base.decode_ns
            spec_ns += run.decode_ns
            drafted += run.n_drafted
            accepted += run.n_accepted
            mismatches.append(first_difference(base.tokens, run.tokens))
            base_tokens.append(base.tokens)
    finally:
        target.close()
        draft.close()
    n = args.n_gen * len(prompts)
    return dict(prompts=prompts, base_tok_s=n * 1e9 / base_ns, spec_tok_s=n * 1e9 / spec_ns,
                acceptance=accepted / drafted if drafted else 0.0, mismatches=mismatches, base_tokens=base_tokens)


def reference(target_path: Path, draft_path: Path, prompts: list[list[int]], args) -> dict:
    """llama-cpp-python's draft_model path with a draft model that runs greedily."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaDraftModel

    class GreedyDraft(LlamaDraftModel):
        def __init__(self, llm: Llama, n_draft: int) -> None:
            self.llm, self.n_draft = llm, n_draft

        def __call__(self, input_ids, /, **kwargs):
            out: list[int] = []
            # generate() reuses the cached prefix it shares with the last call.
            for token in self.llm.generate(input_ids.tolist(), temp=0.0, top_k=1):
                out.append(token)
                if len(out) >= self.n_draft:
                    break
            return np.array(out, dtype=np.intc)

    common = dict(n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    draft_llm = Llama(model_path=str(draft_path), **common)
    llm = Llama(model_path=str(target_path), draft_model=GreedyDraft(draft_llm, args.n_draft), **common)
    total_ns, outputs = 0, []
    for prompt in prompts:
        gen = llm.generate(prompt, temp=0.0, top_k=1)
        tokens = [next(gen)]
        t0 = time.perf_counter_ns()
        for token in gen:
            tokens.append(token)
            if len(tokens) > args.n_gen:
                break
        total_ns += time.perf_counter_ns() - t0
        outputs.append(tokens)
    return dict(tok_s=args.n_gen * len(prompts) * 1e9 / total_ns, outputs=outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=3)
    parser.add_argument("--n-gen", type=int, default=32)
    parser.add_argument("--n-draft", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    paths = {q: resolve("smollm2-135m", q, MODELS_DIR)[0] for q in ("F32", "F16", "Q4_0")}
    texts = load_prompts("code", args.n_prompts)

    mine = ours(paths["F32"], paths["Q4_0"], texts, args)
    ref = reference(paths["F32"], paths["Q4_0"], mine["prompts"], args)
    same = [first_difference(b, r) for b, r in zip(mine["base_tokens"], ref["outputs"])]
    print(f"pair: SmolLM2-135M F32 target, Q4_0 draft; code prompts: {len(texts)}; n_gen {args.n_gen}; "
          f"n_draft {args.n_draft}; threads {args.threads}")
    print(f"baseline greedy (ours)              {mine['base_tok_s']:8.2f} tok/s")
    print(f"spec (ours)                         {mine['spec_tok_s']:8.2f} tok/s  acceptance {mine['acceptance']:.2f}")
    print(f"spec (llama-cpp-python draft_model) {ref['tok_s']:8.2f} tok/s  first difference vs our greedy: {same}")
    print(f"ours / llama-cpp-python draft_model  {mine['spec_tok_s'] / ref['tok_s']:.2f}  (target >= 1.3)")
    print(f"ours spec / baseline                 {mine['spec_tok_s'] / mine['base_tok_s']:.2f}")
    print(f"lossless on F32 target: first mismatch per prompt {mine['mismatches']}")

    f16 = ours(paths["F16"], paths["Q4_0"], texts, args)
    print(f"lossless on F16 target: first mismatch per prompt {f16['mismatches']}; "
          f"spec / baseline {f16['spec_tok_s'] / f16['base_tok_s']:.2f}, acceptance {f16['acceptance']:.2f}")


if __name__ == "__main__":
    main()
