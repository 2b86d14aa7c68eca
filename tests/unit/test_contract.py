import json

import pytest
from pydantic import ValidationError

from farm.contract import Envelope, Job, Result, format_test_name
from farm.identity import output_sha256
from farm.stats import summarize
from orchestrator.validation import result_problems


def make_job(**kw) -> Job:
    base = dict(job_id="j1", sweep_id="s1", index=0, model="smollm2-135m", model_sha256="a" * 64,
                quant="Q8_0", kind="tg", n_gen=16, repetitions=3)
    return Job(**{**base, **kw})


def ok_result(job: Job, samples=(1_000_000_000, 1_100_000_000, 900_000_000)) -> Result:
    avg, std = summarize(job.n_tokens, list(samples))
    return Result(job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker="w", model=job.model,
                  model_sha256="b" * 64, source_sha256=job.model_sha256, quant=job.quant, test=job.test,
                  n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth, repetitions=job.repetitions,
                  samples_ns=list(samples), avg_ts=avg, stddev_ts=std, output_sha256=output_sha256([[1, 2, 3]]))


def test_llama_bench_test_names():
    assert format_test_name("pp", 512, 0, 0) == "pp512"
    assert format_test_name("tg", 0, 128, 0) == "tg128"
    assert format_test_name("tg", 0, 128, 4096) == "tg128 @ d4096"


def test_job_and_result_round_trip_through_json():
    job = make_job(n_depth=64)
    assert Job.model_validate(json.loads(job.model_dump_json())) == job
    res = ok_result(job)
    back = Result.model_validate(json.loads(res.model_dump_json()))
    assert back == res
    env = Envelope(kind="result", job_id=job.job_id, worker="w", result=res)
    assert Envelope.model_validate(json.loads(env.model_dump_json())).result == res


def test_job_refuses_unknown_fields_and_quants():
    with pytest.raises(ValidationError):
        Job.model_validate({**make_job().model_dump(), "surprise": 1})
    with pytest.raises(ValidationError):
        make_job(quant="Q9")
    with pytest.raises(ValidationError):
        make_job(kind="pp", n_prompt=0)


def test_statistics_are_per_repetition_rates():
    mean, std = summarize(100, [1_000_000_000, 500_000_000])
    assert mean == pytest.approx((100 + 200) / 2)
    assert std == pytest.approx(70.7106781, rel=1e-6)


def test_consistent_result_has_no_problems():
    job = make_job()
    assert result_problems(ok_result(job), job) == []


def test_forged_average_is_detected():
    job = make_job()
    forged = ok_result(job).model_copy(update={"avg_ts": 1e6})
    assert any("avg_ts" in p for p in result_problems(forged, job))


def test_sample_count_must_match_repetitions():
    job = make_job()
    short = ok_result(job, samples=(1_000_000_000, 1_000_000_000))
    assert any("samples" in p or "repetitions" in p for p in result_problems(short, job))


def test_result_for_another_test_is_detected():
    job = make_job()
    other = ok_result(job).model_copy(update={"test": "tg999"})
    assert any(p.startswith("test is") for p in result_problems(other, job))


def test_failed_result_must_give_a_reason():
    job = make_job()
    assert result_problems(Result.failed(job, "w", ""), job) == ["a failed result must say why"]
    assert result_problems(Result.failed(job, "w", "not a GGUF file"), job) == []
