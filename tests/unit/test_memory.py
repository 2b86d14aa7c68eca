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
