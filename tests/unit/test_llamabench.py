"""llama-bench interchange without services: parsing, quant names, refusal of broken records."""

import json

import pytest

from orchestrator.llamabench import (
    LlamaBenchError,
    parse,
    quant_from_model_type,
    to_record,
    to_result,
)
from orchestrator.validation import result_problems
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures"


@pytest.mark.parametrize("model_type, quant", [
    ("llama 7B Q4_K - Medium", "Q4_K_M"), ("qwen2 1.5B Q4_K - Small", "Q4_K_S"), ("llama 8B F16", "F16"),
    ("gemma3 270M Q8_0", "Q8_0"), ("llama 7B IQ2_XXS - 2.0625 bpw", "IQ2_XXS"), ("llama 135M BF16", "BF16"),
    ("mystery", "unknown"),
])
def test_model_type_maps_back_to_the_quant_spelling(model_type, quant):
    assert quant_from_model_type(model_type) == quant


def test_jsonl_and_json_arrays_parse_with_line_numbers():
    records = parse((FIXTURES / "llama-bench.jsonl").read_text())
    assert [n for n, _ in records] == [1, 2, 3, 4]
    array = parse((FIXTURES / "llama-bench.json").read_text())
    assert [n for n, _ in array] == [2, 3] and array[0][1]["n_prompt"] == 512


def test_a_broken_line_is_refused_with_its_number():
    with pytest.raises(LlamaBenchError, match="^line 3: not valid JSON"):
        parse((FIXTURES / "llama-bench-broken.jsonl").read_text())


def test_records_become_results_with_llama_bench_tests_and_quants():
    records = parse((FIXTURES / "llama-bench.jsonl").read_text())
    results = [to_result(rec, n, "rig", "sweep")[0] for n, rec in records]
    assert [r.test for r in results] == ["pp512", "tg128", "tg128 @ d4096", "pp512+tg128"]
    assert {r.quant for r in results} == {"Q4_K_M"}
    for (_, rec), r in zip(records, results):
        assert r.avg_ts == pytest.approx(rec["avg_ts"]) and r.samples_ns == rec["samples_ns"]
        # llama-bench neither hashes models nor keeps the tokens it generated
        assert result_problems(r) == ["model_sha256 is missing", "output_sha256 is missing or not a sha256 hex digest"]
    # Export gives the same llama-bench fields back.
    back = to_record(results[1])
    for key in ("n_prompt", "n_gen", "n_depth", "samples_ns", "n_threads", "n_gpu_layers", "flash_attn",
                "model_type", "model_size", "model_n_params", "cpu_info", "gpu_info", "build_commit"):
        assert back[key] == records[1][1][key], key
    assert back["avg_ts"] == pytest.approx(records[1][1]["avg_ts"])
    assert back["samples_ts"] == pytest.approx(records[1][1]["samples_ts"])


def test_the_same_line_gets_the_same_id_and_a_different_machine_another():
    (_, rec), = parse(json.dumps(json.loads((FIXTURES / "llama-bench.jsonl").read_text().splitlines()[0])))
    a, b, c = (to_result(rec, 1, m, "s")[0].job_id for m in ("rig", "rig", "other"))
    assert a == b != c


@pytest.mark.parametrize("change, message", [
    ({"avg_ts": 1.0}, "does not match samples_ns"),
    ({"samples_ns": []}, "non-empty"),
    ({"n_prompt": 0, "n_gen": 0}, "not both 0"),
    ({"samples_ns": "fast"}, "wrong type"),
])
def test_inconsistent_records_are_refused(change, message):
    rec = json.loads((FIXTURES / "llama-bench.jsonl").read_text().splitlines()[0])
    with pytest.raises(LlamaBenchError, match=f"line 7: .*{message}"):
        to_result({**rec, **change}, 7, "rig", "s")


def test_a_missing_field_is_named():
    rec = json.loads((FIXTURES / "llama-bench.jsonl").read_text().splitlines()[0])
    del rec["samples_ns"]
    with pytest.raises(LlamaBenchError, match="missing field 'samples_ns'"):
        to_result(rec, 1, "rig", "s")


def test_import_goes_through_the_collectors_store_once_per_job_and_refuses_what_validation_refuses(engine):
    from sqlalchemy import func, select

    from farm.contract import Job
    from orchestrator.collector import TrustedImport, store_import
    from orchestrator.db import JobRow, ResultRow, session_scope
    from orchestrator.llamabench import import_text

    text = (FIXTURES / "llama-bench.jsonl").read_text()
    with session_scope(engine) as s:
        assert import_text(s, text, "rig", "llama-bench.jsonl") == (4, 0)
    with session_scope(engine) as s:
        assert import_text(s, text, "rig", "llama-bench.jsonl") == (0, 4)
        assert s.scalar(select(func.count()).select_from(ResultRow)) == 4
        assert {j.state for j in s.scalars(select(JobRow))} == {"done"}
    # A result that does not match its job is refused by the collector's validation, not stored.
    (n, rec), = parse(text.splitlines()[0])
    result, spec = to_result(rec, n, "other", "s")
    job = Job.model_validate({**spec, "n_prompt": spec["n_prompt"] + 1})
    with session_scope(engine) as s:
        outcome = store_import(s, result, job, TrustedImport("llama-bench", "x.jsonl", "other"))
        assert outcome.action == "rejected" and "n_prompt is" in outcome.reason
        outcome = store_import(s, result, Job.model_validate(spec), TrustedImport("llama-bench", "x.jsonl", "rig"))
        assert outcome.action == "rejected" and "the import is from 'rig'" in outcome.reason
        assert s.get(ResultRow, result.job_id) is None


def test_markdown_has_llama_bench_columns_and_only_the_parameters_that_vary_or_differ_from_its_defaults():
    from orchestrator.report import render_results

    records = [rec for _, rec in parse((FIXTURES / "llama-bench.jsonl").read_text())]
    results = [to_result(rec, n, "rig", "s")[0] for n, rec in enumerate(records, 1)]
    head, rule, *rows = render_results(results, "md").splitlines()
    titles = [c.strip() for c in head.strip("|").split("|")]
    # All on CUDA with fa=1 (llama-bench's default is auto, -1): ngl and fa shown, the rest left out.
    assert titles == ["model", "size", "params", "backend", "ngl", "fa", "test", "t/s", "file", "worker"]
    first = [c.strip() for c in rows[0].strip("|").split("|")]
    assert first[:8] == ["llama 7B Q4_K - Medium", "3.80 GiB", "6.74 B", "CUDA", "99", "1", "pp512", "10633.04 ± 39.88"]
    assert rule.startswith("| ---") and len(rows) == 4
    # A KV type and expert offload that vary get their columns, in llama-bench's order.
    changed = to_result({**records[1], "type_k": "q8_0", "type_v": "q8_0", "n_cpu_moe": 4}, 9, "rig", "s")[0]
    titles = [c.strip() for c in render_results([*results, changed], "md").splitlines()[0].strip("|").split("|")]
    assert titles[4:9] == ["ngl", "n_cpu_moe", "type_k", "type_v", "fa"]
    # On a CPU backend llama-bench drops ngl and shows threads.
    cpu = to_result({**records[1], "backends": "CPU", "gpu_info": "", "n_gpu_layers": 0}, 1, "rig", "s")[0]
    titles = [c.strip() for c in render_results([cpu], "md").splitlines()[0].strip("|").split("|")]
    assert "ngl" not in titles and titles[4] == "threads"


def test_every_llama_bench_field_round_trips_through_a_result():
    from orchestrator.llamabench import FIELDS

    for name in ("llama-bench.jsonl", "llama-bench.json"):
        for n, rec in parse((FIXTURES / name).read_text()):
            back = to_record(to_result(rec, n, "", "s")[0])
            for key in set(rec) & set(FIELDS):
                if isinstance(rec[key], float) or key == "samples_ts":
                    assert back[key] == pytest.approx(rec[key]), key
                else:
                    assert back[key] == rec[key], key
