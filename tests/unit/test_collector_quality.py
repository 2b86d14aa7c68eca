"""The collector against forged quality blocks: statistics that do not follow from their samples,
a reference that is not the model's, a block the job did not ask for."""

import numpy as np
import pytest

from farm.contract import Quality
from orchestrator import lifecycle
from orchestrator.collector import ingest
from orchestrator.db import JobRow, ResultRow, session_scope
from orchestrator.lifecycle import record
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from orchestrator.validation import quality_problems
from tests.unit.test_collector import (  # noqa: F401
    TOKENS,
    _remember_tokens,
    envelope,
    result_for,
    tokens,
)
from worker import quality as wq

N_CTX, N_CHUNKS = 32, 2


@pytest.fixture
def qjobs(engine, tokens):  # noqa: F811
    spec = SweepSpec(name="q", models=[{"name": "smollm2-135m", "quants": ["F32", "Q8_0", "Q4_0"]}], n_prompt=[16],
                     n_gen=[], repetitions=2, quality=True, quality_n_ctx=N_CTX, quality_n_chunks=N_CHUNKS)
    jobs = plan(spec)
    with session_scope(engine) as s:
        record(s, spec, jobs)
    return {j.quant: j for j in jobs}


def block(reference_sha256: str, same: bool, **update) -> Quality:
    """A real block: the core's figures for a table 'model' against itself or a perturbed copy."""
    rng = np.random.default_rng(0)
    table = rng.normal(0, 3, size=(300, 300)).astype(np.float32)
    other = table if same else table + rng.normal(0, 0.5, size=table.shape).astype(np.float32)
    chunks = wq.chunk_tokens(rng.integers(0, 300, N_CTX * N_CHUNKS).tolist(), N_CTX)
    ref = wq.reference_from_logits(lambda t: table[np.asarray(t)], chunks, N_CTX)
    f = wq.figures(wq.score(ref, lambda t: other[np.asarray(t)], chunks))
    text = wq.eval_text()
    q = Quality(reference_quant="F32", reference_sha256=reference_sha256, text_name=wq.TEXT_NAME,
                text_sha256=wq.text_sha256(text), n_ctx=N_CTX, n_chunks=N_CHUNKS, reference_top_k=ref.top_k,
                reference_mass_kept=min(1.0, ref.mass_kept), **vars(f))
    return q.model_copy(update=update)


def send(engine, job, quality, model_sha256):
    with session_scope(engine) as s:
        sent = lifecycle.lease(s.get(JobRow, job.job_id), "w1")
    r = result_for(job, model_sha256=model_sha256, quality=quality)
    with session_scope(engine) as s:
        return ingest(s, envelope(r, leased=sent))


REF, Q8 = "a" * 64, "b" * 64


def test_honest_blocks_are_stored_and_a_reference_that_is_not_the_models_is_refused(engine, qjobs):
    assert send(engine, qjobs["F32"], block(REF, same=True), REF).action == "stored"
    assert send(engine, qjobs["Q8_0"], block(REF, same=False), Q8).action == "stored"
    with session_scope(engine) as s:
        stored = s.get(ResultRow, qjobs["Q8_0"].job_id).result["quality"]
        assert stored["kld_mean"] > 0 and stored["top1_agreement"] < 1
    out = send(engine, qjobs["Q4_0"], block("d" * 64, same=False), "e" * 64)
    assert out.action == "rejected" and "not the model's F32 reference" in out.reason


@pytest.mark.parametrize("update, words", [
    ({"kld_mean": 0.001}, "kld_mean"),
    ({"ppl": 3.0}, "ppl"),
    ({"ppl_reference": 9.0}, "ppl_reference"),
    ({"top1_agreement": 0.999}, "top1_agreement"),
    ({"top1_chunk": [0.5, 0.51]}, "count of 15 scored tokens"),
    ({"kld_median": 0.0}, "kld_median"),
    ({"kld_p99": 1e-9}, "kld_p99"),
    ({"kld_percentiles": [0.0] * 101}, "outside the per-token range"),
    ({"kld_chunk_means": [0.1]}, "one sample per chunk"),
    ({"n_tokens_scored": 64}, "one sample per chunk"),
    ({"text_sha256": "f" * 64}, "not the shipped text"),
    ({"text_name": "other.txt"}, "not one this farm ships"),
    ({"reference_quant": "F16"}, "reference_quant"),
    ({"n_ctx": 64}, "n_ctx"),
])
def test_forged_statistics_are_refused(engine, qjobs, update, words):
    out = send(engine, qjobs["Q8_0"], block(REF, same=False, **update), Q8)
    assert out.action == "rejected" and words in out.reason, out.reason
    with session_scope(engine) as s:
        assert s.get(ResultRow, qjobs["Q8_0"].job_id) is None


def test_a_file_against_itself_must_score_zero(engine, qjobs):
    out = send(engine, qjobs["F32"], block(REF, same=False), REF)
    assert out.action == "rejected" and "against itself" in out.reason
    # The reference quant's own pass must name the file it measured.
    out = send(engine, qjobs["F32"], block("d" * 64, same=True), REF)
    assert out.action == "rejected" and "another reference file" in out.reason


def test_a_block_must_be_asked_for_and_come_when_asked(qjobs):
    job = qjobs["Q8_0"]
    assert "carries none" in quality_problems(result_for(job, model_sha256=Q8), job)[0]
    plain = job.model_copy(update={"quality": False, "quality_reference_quant": ""})
    assert "did not ask" in quality_problems(result_for(job, model_sha256=Q8, quality=block(REF, False)), plain)[0]
    assert quality_problems(result_for(job, model_sha256=Q8, quality=block(REF, False)), job) == []
