"""A sweep's `quality: true`: one quality pass per model x quant x engine x config, its reference chosen at submit."""

from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec, load_spec, reference_quant


def test_one_quality_job_per_quant_and_engine_on_a_baseline_text_test():
    spec = SweepSpec(name="q", models=[{"name": "smollm2-135m", "quants": ["F32", "Q8_0", "Q4_0"]}],
                     engines=["llamacpp", "torch"], n_prompt=[16], n_gen=[8], n_pg=[(16, 8)], n_depth=[0, 32],
                     quality=True, quality_n_ctx=256, quality_n_chunks=2)
    jobs = plan(spec, sweep_id="s")
    marked = [j for j in jobs if j.quality]
    assert len(marked) == 3 * 2
    assert {(j.quant, j.engine) for j in marked} == {(q, e) for q in ("F32", "Q8_0", "Q4_0") for e in ("llamacpp", "torch")}
    assert all(j.test == "pp16" and j.quality_n_ctx == 256 and j.quality_n_chunks == 2 for j in marked)
    # SmolLM2's catalogue file is Q4_1: its reference is the F32 llama.cpp derives from it.
    assert {j.quality_reference_quant for j in marked} == {"F32"}
    assert all(not j.quality and j.quality_reference_quant == "" for j in jobs if j not in marked)


def test_technique_jobs_never_carry_the_pass():
    spec = SweepSpec(name="q", models=["smollm2-135m"], techniques=["baseline", "lookup"], prompt_categories=["code"],
                     n_prompt=[], n_gen=[8], quality=True)
    jobs = plan(spec, sweep_id="s")
    assert jobs and not any(j.quality for j in jobs)  # every baseline tg job here decodes prompts too


def test_without_quality_no_job_carries_it():
    jobs = plan(SweepSpec(name="q", models=["smollm2-135m"], n_prompt=[16], n_gen=[8]), sweep_id="s")
    assert not any(j.quality for j in jobs)


def test_reference_is_the_models_own_full_precision_file_else_f32():
    assert reference_quant("F16") == "F16" and reference_quant("BF16") == "BF16" and reference_quant("F32") == "F32"
    assert reference_quant("Q4_1") == "F32" and reference_quant("Q4_K_M") == "F32"
    # An upcycled MoE is written F32: it is its own reference, not its parent.
    moe = [j for j in plan(SweepSpec(name="q", models=[{"name": "smollm2-135m-moe8x2", "quants": ["Q8_0"]}],
                                     n_prompt=[16], n_gen=[], quality=True), sweep_id="s") if j.quality]
    assert len(moe) == 1 and moe[0].model == "smollm2-135m-moe8x2" and moe[0].quality_reference_quant == "F32"


def test_the_ladder_example_asks_for_quality():
    spec = load_spec("examples/ladder.yaml")
    assert spec.quality
    assert sum(j.quality for j in plan(spec, sweep_id="s")) == sum(len(e.quants) for e in spec.entries())


def test_a_quality_job_needs_room_for_its_reference_beside_it():
    from farm.memory import job_need_bytes

    job = next(j for j in plan(SweepSpec(name="q", models=[{"name": "smollm2-135m", "quants": ["Q4_0"]}],
                                         n_prompt=[16], n_gen=[], quality=True), sweep_id="s"))
    plain = job.model_copy(update={"quality": False, "quality_reference_quant": ""})
    f32 = job.model_copy(update={"quant": "F32"})
    # The F32 reference of SmolLM2 is ~540 MB: a Q4_0 quality job holds it beside its own file;
    # the F32 job is its own reference and adds only the pass's logits.
    extra_q4 = job_need_bytes(job, None) - job_need_bytes(plain, None)
    extra_f32 = job_need_bytes(f32, None) - job_need_bytes(f32.model_copy(update={"quality": False}), None)
    assert extra_f32 > 4 * 512 * 49152 and extra_q4 - extra_f32 > 500e6
