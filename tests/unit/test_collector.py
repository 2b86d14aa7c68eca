"""The collector against a real (embedded) SQLite database after Alembic's upgrade."""

import pytest
from sqlalchemy import func, select

from orchestrator.collector import ingest
from orchestrator.db import RESULT_KEY_COLUMNS, JobRow, ResultRow, make_engine, session_scope, upgrade
from orchestrator.dispatch import record
from orchestrator.sweep import SweepSpec, expand
from worker.contract import Envelope, Result, summarize


@pytest.fixture
def engine(data_dir):
    url = f"sqlite:///{data_dir / 'db.sqlite3'}"
    upgrade(url)
    return make_engine(url)


@pytest.fixture
def jobs(engine):
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_prompt=[16], n_gen=[4], repetitions=2)
    jobs = expand(spec)
    with session_scope(engine) as s:
        record(s, spec, jobs)
    return jobs


def result_for(job, **update):
    samples = [1_000_000, 1_200_000]
    avg, std = summarize(job.n_tokens, samples)
    r = Result(job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker="w1", model=job.model,
               model_sha256="c" * 64, source_sha256=job.model_sha256, quant=job.quant, test=job.test,
               n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth, repetitions=job.repetitions,
               samples_ns=samples, avg_ts=avg, stddev_ts=std)
    return r.model_copy(update=update)


def envelope(result, worker="w1"):
    return Envelope(kind="result", job_id=result.job_id, worker=worker, result=result).model_dump(mode="json")


def test_result_stored_once_and_key_columns_agree_with_the_json(engine, jobs):
    job = jobs[0]
    with session_scope(engine) as s:
        assert ingest(s, Envelope(kind="started", job_id=job.job_id, worker="w1").model_dump(mode="json")).action == "started"
    with session_scope(engine) as s:
        assert s.get(JobRow, job.job_id).state == "running"
    body = envelope(result_for(job))
    with session_scope(engine) as s:
        assert ingest(s, body).action == "stored"
    with session_scope(engine) as s:
        assert ingest(s, body).action == "duplicate"
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(ResultRow)) == 1
        row = s.get(ResultRow, job.job_id)
        for col in RESULT_KEY_COLUMNS:
            assert getattr(row, col) == row.result[col], col
        assert s.get(JobRow, job.job_id).state == "done"


def test_forged_result_is_rejected_and_the_job_fails_with_the_reason(engine, jobs):
    job = jobs[1]
    with session_scope(engine) as s:
        out = ingest(s, envelope(result_for(job, avg_ts=123456.0)))
    assert out.action == "rejected" and "avg_ts" in out.reason
    with session_scope(engine) as s:
        assert s.get(ResultRow, job.job_id) is None
        assert "result rejected" in s.get(JobRow, job.job_id).error


def test_unknown_job_and_malformed_messages_are_rejected(engine, jobs):
    other = result_for(jobs[0], job_id="not-a-job")
    with session_scope(engine) as s:
        assert ingest(s, envelope(other)).action == "rejected"
        assert ingest(s, {"kind": "result", "job_id": 3}).action == "rejected"
        assert ingest(s, "pickle?").action == "rejected"


def test_result_from_a_worker_other_than_the_sender_is_rejected(engine, jobs):
    with session_scope(engine) as s:
        out = ingest(s, envelope(result_for(jobs[0]), worker="w2"))
    assert out.action == "rejected" and "claims worker" in out.reason


def test_a_failed_result_marks_the_job_failed(engine, jobs):
    job = jobs[0]
    with session_scope(engine) as s:
        assert ingest(s, envelope(Result.failed(job, "w1", "x.gguf is not a GGUF file"))).action == "stored"
    with session_scope(engine) as s:
        row = s.get(JobRow, job.job_id)
        assert (row.state, row.error) == ("failed", "x.gguf is not a GGUF file")
