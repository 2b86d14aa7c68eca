"""The memory estimate's arithmetic and the memory classes jobs are matched to workers by."""

import pytest

from farm.contract import Capabilities, EngineConfig, Job
from farm.memory import (
    CLASSES_GB,
    GIB,
    MARGIN,
    RUNTIME_BYTES,
    TIERS_GB,
    class_gb,
    context_size,
    estimate_need_bytes,
    fits,
    kv_bytes_per_token,
    memory_kind,
    scaled_to_quant,
    served_classes_gb,
    upcycled,
)
from farm.modelfiles import CATALOGUE
from orchestrator.dispatch import unfit_jobs
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec

SMOL = CATALOGUE["smollm2-135m"].facts()


def job(**kw) -> Job:
    base = dict(job_id="j", sweep_id="s", index=0, model="smollm2-135m", quant="Q4_1", kind="pp", n_prompt=512)
    return Job(**{**base, **kw})


def test_the_leaderboard_tiers_are_among_the_routing_classes():
    from orchestrator.ranking import TIERS_GB as ranking_tiers

    assert ranking_tiers is TIERS_GB
    assert set(TIERS_GB) <= set(CLASSES_GB) and list(CLASSES_GB) == sorted(CLASSES_GB)


def test_a_need_goes_to_the_smallest_class_that_holds_it():
    assert class_gb(1) == 1
    assert class_gb(GIB) == 1 and class_gb(GIB + 1) == 2
    assert class_gb(20 * GIB) == 24
    assert class_gb(513 * GIB) is None


def test_a_box_serves_the_classes_at_or_below_what_it_offers_with_nominal_slack():
    rtx4090 = 24564 << 20  # what the card reports: 23.99 GiB
    assert served_classes_gb(rtx4090)[-1] == 24
    assert served_classes_gb(10 * GIB)[-1] == 8  # a 10 GB card cannot take the 12 GB class
    assert served_classes_gb(0) == ()
    assert served_classes_gb(int(15.5 * GIB))[-1] == 16  # a "16 GB" machine's MemTotal


def test_memory_kind_follows_where_the_weights_live():
    assert memory_kind(job()) == "ram"
    assert memory_kind(job(config=EngineConfig(n_gpu_layers=-1))) == "vram"
    assert memory_kind(job(config=EngineConfig(n_gpu_layers=10))) == "vram"
    # The torch engine runs on the CPU as workers create it.
    assert memory_kind(job(engine="torch", config=EngineConfig(n_gpu_layers=-1))) == "ram"


def test_the_estimate_counts_weights_kv_compute_runtime_and_margin():
    j = job(kind="tg", n_prompt=0, n_gen=128, n_depth=4096)
    n_ctx = context_size(j)
    assert n_ctx == 4352
    need = estimate_need_bytes(j, SMOL)
    floor = SMOL.weight_bytes + kv_bytes_per_token(SMOL, 2) * n_ctx
    assert need > floor * (1 + MARGIN) + RUNTIME_BYTES[("ram", "llamacpp")]
    # More context costs at least its KV cache; flash attention saves the attention scores.
    deeper = estimate_need_bytes(job(kind="tg", n_prompt=0, n_gen=128, n_depth=8192), SMOL)
    assert deeper - need >= kv_bytes_per_token(SMOL, 2) * 4096
    fa = estimate_need_bytes(job(kind="tg", n_prompt=0, n_gen=128, n_depth=4096, config=EngineConfig(flash_attn=True)), SMOL)
    assert fa < need


def test_torch_holds_f32_weights_and_cache():
    j = job(engine="torch")
    assert estimate_need_bytes(j, SMOL) > 4 * SMOL.n_params + SMOL.weight_bytes
    assert estimate_need_bytes(j, SMOL) > estimate_need_bytes(job(), SMOL)


def test_a_draft_and_mtp_heads_add_their_memory():
    spec = job(kind="tg", n_prompt=0, n_gen=32, technique="spec", prompt_category="code", n_prompts=2,
               draft_model="smollm2-135m", draft_quant="Q4_0", n_draft=4)
    alone = estimate_need_bytes(spec, SMOL)
    with_draft = estimate_need_bytes(spec, SMOL, scaled_to_quant(SMOL, "Q4_0"))
    assert with_draft - alone > scaled_to_quant(SMOL, "Q4_0").weight_bytes
    mtp = dict(kind="tg", n_prompt=0, n_gen=32, technique="mtp", engine="torch", prompt_category="code", n_prompts=2)
    assert estimate_need_bytes(job(**mtp, n_mtp=4), SMOL) > estimate_need_bytes(job(**mtp, n_mtp=1), SMOL)
    # On the MTP build torch drafts with the file's one NextN head at any n_mtp: its tensors are the file's.
    build = SMOL.model_copy(update={"arch": "glm4moe", "n_nextn_layers": 1})
    assert estimate_need_bytes(job(**mtp, n_mtp=4), build) == estimate_need_bytes(job(**mtp, n_mtp=1), build)


def test_partial_offload_needs_part_of_the_vram():
    full = estimate_need_bytes(job(config=EngineConfig(n_gpu_layers=-1)), SMOL)
    half = estimate_need_bytes(job(config=EngineConfig(n_gpu_layers=SMOL.n_layer // 2)), SMOL)
    assert half < full


def test_derived_sizes_scale_with_bits_per_weight():
    assert scaled_to_quant(SMOL, "F32").weight_bytes == 4 * SMOL.n_params
    assert scaled_to_quant(SMOL, "Q2_K").weight_bytes < scaled_to_quant(SMOL, "Q8_0").weight_bytes
    moe = upcycled(SMOL, CATALOGUE["smollm2-135m"].n_ff, 8)
    assert moe.file_type == "F32" and moe.n_params > 4 * SMOL.n_params


def test_expand_estimates_every_job_without_the_model_file():
    jobs = plan(SweepSpec(name="n", models=["smollm2-135m"],
                            quants=["Q4_1", "F32"], n_prompt=[512], n_gen=[], n_depth=[0, 8192]))
    assert all(j.need_bytes > 0 for j in jobs)
    by = {(j.quant, j.n_depth): j.need_bytes for j in jobs}
    assert by[("F32", 0)] > by[("Q4_1", 0)] and by[("Q4_1", 8192)] > by[("Q4_1", 0)]


def caps(ram_gb: float = 0, vram_gb: float = 0, engines=("llamacpp",)) -> Capabilities:
    return Capabilities(engines=list(engines), offered_ram_bytes=int(ram_gb * GIB), offered_vram_bytes=int(vram_gb * GIB))


def test_unfit_jobs_name_the_need_and_the_largest_worker():
    workers = {"tiny": caps(ram_gb=1), "roomy": caps(ram_gb=4)}
    small, big = job(need_bytes=GIB // 2), job(need_bytes=6 * GIB, quant="F32", n_prompt=64)
    gpu = job(need_bytes=GIB // 2, config=EngineConfig(n_gpu_layers=-1))
    torch_job = job(need_bytes=GIB // 2, engine="torch")
    unfit = unfit_jobs([small, big, gpu, torch_job], workers)
    assert [u.job for u in unfit] == [big, gpu, torch_job]
    text = [u.describe() for u in unfit]
    assert text[0].startswith("smollm2-135m F32 pp64") and "needs 6.00 GiB of RAM" in text[0]
    assert "roomy, offers 4.00 GiB" in text[0]
    assert "has a GPU" in text[1]
    assert "no worker runs the torch engine" in text[2]
    # With no worker known every job is unfit: the CLI warns and submits instead of asking.
    assert [u.job for u in unfit_jobs([small], {})] == [small]


def test_a_job_never_estimated_fits_any_worker_with_its_engine():
    assert fits(caps(ram_gb=0.5), job())
    assert not fits(caps(ram_gb=64, engines=("torch",)), job())


@pytest.mark.parametrize("quant", ["Q4_1", "Q8_0", "F32"])
def test_catalogue_facts_carry_a_shape(quant):
    f = scaled_to_quant(SMOL, quant) if quant != SMOL.file_type else SMOL
    assert f.n_layer and f.n_kv_head and f.kv_bytes_per_token and f.n_vocab and f.weight_bytes


# --- issue 17: the estimate split by where llama.cpp places each allocation ---------------------

def big_moe():
    """A 35B-A3B-like MoE in Q4_K_M: 48 layers, 128 experts, 8 used (the 2026 home-lab case)."""
    return SMOL.model_copy(update={
        "n_layer": 48, "n_expert": 128, "n_expert_used": 8, "weight_bytes": 20 * GIB, "active_bytes": int(2.2 * GIB),
        "kv_bytes_per_token": 48 * 2 * 4 * 128 * 2, "n_embd": 2048, "n_head": 32, "n_vocab": 151_000,
    })


def test_the_kv_cache_scales_with_its_element_types():
    from farm.memory import KV_BYTES_PER_ELEMENT, kv_cache_bytes

    f16 = kv_cache_bytes(SMOL, "f16", "f16", 4096)
    assert f16 == kv_bytes_per_token(SMOL, 2) * 4096
    assert kv_cache_bytes(SMOL, "q8_0", "q8_0", 4096) == pytest.approx(f16 * 34 / 64, rel=1e-6)
    assert kv_cache_bytes(SMOL, "q8_0", "f16", 4096) == pytest.approx(f16 * (34 / 32 + 2) / 4, rel=1e-6)
    assert set(KV_BYTES_PER_ELEMENT) == set(__import__("farm.contract").contract.KV_TYPES)


def test_a_q8_0_kv_cache_lowers_the_need_at_a_long_context():
    long = dict(kind="tg", n_prompt=0, n_gen=128, n_depth=32768)
    f16 = estimate_need_bytes(job(**long, config=EngineConfig(n_gpu_layers=-1, flash_attn="on")), SMOL)
    q8 = estimate_need_bytes(job(**long, config=EngineConfig(n_gpu_layers=-1, flash_attn="on", type_k="q8_0",
                                                             type_v="q8_0")), SMOL)
    saved = kv_bytes_per_token(SMOL, 2) * context_size(job(**long)) * (1 - 34 / 64)
    assert f16 - q8 == pytest.approx(saved * (1 + MARGIN), rel=0.01)


def test_n_cpu_moe_moves_expert_bytes_from_the_device_to_the_host():
    from farm.memory import expert_bytes_per_layer, llamacpp_placement

    moe = big_moe()
    per_layer = expert_bytes_per_layer(moe)
    # (all - active) * 128 / 120 over 48 layers
    assert per_layer == int((20 - 2.2) * GIB * 128 / 120 / 48)
    full = llamacpp_placement(job(config=EngineConfig(n_gpu_layers=-1)), moe, 4096)
    half = llamacpp_placement(job(config=EngineConfig(n_gpu_layers=-1, n_cpu_moe=30)), moe, 4096)
    assert full.weights_device_bytes - half.weights_device_bytes == 30 * per_layer
    assert half.weights_host_bytes == 30 * per_layer
    assert full.kv_device_bytes == half.kv_device_bytes and half.kv_host_bytes == 0
    # The 12 GB card of the issue: all of a 20 GiB file does not fit; 30 layers of experts on the host do.
    need_full = estimate_need_bytes(job(config=EngineConfig(n_gpu_layers=-1)), moe)
    need_half = estimate_need_bytes(job(config=EngineConfig(n_gpu_layers=-1, n_cpu_moe=30)), moe)
    assert class_gb(need_full) > 16 and class_gb(need_half) == 12
    # A dense model has no experts to move.
    assert expert_bytes_per_layer(SMOL) == 0


def test_no_kv_offload_keeps_the_cache_on_the_host_and_partial_offload_splits_it():
    from farm.memory import llamacpp_placement

    moe = big_moe()
    off = llamacpp_placement(job(config=EngineConfig(n_gpu_layers=-1, no_kv_offload=True)), moe, 8192)
    assert off.kv_device_bytes == 0 and off.kv_host_bytes > 0
    part = llamacpp_placement(job(config=EngineConfig(n_gpu_layers=12)), moe, 8192)
    assert part.weights_device_bytes == 20 * GIB // 4 and part.kv_device_bytes * 4 == pytest.approx(
        part.kv_device_bytes + part.kv_host_bytes, abs=4)
    # --n-cpu-moe counts from layer 0, offload from the last layer: 12 offloaded layers (36..47) lose
    # nothing to n_cpu_moe 30, and 6 of them lose their experts with n_cpu_moe 42.
    per_layer = __import__("farm.memory").memory.expert_bytes_per_layer(moe)
    assert llamacpp_placement(job(config=EngineConfig(n_gpu_layers=12, n_cpu_moe=30)), moe, 8192) \
        .weights_device_bytes == part.weights_device_bytes
    assert llamacpp_placement(job(config=EngineConfig(n_gpu_layers=12, n_cpu_moe=42)), moe, 8192) \
        .weights_device_bytes == part.weights_device_bytes - 6 * per_layer
    # RAM jobs: everything on the host.
    ram = llamacpp_placement(job(), moe, 8192)
    assert ram.device_bytes == 0 and ram.host_bytes == moe.weight_bytes + ram.kv_host_bytes + ram.compute_bytes


def test_n_cpu_moe_on_a_dense_model_is_refused_at_submit():
    from orchestrator.sweep import SweepError

    with pytest.raises(SweepError) as e:
        plan(SweepSpec(name="t", models=["smollm2-135m"], n_prompt=[8], n_gen=[], n_cpu_moe=[0, 4]))
    assert "dense" in str(e.value) and "drop n_cpu_moe" in str(e.value) and "\n" not in str(e.value)
    jobs = plan(SweepSpec(name="t", models=["smollm2-135m-moe8x2"], n_prompt=[8], n_gen=[], n_cpu_moe=[0, 4],
                          n_gpu_layers=[-1]))
    assert jobs[0].need_bytes > jobs[1].need_bytes
