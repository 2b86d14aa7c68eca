"""llama-bench import and export through the CLI, on PostgreSQL: idempotent, round-tripping, refusing broken lines."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.integration.conftest import at_head, service_env, tokenfarm

pytestmark = pytest.mark.integration

FIXTURES = REPO / "tests" / "fixtures"


def test_import_export_round_trip(tmp_path, pg_url):
    env = at_head(service_env(tmp_path / "data", database_url=pg_url))
    fixture = FIXTURES / "llama-bench.jsonl"
    first = tokenfarm(env, "import", "llama-bench", str(fixture), "--machine", "rig")
    assert first.returncode == 0 and "imported 4 results" in first.stdout, first.stderr
    again = tokenfarm(env, "import", "llama-bench", str(fixture), "--machine", "rig")
    assert again.returncode == 0 and "imported 0 results" in again.stdout and "4 already present" in again.stdout

    exported = [json.loads(line) for line in tokenfarm(env, "results", "--format", "jsonl").stdout.splitlines()]
    originals = [json.loads(line) for line in fixture.read_text().splitlines()]
    assert len(exported) == 4 and {r["worker"] for r in exported} == {"rig"}
    by_key = {(r["n_prompt"], r["n_gen"], r["n_depth"]): r for r in exported}
    for orig in originals:
        got = by_key[(orig["n_prompt"], orig["n_gen"], orig["n_depth"])]
        for key in ("samples_ns", "model_filename", "model_type", "model_size", "model_n_params", "n_threads",
                    "n_batch", "n_ubatch", "n_gpu_layers", "flash_attn", "cpu_info", "gpu_info", "build_commit"):
            assert got[key] == orig[key], key
        assert got["avg_ts"] == pytest.approx(orig["avg_ts"]) and got["stddev_ts"] == pytest.approx(orig["stddev_ts"])

    # Our own export is valid llama-bench input: a JSON array of it imports as another machine.
    array = tmp_path / "ours.json"
    array.write_text(tokenfarm(env, "results", "--format", "json").stdout)
    copied = tokenfarm(env, "import", "llama-bench", str(array), "--machine", "copy")
    assert copied.returncode == 0 and "imported 4 results" in copied.stdout, copied.stderr
    both = json.loads(tokenfarm(env, "results", "--format", "json").stdout)
    assert sorted(r["avg_ts"] for r in both if r["worker"] == "copy") == \
        pytest.approx(sorted(r["avg_ts"] for r in both if r["worker"] == "rig"))
    status = tokenfarm(env, "status")
    assert status.returncode == 0 and "import rig" in status.stdout


def test_a_broken_line_stores_nothing_and_names_the_line(tmp_path, pg_url):
    env = at_head(service_env(tmp_path / "data", database_url=pg_url))
    proc = tokenfarm(env, "import", "llama-bench", str(FIXTURES / "llama-bench-broken.jsonl"), "--machine", "rig")
    assert proc.returncode != 0 and "line 3: not valid JSON" in proc.stderr
    assert tokenfarm(env, "results", "--format", "jsonl").stdout == ""


def _diff(original: dict, back: dict) -> list[str]:
    """Fields of llama-bench's set both records carry that differ; rates to the precision llama-bench prints."""
    from orchestrator.llamabench import FIELDS

    out = []
    for key in sorted(set(original) & set(back) & set(FIELDS)):
        a, b = original[key], back[key]
        if key in ("avg_ts", "stddev_ts"):
            same = a == pytest.approx(b, rel=1e-9, abs=1e-6)  # printed with 6 decimals
        elif key == "samples_ts":
            same = a == pytest.approx(b, rel=5e-6)  # printed with 6 significant digits
        else:
            same = a == b and type(a) is type(b)
        if not same:
            out.append(f"{key}: {a!r} != {b!r}")
    return out


@pytest.mark.parametrize("name", ["llama-bench-smollm2.json", "llama-bench-smollm2.jsonl"])
def test_real_llama_bench_output_round_trips_field_for_field(tmp_path, pg_url, name):
    """Native llama-bench's own output (tests/fixtures/README.md says how it was made) -> import ->
    export: every field of llama-bench's set comes back equal and of the same JSON type."""
    env = at_head(service_env(tmp_path / "data", database_url=pg_url))
    fixture = FIXTURES / name
    proc = tokenfarm(env, "import", "llama-bench", str(fixture))
    assert proc.returncode == 0 and "imported 2 results" in proc.stdout, proc.stderr
    text = fixture.read_text()
    originals = json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]
    exported = json.loads(tokenfarm(env, "results", "--format", "json").stdout)
    assert len(exported) == len(originals) == 2
    by_test = {(r["n_prompt"], r["n_gen"]): r for r in exported}
    for orig in originals:
        back = by_test[(orig["n_prompt"], orig["n_gen"])]
        assert _diff(orig, back) == []
        assert back["worker"] == orig["cpu_info"]  # no --machine: the record's cpu_info names it


def test_real_results_round_trip_through_export_and_import(tmp_path, pg_url, smollm2):
    """Results this farm's llama.cpp engine measured on SmolLM2 -> JSON export -> import -> export:
    the same llama-bench records."""
    from farm.contract import EngineConfig, Job
    from farm.settings import Settings
    from orchestrator.report import render_results
    from tests.integration.conftest import MODELS_DIR as models
    from worker.tasks import execute

    config = EngineConfig(n_threads=1, type_k="q8_0", type_v="q8_0", flash_attn="on")
    results = [execute(Job(job_id=f"j{i}", sweep_id="s", index=i, model="smollm2-135m", quant="Q4_1", kind=kind,
                           repetitions=2, n_warmup=0, config=config, **sizes),
                       Settings(worker_name="box", models_dir=models))
               for i, (kind, sizes) in enumerate([("pp", {"n_prompt": 32}), ("tg", {"n_gen": 8})])]
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    first = json.loads(render_results(results, "json"))
    path = tmp_path / "real.json"
    path.write_text(json.dumps(first))
    env = at_head(service_env(tmp_path / "data", database_url=pg_url))
    proc = tokenfarm(env, "import", "llama-bench", str(path), "--machine", "box")
    assert proc.returncode == 0 and "imported 2 results" in proc.stdout, proc.stderr
    back = {r["test"]: r for r in json.loads(tokenfarm(env, "results", "--format", "json").stdout)}
    for orig in first:
        assert _diff(orig, back[orig["test"]]) == [], orig["test"]
        assert back[orig["test"]]["type_k"] == "q8_0" and back[orig["test"]]["flash_attn"] == 1
