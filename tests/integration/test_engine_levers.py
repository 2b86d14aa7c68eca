"""Each llama-bench lever reaches llama.cpp: read back from the loaded context or the model's buffers.

Real SmolLM2 (Q8_0, derived) and the upcycled 8-expert MoE through llama-cpp-python; CPU build,
so where a lever moves memory between device and host, what is read back is which buffer type
the tensors land in and llama.cpp's own buffer sizes.
"""

from __future__ import annotations

import pytest

from farm.contract import EngineConfig
from tests.integration.conftest import MODELS_DIR
from worker.engines import EngineError
from worker.engines.llamacpp import LlamaCppBackend, default_n_threads
from worker.models import resolve
from worker.tasks import LoadedModel

N_CTX = 256


@pytest.fixture(scope="module")
def q8_path(smollm2):
    return resolve("smollm2-135m", "Q8_0", MODELS_DIR)[0]


@pytest.fixture(scope="module")
def moe_path(smollm2):
    return resolve("smollm2-135m-moe8x2", "Q8_0", MODELS_DIR)[0]


@pytest.fixture(scope="module")
def smol(q8_path):
    backend = LlamaCppBackend()
    backend.load_model(q8_path, EngineConfig(n_threads=1))
    yield backend
    backend.close()


def kv_after(backend: LlamaCppBackend, config: EngineConfig, n_tokens: int = 64) -> tuple[dict, int]:
    backend.new_context(config, N_CTX)
    backend.prefill(list(range(10, 10 + n_tokens)))
    return backend.conditions(), backend.state_size()


def test_kv_types_change_the_kv_cache_bytes(smol):
    sizes = {}
    for kv in ("f32", "f16", "q8_0", "q4_0"):
        cond, state = kv_after(smol, EngineConfig(n_threads=1, type_k=kv, type_v=kv, flash_attn="on"))
        assert cond["flags"]["type_k"] == cond["flags"]["type_v"] == kv == cond["kv_type"]
        sizes[kv] = (cond["kv_bytes"], state)
    # ggml's bytes per element: f32 4, f16 2, q8_0 34/32, q4_0 18/32; the KV buffer scales with them
    # (to llama.cpp's printed 0.01 MiB) and so does the saved state of 64 cached tokens.
    for kv, per_elem in (("f32", 4), ("q8_0", 34 / 32), ("q4_0", 18 / 32)):
        assert sizes[kv][0] / sizes["f16"][0] == pytest.approx(per_elem / 2, rel=0.01)
    assert sizes["f32"][1] > sizes["f16"][1] > sizes["q8_0"][1] > sizes["q4_0"][1]


def test_k_and_v_types_are_set_apart(smol):
    cond, _ = kv_after(smol, EngineConfig(n_threads=1, type_k="q8_0", type_v="f16"))
    assert (cond["flags"]["type_k"], cond["flags"]["type_v"], cond["kv_type"]) == ("q8_0", "f16", "q8_0/f16")
    assert cond["flags"]["kv_k_bytes"] < cond["flags"]["kv_v_bytes"]


def test_threads_batches_and_context_are_read_back(smol):
    cond, _ = kv_after(smol, EngineConfig(n_threads=1, n_batch=128, n_ubatch=32))
    assert cond["n_threads"] == 1
    assert (cond["flags"]["n_batch"], cond["flags"]["n_ubatch"], cond["flags"]["n_ctx"]) == (128, 32, N_CTX)
    cond, _ = kv_after(smol, EngineConfig(n_threads=2, n_batch=64, n_ubatch=64))
    # Capped at the cores this process may run on (one under the test suite's core pinning), the
    # request kept beside.
    n_cores = default_n_threads()
    assert cond["n_threads"] == min(2, n_cores) and cond["flags"]["n_ubatch"] == 64
    if n_cores < 2:
        assert cond["flags"]["n_threads_asked"] == 2


def test_flash_attention_is_what_the_reserved_graph_uses(smol):
    seen = {}
    for fa in ("off", "on", "auto"):
        cond, _ = kv_after(smol, EngineConfig(n_threads=1, flash_attn=fa))
        assert cond["flags"]["flash_attn"] == fa
        seen[fa] = cond["flags"]["flash_attn_used"]
    # auto: llama.cpp's own choice, which on a CPU build that has the fused op is on.
    assert seen == {"off": False, "on": True, "auto": True}


def test_levers_keep_greedy_tokens_where_they_should(smol):
    """A context-level change that is exact (threads, batch size, threadpool) keeps the greedy tokens."""
    def tokens(config):
        smol.new_context(config, N_CTX)
        t = [smol.prefill(list(range(10, 60)))]
        for _ in range(8):
            t.append(smol.decode(t[-1]))
        return t
    base = tokens(EngineConfig(n_threads=1))
    assert tokens(EngineConfig(n_threads=1, cpu_mask="0x1", cpu_strict=True, poll=0)) == base
    assert smol.conditions()["flags"]["threadpool"] is True
    assert smol.conditions()["flags"]["cpu_mask"] == "0x1"


def test_no_kv_offload_and_mmap_are_recorded(q8_path):
    backend = LlamaCppBackend()
    try:
        backend.load(q8_path, EngineConfig(n_threads=1, use_mmap=False, no_kv_offload=True), N_CTX)
        cond = backend.conditions()
        # mmap off: the weights are read into a plain CPU buffer instead of the mapped file.
        assert "weights_CPU_Mapped_bytes" not in cond["flags"] and cond["flags"]["use_mmap"] is False
        assert cond["flags"]["no_kv_offload"] is True
        backend.close()
        backend.load(q8_path, EngineConfig(n_threads=1), N_CTX)
        assert backend.conditions()["flags"]["weights_CPU_Mapped_bytes"] > 0
    finally:
        backend.close()


def test_n_cpu_moe_moves_expert_tensors_to_the_cpu_buffer(moe_path):
    backend = LlamaCppBackend()
    placed = {}
    try:
        for n in (0, 4, 8):
            backend.load(moe_path, EngineConfig(n_threads=1, n_cpu_moe=n), N_CTX)
            cond = backend.conditions()
            placed[n] = (cond["flags"]["n_tensors_overridden"], cond["flags"]["overridden_bytes"],
                         cond["weights_host_bytes"] + cond["weights_device_bytes"])
            backend.close()
    finally:
        backend.close()
    # Three expert tensors (up, down, gate) per layer go to the CPU buffer type llama.cpp's
    # --n-cpu-moe asks for: bytes proportional to the layers kept on the host, the model's total
    # unchanged (a CPU build has no device to take them from).
    assert [placed[n][0] for n in (0, 4, 8)] == [0, 12, 24]
    assert placed[0][1] == 0 and placed[8][1] == 2 * placed[4][1] > 0
    assert placed[0][2] == placed[4][2] == placed[8][2]


def test_override_tensors_moves_the_named_tensors(q8_path):
    backend = LlamaCppBackend()
    try:
        backend.load(q8_path, EngineConfig(n_threads=1, override_tensors=r"token_embd\.weight=CPU"), N_CTX)
        assert backend.conditions()["flags"]["n_tensors_overridden"] == 1
        with pytest.raises(EngineError, match="matched no tensor"):
            backend.load(q8_path, EngineConfig(n_threads=1, override_tensors="nothing_like_this=CPU"), N_CTX)
        with pytest.raises(EngineError, match="buffer type 'VULKAN9'"):
            backend.load(q8_path, EngineConfig(n_threads=1, override_tensors="token_embd=VULKAN9"), N_CTX)
    finally:
        backend.close()


def test_a_kept_model_gets_a_new_context_for_context_level_changes(q8_path):
    loaded = LoadedModel()
    try:
        b1, load_ns, ctx_ns, reused = loaded.acquire_timed("llamacpp", q8_path, "x", EngineConfig(n_threads=1), N_CTX)
        assert load_ns > 0 and ctx_ns > 0 and not reused
        model = b1._model
        # KV type and threads are context-level: the same weights, a new context.
        b2, load_ns, ctx_ns, reused = loaded.acquire_timed(
            "llamacpp", q8_path, "x", EngineConfig(n_threads=2, type_k="q8_0"), N_CTX)
        assert b2 is b1 and b2._model == model and reused and load_ns == 0 and ctx_ns > 0
        assert b2.conditions()["flags"]["type_k"] == "q8_0"
        # The same config again: nothing made at all.
        _, load_ns, ctx_ns, reused = loaded.acquire_timed(
            "llamacpp", q8_path, "x", EngineConfig(n_threads=2, type_k="q8_0"), N_CTX)
        assert (load_ns, ctx_ns, reused) == (0, 0, True)
        # use_mmap is model-level: loaded again.
        b3, load_ns, _, reused = loaded.acquire_timed(
            "llamacpp", q8_path, "x", EngineConfig(n_threads=2, use_mmap=False), N_CTX)
        assert load_ns > 0 and not reused
    finally:
        loaded.drop()


def test_the_torch_engine_refuses_llama_cpp_levers(q8_path):
    from worker.engines import create_backend

    backend = create_backend("torch")
    with pytest.raises(EngineError, match="torch engine has no type_k, n_cpu_moe"):
        backend.load(q8_path, EngineConfig(type_k="q8_0", n_cpu_moe=2), N_CTX)


def test_an_override_pattern_that_matches_no_tensor_is_refused_at_submit(q8_path):
    from orchestrator.planning import plan
    from orchestrator.sweep import SweepError, SweepSpec

    spec = SweepSpec(name="t", models=[{"name": "smollm2-135m", "quants": ["Q8_0"]}], n_prompt=[8], n_gen=[],
                     override_tensors=["ffn_(up|down)_exps=CPU"])
    with pytest.raises(SweepError) as e:
        plan(spec, models_dir=MODELS_DIR)
    assert "matches no tensor" in str(e.value) and "fix the pattern" in str(e.value) and "\n" not in str(e.value)
    ok = spec.model_copy(update={"override_tensors": [r"blk\.1\.ffn_down=CPU"]})
    assert len(plan(ok, models_dir=MODELS_DIR)) == 1


def test_n_cpu_moe_patterns_and_cpu_masks_read_as_llama_cpp_reads_them():
    import re

    from worker.engines.llamacpp_levers import n_cpu_moe_patterns, parse_cpu_mask

    patterns = n_cpu_moe_patterns(2)
    names = ["blk.0.ffn_up_exps.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight",
             "blk.10.ffn_up_exps.weight", "blk.2.ffn_up_exps.weight", "blk.0.ffn_up.weight", "blk.0.attn_q.weight"]
    matched = [n for n in names if any(re.search(p, n) for p in patterns)]
    # Layers 0 and 1 only: "blk\.1\." must not catch layer 10, and dense FFNs stay where they are.
    assert matched == names[:3]
    mask = parse_cpu_mask("0x5")
    assert mask[:4] == [True, False, True, False] and sum(mask) == 2
    with pytest.raises(EngineError, match="not hexadecimal"):
        parse_cpu_mask("0xZZ")
