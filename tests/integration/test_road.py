"""The whole road with real parts: sweep -> broker -> worker process -> llama.cpp -> collector -> database."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from farm.modelfiles import CATALOGUE, sha256_file
from orchestrator.db import (
    RESULT_KEY_COLUMNS,
    JobRow,
    ResultRow,
    SweepRow,
    session_scope,
)
from tests.integration.conftest import at_head, service_env, tokenfarm, worker_process

pytestmark = pytest.mark.integration

SWEEP = """\
name: road
models:
  - name: smollm2-135m
    quants: [Q4_1, Q8_0]
n_prompt: [32]
n_gen: [8]
repetitions: 2
n_warmup: 1
"""


def run_sweep(tmp_path: Path, env: dict[str, str]) -> None:
    sweep = tmp_path / "road.yaml"
    sweep.write_text(SWEEP)
    with worker_process(env, "it-worker", tmp_path / "worker.log"):
        proc = tokenfarm(env, "sweep", "submit", str(sweep), "--wait", "--timeout", "500")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "worker.log").read_text()[-3000:]



def check_stored(database_url: str) -> list[dict]:
    engine = create_engine(database_url)
    with session_scope(engine) as s:
        rows = s.scalars(select(ResultRow)).all()
        assert len(rows) == 4
        assert {r.status for r in rows} == {"ok"}
        assert {(r.quant, r.test) for r in rows} == {(q, t) for q in ("Q4_1", "Q8_0") for t in ("pp32", "tg8")}
        for r in rows:
            for col in RESULT_KEY_COLUMNS:
                assert getattr(r, col) == r.result[col], col
            assert r.avg_ts > 0 and len(r.result["samples_ns"]) == 2
            assert r.result["source_sha256"] == CATALOGUE["smollm2-135m"].sha256
            assert r.worker == "it-worker"
            assert r.result["versions"]["llama_cpp_python"] == "0.3.36"
        native = {r.model_sha256 for r in rows if r.quant == "Q4_1"}
        derived = {r.model_sha256 for r in rows if r.quant == "Q8_0"}
        assert native == {CATALOGUE["smollm2-135m"].sha256}
        assert len(derived) == 1 and derived != native
        assert {j.state for j in s.scalars(select(JobRow))} == {"done"}
        assert s.scalar(select(SweepRow.n_jobs)) == 4
        return [r.result for r in rows]
    engine.dispose()


def check_cli_reads(env: dict[str, str]) -> None:
    as_json = json.loads(tokenfarm(env, "results", "--format", "json").stdout)
    assert len(as_json) == 4 and all(r["status"] == "ok" for r in as_json)
    lines = tokenfarm(env, "results", "--format", "jsonl").stdout.splitlines()
    assert [json.loads(line)["job_id"] for line in lines] == [r["job_id"] for r in as_json]
    rows = list(csv.DictReader(io.StringIO(tokenfarm(env, "results", "--format", "csv").stdout)))
    assert len(rows) == 4 and {"avg_ts", "stddev_ts", "samples_ns", "hardware.cpu"} <= set(rows[0])
    md = tokenfarm(env, "results", "--format", "md").stdout
    assert md.count("| smollm2-135m |") == 4
    board = tokenfarm(env, "leaderboard")
    assert board.returncode == 0 and "smollm2-135m" in board.stdout and "Q8_0" in board.stdout
    status = tokenfarm(env, "status")
    assert status.returncode == 0 and "road" in status.stdout


def test_sweep_on_postgres_and_redis(tmp_path, pg_empty_url, redis_url, smollm2):
    pg_url = pg_empty_url  # `db upgrade` from nothing, as a new deployment runs it
    env = service_env(tmp_path / "data", database_url=pg_url, broker_url=redis_url)
    assert tokenfarm(env, "db", "upgrade").returncode == 0
    run_sweep(tmp_path, env)
    check_stored(pg_url)
    check_cli_reads(env)
    # The embedded default was never touched: no SQLite file appeared.
    assert not (tmp_path / "data" / "tokenfarm.sqlite3").exists()


def test_sweep_on_the_embedded_default(tmp_path, smollm2):
    env = at_head(service_env(tmp_path / "data"))
    run_sweep(tmp_path, env)
    check_stored(f"sqlite:///{tmp_path / 'data' / 'tokenfarm.sqlite3'}")
    check_cli_reads(env)


def test_a_model_file_that_is_not_gguf_fails_its_jobs_and_the_worker_goes_on(tmp_path, smollm2):
    env = at_head(service_env(tmp_path / "data"))
    model = tmp_path / "mine.gguf"
    shutil.copyfile(smollm2, model)
    sweep = tmp_path / "two.yaml"
    sweep.write_text(f"name: two\nmodels: [{model}, smollm2-135m]\nn_prompt: [16]\nn_gen: []\nrepetitions: 1\n")
    submitted = tokenfarm(env, "sweep", "submit", str(sweep))
    assert submitted.returncode == 0, submitted.stderr
    # The file is replaced after submission, as a half-finished copy on a worker box would be.
    model.write_bytes(b"<html>404 Not Found</html>" * 100)
    with worker_process(env, "it-worker", tmp_path / "worker.log") as proc:
        waited = tokenfarm(env, "sweep", "wait", "two", "--timeout", "300")
        assert proc.poll() is None, "the worker died"
    assert waited.returncode == 1
    assert "not a GGUF file" in waited.stderr
    assert "1 of 2 jobs failed" in waited.stderr
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'tokenfarm.sqlite3'}")
    with session_scope(engine) as s:
        by_model = {r.model: r for r in s.scalars(select(ResultRow))}
    assert by_model[str(model)].status == "failed" and "not a GGUF file" in by_model[str(model)].result["error"]
    assert by_model["smollm2-135m"].status == "ok"
    assert sha256_file(smollm2) == CATALOGUE["smollm2-135m"].sha256
