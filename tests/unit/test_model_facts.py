"""GGUF accounting on a small synthetic MoE file written here, and refusal of broken files."""

from pathlib import Path

import gguf
import numpy as np
import pytest

from farm.modelfiles import ModelError, read_facts

# Shapes of the synthetic model, in numpy order (rows, cols); ggml order is the reverse.
N_LAYER, N_EMBD, N_HEAD, N_KV_HEAD, N_FF, N_VOCAB, N_EXPERT, N_USED = 2, 64, 4, 2, 96, 40, 4, 2
HEAD_DIM = N_EMBD // N_HEAD


def synthetic_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = {"token_embd.weight": rng.standard_normal((N_VOCAB, N_EMBD)),
         "output.weight": rng.standard_normal((N_VOCAB, N_EMBD)),
         "output_norm.weight": np.ones(N_EMBD)}
    for i in range(N_LAYER):
        t[f"blk.{i}.attn_norm.weight"] = np.ones(N_EMBD)
        t[f"blk.{i}.attn_q.weight"] = rng.standard_normal((N_EMBD, N_EMBD))
        t[f"blk.{i}.attn_k.weight"] = rng.standard_normal((N_KV_HEAD * HEAD_DIM, N_EMBD))
        t[f"blk.{i}.attn_v.weight"] = rng.standard_normal((N_KV_HEAD * HEAD_DIM, N_EMBD))
        t[f"blk.{i}.attn_output.weight"] = rng.standard_normal((N_EMBD, N_EMBD))
        t[f"blk.{i}.ffn_norm.weight"] = np.ones(N_EMBD)
        t[f"blk.{i}.ffn_gate_inp.weight"] = rng.standard_normal((N_EXPERT, N_EMBD))
        t[f"blk.{i}.ffn_gate_exps.weight"] = rng.standard_normal((N_EXPERT, N_FF, N_EMBD))
        t[f"blk.{i}.ffn_up_exps.weight"] = rng.standard_normal((N_EXPERT, N_FF, N_EMBD))
        t[f"blk.{i}.ffn_down_exps.weight"] = rng.standard_normal((N_EXPERT, N_EMBD, N_FF))
        t[f"blk.{i}.ffn_up_shexp.weight"] = rng.standard_normal((N_FF, N_EMBD))
    return {k: v.astype(np.float32) for k, v in t.items()}


# Stored as Q8_0 (34 bytes per block of 32), the rest F32: a mix like llama.cpp's fallbacks.
Q8_TENSORS = {f"blk.{i}.attn_q.weight" for i in range(N_LAYER)}


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-moe.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(1024)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_expert_count(N_EXPERT)
    w.add_expert_used_count(N_USED)
    w.add_vocab_size(N_VOCAB)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, array in synthetic_tensors().items():
        if name in Q8_TENSORS:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_shape_facts_come_from_the_header(moe_gguf):
    f = read_facts(moe_gguf)
    assert (f.arch, f.n_layer, f.n_embd, f.n_head, f.n_kv_head, f.head_dim, f.n_ctx_train, f.n_vocab) == \
        ("llama", N_LAYER, N_EMBD, N_HEAD, N_KV_HEAD, HEAD_DIM, 1024, N_VOCAB)
    assert (f.n_expert, f.n_expert_used) == (N_EXPERT, N_USED)
    assert f.size_bytes == moe_gguf.stat().st_size


def test_total_and_active_parameters_match_the_construction(moe_gguf):
    per_layer_attn = N_EMBD * N_EMBD * 2 + 2 * N_KV_HEAD * HEAD_DIM * N_EMBD + 2 * N_EMBD
    per_expert = 3 * N_EMBD * N_FF
    router, shared = N_EXPERT * N_EMBD, N_FF * N_EMBD
    outside = 2 * N_VOCAB * N_EMBD + N_EMBD
    f = read_facts(moe_gguf)
    assert f.n_params == outside + N_LAYER * (per_layer_attn + N_EXPERT * per_expert + router + shared)
    assert f.n_params_active == outside + N_LAYER * (per_layer_attn + N_USED * per_expert + router + shared)


def test_bytes_per_type_active_bytes_and_kv_cache(moe_gguf):
    f = read_facts(moe_gguf)
    q8_bytes = N_LAYER * N_EMBD * N_EMBD // 32 * 34
    f32_elements = sum(a.size for n, a in synthetic_tensors().items() if n not in Q8_TENSORS)
    assert f.quant_mix_bytes == {"F32": f32_elements * 4, "Q8_0": q8_bytes}
    expert_bytes = N_LAYER * 3 * N_EXPERT * N_EMBD * N_FF * 4
    # A decode step reads one row of the input embedding (the output matrix is separate), the
    # routed experts' share of the expert tensors, and everything else in full.
    one_embd_row = N_EMBD * 4
    expected = (f32_elements * 4 + q8_bytes) - expert_bytes * (N_EXPERT - N_USED) // N_EXPERT \
        - N_VOCAB * N_EMBD * 4 + one_embd_row
    assert f.active_bytes == expected
    assert f.kv_bytes_per_token == 2 * N_LAYER * N_KV_HEAD * HEAD_DIM * 2


def test_a_truncated_gguf_is_refused_with_a_clear_error(moe_gguf, tmp_path):
    data = moe_gguf.read_bytes()
    for cut in (len(data) - 100, 2000, 40):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="truncated"):
            read_facts(broken)


def test_a_wrong_magic_is_refused_naming_the_fix(moe_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + moe_gguf.read_bytes()[4:])
    with pytest.raises(ModelError, match="not a GGUF file.*convert"):
        read_facts(bad)
