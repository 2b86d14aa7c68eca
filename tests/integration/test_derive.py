"""Derived models on the real SmolLM2 file: its GGUF accounting, the quant ladder, MoE upcycles through llama.cpp."""

from __future__ import annotations

import json

import gguf
import pytest

from farm.contract import EngineConfig
from farm.modelfiles import QUANT_LADDER, UpcycleConfig, parse_moe_name, read_facts
from tests.integration.conftest import MODELS_DIR
from worker.derive import upcycle
from worker.engines.llamacpp import LlamaCppBackend
from worker.models import quant_ladder, resolve

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def greedy(path, n_gen: int = 16) -> list[int]:
    backend = LlamaCppBackend()
    backend.load(path, EngineConfig(n_threads=2), 256)
    try:
        token = backend.prefill(backend.tokenize(PROMPT))
        out = [token]
        for _ in range(n_gen - 1):
            token = backend.decode(token)
            out.append(token)
        return out
    finally:
        backend.close()


@pytest.fixture(scope="module")
def dense_f32(smollm2):
    return resolve("smollm2-135m", "F32", MODELS_DIR)[0]


def test_smollm2_facts_match_counts_from_its_hyperparameters(smollm2):
    header = gguf.GGUFReader(str(smollm2)).fields
    hp = {k: int(header[f"llama.{k}"].contents()) for k in
          ("block_count", "embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv")}
    n_layer, d, ff = hp["block_count"], hp["embedding_length"], hp["feed_forward_length"]
    head_dim = d // hp["attention.head_count"]
    kv_width = hp["attention.head_count_kv"] * head_dim
    n_vocab = len(header["tokenizer.ggml.tokens"].contents())
    per_layer = 2 * d + 2 * d * d + 2 * d * kv_width + 3 * d * ff
    f = read_facts(smollm2)
    # SmolLM2 ties its output to the input embedding: one matrix, read whole each step.
    assert f.n_params == f.n_params_active == n_vocab * d + d + n_layer * per_layer
    assert f.active_bytes == f.weight_bytes == sum(f.quant_mix_bytes.values())
    assert set(f.quant_mix_bytes) == {"Q4_1", "Q8_0", "F32"}
    assert f.kv_bytes_per_token == 2 * n_layer * kv_width * 2
    assert (f.n_expert, f.n_ctx_train) == (0, 8192)


def test_quant_ladder_is_derived_with_provenance(smollm2):
    ladder = quant_ladder("smollm2-135m", MODELS_DIR)
    assert [q for q, _ in ladder] == list(QUANT_LADDER)
    sizes = []
    for quant, path in ladder:
        facts = read_facts(path)
        assert facts.file_type == quant
        provenance = json.loads(path.with_name(path.name + ".provenance.json").read_text())
        assert provenance["source_quant"] == "Q4_1" and provenance["requantized"] is True
        sizes.append(facts.weight_bytes)
    # Fewer bits per weight, fewer bytes: F32 > F16 > Q8_0 > Q4_K_M > Q4_0 > Q2_K.
    assert sizes == sorted(sizes, reverse=True)


def test_upcycled_copies_with_a_zero_router_reproduce_the_dense_model(dense_f32, tmp_path):
    moe = upcycle(dense_f32, tmp_path / "copy.gguf", UpcycleConfig(n_expert=4, n_expert_used=2))
    facts, parent = read_facts(moe), read_facts(dense_f32)
    assert (facts.n_expert, facts.n_expert_used) == (4, 2)
    ffn = sum(t.n_elements for t in gguf.GGUFReader(str(dense_f32)).tensors if ".ffn_" in t.name and "norm" not in t.name)
    router = parent.n_layer * 4 * parent.n_embd
    assert facts.n_params == parent.n_params + 3 * ffn + router
    assert facts.n_params_active == parent.n_params + ffn + router
    # The tokenizer travelled with the metadata: llama.cpp tokenizes both the same.
    assert greedy(moe) == greedy(dense_f32)


def test_perturbed_experts_and_a_random_router_change_the_output(dense_f32, tmp_path):
    moe = upcycle(dense_f32, tmp_path / "real.gguf",
                  UpcycleConfig(n_expert=4, n_expert_used=2, noise=0.5, router="random", seed=1))
    assert greedy(moe) != greedy(dense_f32)


def test_a_derived_moe_name_resolves_like_a_model(smollm2):
    assert parse_moe_name("gemma3-270m-moe8x2") is not None and parse_moe_name("nothing-moe8x2") is None
    path, source_sha = resolve("smollm2-135m-moe8x2", "F32", MODELS_DIR)
    facts = read_facts(path)
    assert (facts.n_expert, facts.n_expert_used, facts.file_type) == (8, 2, "F32")
    provenance = json.loads(path.with_name(path.name + ".provenance.json").read_text())
    assert provenance["router"] == "random" and provenance["parent"] == "smollm2-135m"
    assert resolve("smollm2-135m-moe8x2", "F32", MODELS_DIR)[0] == path  # cached, not rebuilt
