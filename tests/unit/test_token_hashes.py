"""Greedy-output hashes: the canonical encoding, and the losslessness claim checked against them."""

from __future__ import annotations

import hashlib
import struct

from farm.contract import Job
from farm.identity import combine_sha256, output_sha256, tokens_sha256
from orchestrator.validation import result_problems
from tests.unit.test_speculative import FakeBackend, result_for, spec_job
from worker.measure import measure, speculation_block
from worker.speculative import ModelDrafter


def test_token_ids_are_hashed_as_little_endian_int32():
    raw = bytes([1, 0, 0, 0]) + bytes([0x7F, 0x51, 0x02, 0x00])  # 1 and 151_935
    assert tokens_sha256([1, 151_935]) == hashlib.sha256(raw).hexdigest()
    assert tokens_sha256([]) == hashlib.sha256(b"").hexdigest()
    assert struct.pack("<i", 151_935) == raw[4:]


def test_a_result_hash_combines_sequence_digests_in_order_and_keeps_their_boundaries():
    one, two = [5, 6, 7], [8]
    expected = hashlib.sha256(bytes.fromhex(tokens_sha256(one)) + bytes.fromhex(tokens_sha256(two))).hexdigest()
    assert output_sha256([one, two]) == expected == combine_sha256([tokens_sha256(one), tokens_sha256(two)])
    # The same ids split differently, or in another order, are another output.
    assert output_sha256([[5, 6], [7, 8]]) != expected
    assert output_sha256([two, one]) != expected
    assert output_sha256([one + two]) != expected


def test_the_measurement_core_keeps_the_greedy_tokens_it_hashes():
    job = Job(job_id="j", sweep_id="s", index=0, model="m", quant="F32", kind="tg", n_gen=6, repetitions=2, n_warmup=0)
    first, second = measure(FakeBackend(), job), measure(FakeBackend(), job)
    assert len(first.tokens) == 6 and first.tokens == second.tokens
    assert output_sha256([first.tokens]) == output_sha256([second.tokens])
    other = measure(FakeBackend(next_token=lambda h: 1 + len(h) % 5), job)
    assert output_sha256([other.tokens]) != output_sha256([first.tokens])


def test_speculation_measured_derives_verdicts_and_hashes_from_the_tokens():
    s = speculation_block(10, [100, 100], [50, 50], 4, 2, 3, [2, 2], [1, 1], 10, 20,
                             baseline_tokens=[[1, 2, 3], [4, 5]], tokens=[[1, 2, 3], [4, 6]])
    assert s.first_mismatch == [None, 1] and s.lossless is False
    assert s.baseline_sha256 == [tokens_sha256([1, 2, 3]), tokens_sha256([4, 5])]
    assert s.output_sha256 == [tokens_sha256([1, 2, 3]), tokens_sha256([4, 6])]


def test_a_forged_lossless_claim_is_refused():
    job = spec_job()
    good = result_for(job, FakeBackend(), ModelDrafter(FakeBackend(), job.n_draft))
    assert result_problems(good, job) == []
    s = good.speculation
    assert s.lossless and s.baseline_sha256 == s.output_sha256
    # The technique's tokens really differed on prompt 1, but the worker claims it reproduced them.
    diverged = list(s.output_sha256)
    diverged[1] = tokens_sha256([9, 9, 9])
    forged = good.model_copy(update={"speculation": s.model_copy(update={"output_sha256": diverged})})
    problems = result_problems(forged, job)
    assert any("prompt 1: first_mismatch None contradicts the token hashes" in p for p in problems), problems
    # The opposite lie: identical tokens reported as diverged (lossless False, consistent with first_mismatch).
    smeared = s.model_copy(update={"first_mismatch": [None, 3, None], "lossless": False})
    assert any("prompt 1: first_mismatch 3" in p for p in result_problems(good.model_copy(update={"speculation": smeared}), job))


def test_result_hashes_must_be_present_and_agree_with_the_per_prompt_ones():
    job = spec_job()
    good = result_for(job, FakeBackend(), ModelDrafter(FakeBackend(), job.n_draft))
    assert any("output_sha256 is missing" in p for p in result_problems(good.model_copy(update={"output_sha256": ""}), job))
    other = good.model_copy(update={"output_sha256": output_sha256([[1]])})
    assert any("per-prompt baseline token hashes" in p for p in result_problems(other, job))
    short = good.model_copy(update={"speculation": good.speculation.model_copy(update={"baseline_sha256": []})})
    assert any("token hashes for 3 prompts" in p for p in result_problems(short, job))
