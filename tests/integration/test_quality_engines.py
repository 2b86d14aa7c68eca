"""The quality pass on a real model through both engines: SmolLM2-135M F32 (llama.cpp's
dequantized upcast of the catalogue's Q4_1, the reference) against Q8_0 and Q4_0, 2 chunks of
256 tokens, each engine scored against its own reference pass.

Tolerance between engines, and why: the reference passes agree closely (same F32 weights; ppl
within 0.5 %, the same top token at >= 98 % of positions). The quants' KLD differs more, because
llama.cpp multiplies Q8_0/Q4_0 weights by activations it quantizes to 8 bits (an error of its
own on top of the weights'), while the torch engine dequantizes the weights and multiplies in
float32. So: Q8_0's KLD below 0.01 on both (it is ~1e-3: both say "near lossless"); Q4_0's
within a factor 1.5 of each other and at least 10x Q8_0's on both; the ladder's order the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from farm.contract import Job
from farm.modelfiles import model_sha256
from farm.settings import Settings
from worker import quality as wq
from worker.models import resolve
from worker.tasks import execute

pytestmark = pytest.mark.integration

MODELS_DIR = Path(os.environ.get("TOKENFARM_TEST_MODELS_DIR", Path(__file__).resolve().parents[2] / ".tokenfarm" / "models"))
QUANTS = ("F32", "Q8_0", "Q4_0")
ENGINES = ("llamacpp", "torch")
N_CTX, N_CHUNKS = 256, 2


@pytest.fixture(scope="module")
def passes(smollm2):
    settings = Settings(models_dir=MODELS_DIR, worker_name="quality-test")
    out = {}
    for engine in ENGINES:
        for quant in QUANTS:
            job = Job(job_id=f"{engine}-{quant}", sweep_id="q", index=0, model="smollm2-135m", quant=quant,
                      engine=engine, kind="pp", n_prompt=8, repetitions=1, n_warmup=0, quality=True,
                      quality_n_ctx=N_CTX, quality_n_chunks=N_CHUNKS, quality_reference_quant="F32")
            r = execute(job, settings)
            assert r.status == "ok", r.error
            out[engine, quant] = r
            q = r.quality  # the figures, for a run with -s (the closing note quotes them)
            print(f"{engine} {quant}: KLD {q.kld_mean:.5f} median {q.kld_median:.5f} p99 {q.kld_p99:.4f} "
                  f"top-1 {q.top1_agreement:.4f} ppl {q.ppl:.3f} ref {q.ppl_reference:.3f} "
                  f"mass {q.reference_mass_kept:.3f} pass {q.pass_ns / 1e9:.1f} s ref {q.reference_ns / 1e9:.1f} s")
    return out


def test_a_file_against_itself_is_zero_on_both_engines(passes):
    for engine in ENGINES:
        q = passes[engine, "F32"].quality
        assert q.kld_mean == 0.0 and q.kld_max == 0.0 and q.top1_agreement == 1.0 and q.ppl == q.ppl_reference
        assert q.n_tokens_scored == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)


def test_every_quant_names_the_same_reference_file(passes):
    f32 = resolve("smollm2-135m", "F32", MODELS_DIR)[0]
    assert {r.quality.reference_sha256 for r in passes.values()} == {model_sha256(f32)}
    assert all(r.quality.reference_quant == "F32" and 0.5 < r.quality.reference_mass_kept <= 1.0 for r in passes.values())


def test_the_engines_agree_on_the_reference_and_the_ladder(passes):
    ppl = [passes[e, "F32"].quality.ppl_reference for e in ENGINES]
    assert abs(ppl[0] - ppl[1]) / ppl[0] < 0.005
    q8 = {e: passes[e, "Q8_0"].quality.kld_mean for e in ENGINES}
    q4 = {e: passes[e, "Q4_0"].quality.kld_mean for e in ENGINES}
    for e in ENGINES:
        assert 0 < q8[e] < 0.01 and q4[e] > 10 * q8[e]
        assert passes[e, "Q4_0"].quality.top1_agreement < passes[e, "Q8_0"].quality.top1_agreement < 1.0
        assert passes[e, "Q4_0"].quality.ppl > passes[e, "Q8_0"].quality.ppl
    assert max(q4.values()) / min(q4.values()) < 1.5


def test_the_reference_passes_of_the_two_engines_pick_the_same_top_token(passes):
    text_sha = wq.text_sha256(wq.eval_text())
    ref_sha = passes["llamacpp", "F32"].quality.reference_sha256
    refs = [wq.load_reference(wq.cache_path(MODELS_DIR, e, ref_sha, text_sha, N_CTX, N_CHUNKS, wq.TOP_K), ref_sha, text_sha)
            for e in ENGINES]
    assert all(r is not None for r in refs)
    assert float(np.mean(refs[0].argmax == refs[1].argmax)) >= 0.98
