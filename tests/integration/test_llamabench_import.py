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
