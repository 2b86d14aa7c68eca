from pathlib import Path

import pytest

from farm.modelfiles import CATALOGUE
from orchestrator.planning import plan
from orchestrator.sweep import SweepError, SweepSpec, count_jobs, expand, load_spec


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(text)
    return p


def test_expansion_is_the_cartesian_product_in_model_major_order():
    spec = SweepSpec(
        name="t",
        models=[{"name": "smollm2-135m", "quants": ["Q4_1", "Q8_0"]}, "gemma3-270m"],
        n_prompt=[16, 32], n_gen=[8], n_depth=[0, 64], n_threads=[1, 2],
    )
    jobs = plan(spec, sweep_id="s")
    # smollm2: 2 quants x 2 thread counts x 3 tests x 2 depths; gemma: 1 native quant x 2 x 3 x 2
    assert len(jobs) == 2 * 2 * 3 * 2 + 1 * 2 * 3 * 2
    assert [j.index for j in jobs] == list(range(len(jobs)))
    models = [j.model for j in jobs]
    # model-major: all jobs of one model are contiguous
    assert models == sorted(models, key=lambda m: ["smollm2-135m", "gemma3-270m"].index(m))
    quants = [j.quant for j in jobs if j.model == "smollm2-135m"]
    assert quants == sorted(quants, key=["Q4_1", "Q8_0"].index)
    assert {j.quant for j in jobs if j.model == "gemma3-270m"} == {CATALOGUE["gemma3-270m"].quant}
    assert len({j.job_id for j in jobs}) == len(jobs)
    assert {j.test for j in jobs} == {"pp16", "pp32", "tg8", "pp16 @ d64", "pp32 @ d64", "tg8 @ d64"}
    assert all(j.model_sha256 == CATALOGUE[j.model].sha256 for j in jobs)


def test_sweep_level_quants_apply_to_string_entries():
    spec = SweepSpec(name="t", models=["smollm2-135m"], quants=["Q8_0", "F16"], n_prompt=[8], n_gen=[])
    assert [j.quant for j in plan(spec)] == ["Q8_0", "F16"]


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = write(tmp_path, "name: x\nmodels: [smollm2-135m\nn_gen: [8]\n")
    with pytest.raises(SweepError) as e:
        load_spec(p)
    assert "YAML syntax error" in str(e.value) and "line 3" in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_field_is_named(tmp_path):
    p = write(tmp_path, "name: x\nmodels: [smollm2-135m]\nn_promt: [8]\n")
    with pytest.raises(SweepError, match="unknown field 'n_promt'"):
        load_spec(p)


def test_unknown_quant_is_named(tmp_path):
    p = write(tmp_path, "name: x\nmodels: [smollm2-135m]\nquants: [Q9_9]\n")
    with pytest.raises(SweepError, match="unknown quant 'Q9_9'"):
        load_spec(p)


def test_unknown_quant_in_a_model_entry(tmp_path):
    p = write(tmp_path, "name: x\nmodels: [{name: smollm2-135m, quants: [Q7]}]\n")
    with pytest.raises(SweepError, match="unknown quant 'Q7'"):
        load_spec(p)


def test_missing_model_path_is_refused_at_expansion(tmp_path):
    spec = SweepSpec(name="x", models=["models/nope.gguf"])
    with pytest.raises(SweepError, match="no such file"):
        plan(spec, base_dir=tmp_path)


def test_non_gguf_model_path_is_refused_at_expansion(tmp_path):
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(SweepError, match="not a GGUF file"):
        plan(SweepSpec(name="x", models=[str(bad)]), base_dir=tmp_path)


def test_a_sweep_without_tests_is_refused():
    with pytest.raises(SweepError, match="no tests"):
        plan(SweepSpec(name="x", models=["smollm2-135m"], n_prompt=[], n_gen=[]))


def test_a_sweep_that_is_not_a_mapping(tmp_path):
    with pytest.raises(SweepError, match="YAML mapping"):
        load_spec(write(tmp_path, "- just\n- a list\n"))


def test_pg_pairs_and_derived_moe_names_expand_into_jobs(tmp_path):
    from orchestrator.planning import plan
    from orchestrator.sweep import SweepSpec

    spec = SweepSpec(name="pg", models=["smollm2-135m-moe8x2"], n_prompt=[], n_gen=[16], n_pg=[[64, 16]])
    jobs = plan(spec, base_dir=tmp_path)
    assert [(j.kind, j.test) for j in jobs] == [("tg", "tg16"), ("pg", "pp64+tg16")]
    assert {(j.model, j.quant, j.model_sha256) for j in jobs} == {("smollm2-135m-moe8x2", "F32", None)}


def test_a_pg_pair_with_a_zero_is_refused():
    from pydantic import ValidationError

    from orchestrator.sweep import SweepSpec

    with pytest.raises(ValidationError, match="n_pg"):
        SweepSpec(name="x", models=["smollm2-135m"], n_pg=[[512, 0]])


def test_an_moe_name_using_more_experts_than_it_has_is_refused(tmp_path):
    from orchestrator.planning import plan
    from orchestrator.sweep import SweepError, SweepSpec

    with pytest.raises(SweepError, match="experts used"):
        plan(SweepSpec(name="x", models=["smollm2-135m-moe2x4"], n_gen=[8]), base_dir=tmp_path)


def test_a_sweep_file_above_the_size_limit_is_refused_before_parsing(tmp_path):
    p = write(tmp_path, "name: big\nmodels: [smollm2-135m]\nn_gen: [" + ", ".join(["8"] * 400) + "]\n")
    with pytest.raises(SweepError, match="above the limit of 1000"):
        load_spec(p, max_file_bytes=1000)
    assert load_spec(p).n_gen[0] == 8


def test_the_job_count_is_bounded_before_the_product_is_made():
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_prompt=list(range(1, 101)), n_gen=[],
                     n_threads=list(range(1, 101)), n_batch=list(range(1, 101)))
    with pytest.raises(SweepError, match="up to 1000000 jobs, above the limit of 10000.*--max-jobs"):
        plan(spec)
    small = SweepSpec(name="t", models=["smollm2-135m"], n_prompt=[8, 16], n_gen=[4], n_threads=[1, 2])
    assert count_jobs(small) == len(plan(small)) == 6
    with pytest.raises(SweepError, match="above the limit of 5"):
        plan(small, max_jobs=5)


@pytest.mark.parametrize("name", ["a\x00b", "tab\there", "x" * 201])
def test_names_the_database_refuses_are_refused(name):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="control character|at most 200 characters"):
        SweepSpec(name=name, models=["smollm2-135m"])
    with pytest.raises(ValidationError, match="control character"):
        SweepSpec(name="ok", models=["smollm2-135m\x00"])
    with pytest.raises(ValidationError, match="control character"):
        SweepSpec(name="ok", models=[{"name": "m\x01.gguf"}])


def test_a_300_character_file_name_is_one_line(tmp_path):
    with pytest.raises(SweepError, match="cannot read the sweep file"):
        load_spec(tmp_path / ("s" * 300 + ".yaml"))


def test_a_model_or_quant_listed_twice_runs_once_with_a_warning():
    spec = SweepSpec(name="t", models=["smollm2-135m", {"name": "smollm2-135m"}, "smollm2-135m",
                                       {"name": "gemma3-270m", "quants": ["Q8_0", "Q8_0"]}], n_prompt=[8], n_gen=[])
    jobs = plan(spec)
    assert [(j.model, j.quant) for j in jobs] == [("smollm2-135m", CATALOGUE["smollm2-135m"].quant),
                                                   ("gemma3-270m", "Q8_0")]
    assert spec.duplicates() == ["model 'smollm2-135m' is listed twice; its jobs run once"] * 2 + [
        "model 'gemma3-270m' lists a quant twice; each runs once"]


def test_mtp_on_llamacpp_alone_is_one_line_not_an_index_error():
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_gen=[8], techniques=["mtp"], prompt_categories=["qa"])
    with pytest.raises(SweepError, match=r"this file carries no MTP layers; use engine torch with trained heads"):
        plan(spec)


def test_expansion_reads_no_file(monkeypatch):
    """expand() is pure: identities in, jobs out; a path model that exists nowhere still expands,
    and any attempt to open or stat a file fails the test."""
    import builtins
    import os

    from orchestrator.sweep import ModelIdentity

    def no_io(*a, **k):
        raise AssertionError("expand() touched the file system")

    monkeypatch.setattr(builtins, "open", no_io)
    monkeypatch.setattr(os, "stat", no_io)
    spec = SweepSpec(name="pure", models=["/nowhere/model.gguf"], n_prompt=[8], n_gen=[4])
    jobs = expand(spec, {"/nowhere/model.gguf": ModelIdentity("/nowhere/model.gguf", "ab" * 32, "Q8_0")})
    assert [(j.model, j.quant, j.kind) for j in jobs] == [("/nowhere/model.gguf", "Q8_0", "pp"),
                                                         ("/nowhere/model.gguf", "Q8_0", "tg")]
    assert all(j.need_bytes == 0 for j in jobs)  # memory is planning's, not expansion's


def test_every_llama_bench_parameter_is_a_list_and_the_sweep_is_their_product(tmp_path):
    p = write(tmp_path, """
name: levers
models: [smollm2-135m]
n_prompt: [16]
n_gen: []
type_k: [f16, q8_0]
type_v: [f16]
n_cpu_moe: [0]
override_tensors: ["", "token_embd=CPU"]
n_gpu_layers: [0, 99]
split_mode: [layer, none]
main_gpu: [0]
tensor_split: ["3/1", [1, 1]]
no_kv_offload: [false, true]
use_mmap: [true, false]
flash_attn: [on, off, auto]
n_batch: [256]
n_ubatch: [128]
n_threads: [1]
cpu_mask: ["0x3"]
cpu_strict: [true]
poll: [0]
prio: [1]
""")
    spec = load_spec(p)
    jobs = plan(spec, sweep_id="s")
    assert len(jobs) == count_jobs(spec) == 2 * 2 * 2 * 2 * 2 * 2 * 2 * 3
    configs = [j.config for j in jobs]
    assert len(set(configs)) == len(configs)
    assert {c.tensor_split for c in configs} == {(3.0, 1.0), (1.0, 1.0)}
    assert {c.flash_attn for c in configs} == {"on", "off", "auto"}
    assert all(c.type_v == "f16" and c.cpu_mask == "0x3" and c.cpu_strict and c.poll == 0 and c.prio == 1
               for c in configs)
    # Model-major: each model-level key occupies one contiguous run of jobs, so a worker
    # loads each once; context-level settings (KV types, flash attention) vary inside a run.
    keys = [c.model_level() for c in configs]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(keys)) == 2 * 2 * 2 * 2 * 2


def test_a_value_listed_twice_runs_once():
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_prompt=[8], n_gen=[], type_k=["q8_0", "Q8_0"],
                     flash_attn=[True, "on"])
    assert spec.type_k == ["q8_0"] and spec.flash_attn == ["on"]
    assert len(plan(spec)) == 1


@pytest.mark.parametrize("line, words", [
    ("type_k: [q9_0]", ["field 'type_k'", "unknown KV cache type 'q9_0'", "q8_0"]),
    ("type_v: [f16, nope]", ["field 'type_v'", "'nope'"]),
    ("split_mode: [diagonal]", ["field 'split_mode'", "'diagonal'"]),
    ("tensor_split: ['3/x']", ["field 'tensor_split'", "3/1"]),
    ("tensor_split: [[0, 0]]", ["field 'tensor_split'", "at least one above 0"]),
    ("poll: [101]", ["field 'poll'", "100"]),
    ("tensor_split: ['" + "/".join(["1"] * 17) + "']", ["field 'tensor_split'", "at most 16 devices", "one share per GPU"]),
    ("n_cpu_moe: [-1]", ["field 'n_cpu_moe'", "0"]),
])
def test_a_bad_engine_value_is_one_line_naming_the_field(tmp_path, line, words):
    p = write(tmp_path, f"name: x\nmodels: [smollm2-135m]\n{line}\n")
    with pytest.raises(SweepError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_a_quantized_v_cache_without_flash_attention_is_refused():
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_prompt=[8], n_gen=[], type_v=["f16", "q8_0"],
                     flash_attn=["on", "off"])
    with pytest.raises(SweepError, match="type_v q8_0 needs flash attention.*flash_attn: \\[on\\]"):
        plan(spec)
    assert len(plan(spec.model_copy(update={"flash_attn": ["on", "auto"]}))) == 4
