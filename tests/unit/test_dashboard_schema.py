"""The dashboard's JSON paths and its synthetic results against farm/contract.py, so they cannot drift."""

from __future__ import annotations

import random
import uuid

import pytest

from dashboard import queries, sample_data
from farm.contract import Job, Result
from orchestrator.validation import result_problems

SCHEMA = Result.model_json_schema()


def schema_at(dotted: str) -> dict:
    """The JSON schema of a dotted path into a Result; KeyError naming the part that does not exist."""
    node = SCHEMA
    for part in dotted.split("."):
        node = _concrete(node)
        if part not in node.get("properties", {}):
            raise KeyError(f"{dotted}: no field {part!r} (known: {', '.join(sorted(node.get('properties', {})))})")
        node = node["properties"][part]
    return _concrete(node)


def _concrete(node: dict) -> dict:
    """Follow $ref, and through Optional's anyOf to its non-null branch."""
    if "$ref" in node:
        return _concrete(SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]])
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:
            return _concrete(branches[0])
    return node


def test_the_checker_refuses_a_guessed_name():
    schema_at("speculation.speedup")
    for guessed in ("median_ts", "speedup", "peak_rss_bytes", "model_facts.active_bytes_per_token",
                    "speculation.mean_accepted_len"):
        with pytest.raises(KeyError, match="no field"):
            schema_at(guessed)


@pytest.mark.parametrize("path", queries.JSON_PATHS)
def test_every_path_the_dashboard_reads_is_in_the_result_schema(path):
    schema_at(path)


def test_paths_name_distinct_columns():
    # _unpack names a column after the path's last part: two paths must not collide.
    for group in (queries.MEASUREMENT_PATHS, queries.FACT_PATHS, queries.HARDWARE_PATHS, queries.TECHNIQUE_PATHS):
        names = [p.rsplit(".", 1)[-1] for p in group]
        assert len(names) == len(set(names)), group


def sample_pairs(n: int, seed: int = 3) -> list[tuple[dict, dict]]:
    rng = random.Random(seed)
    files = [sample_data._model_file(b, q) for b in sample_data.BASE_MODELS for q in sample_data.QUANT_BITS]
    pairs = []
    for i in range(n):
        mf, worker, test = rng.choice(files), rng.choice(sample_data.WORKERS), rng.choice(sample_data.TESTS)
        technique = rng.choice(sample_data.TECHNIQUES) if test[0] == "tg" else "baseline"
        spec = sample_data.job_spec(rng, str(uuid.UUID(int=rng.getrandbits(128))), "sweep", i, mf, test, technique)
        pairs.append(sample_data.validated(spec, sample_data.result_json(rng, spec, mf, worker, sample_data.START,
                                                                         failed=i % 17 == 0)))
    return pairs


def test_synthetic_results_are_valid_and_self_consistent():
    pairs = sample_pairs(400)
    techniques = set()
    for spec, data in pairs:
        result = Result.model_validate(data)
        assert result_problems(result, Job.model_validate(spec)) == [], data["job_id"]
        techniques.add(result.technique)
    assert techniques == {"baseline", "spec", "lookup"}
    assert any(d["status"] == "failed" for _, d in pairs)


def value_at(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def test_synthetic_results_fill_every_path_the_dashboard_reads():
    # A path that exists in the schema but that no synthetic result fills would leave a page empty.
    ok = [d for _, d in sample_pairs(400) if d["status"] == "ok"]
    for path in queries.JSON_PATHS:
        block = path.split(".")[0]
        # Optional blocks (speculation, quality) are read only where a result has one.
        values = [value_at(d, path) for d in ok if block not in ("speculation", "quality") or d[block]]
        assert any(v not in (None, 0, "", []) for v in values), path


def test_first_divergence_is_the_earliest_mismatch_over_prompts():
    assert queries._first_divergence([None, 17, 4, None]) == 4.0
    assert queries._first_divergence("[null, 9]") == 9.0
    assert queries._first_divergence([None, None]) is None
    assert queries._first_divergence(None) is None
