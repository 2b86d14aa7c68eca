"""Equivalences of the torch decoder on small random-weight models: no files, seconds to run."""

from __future__ import annotations

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")

from worker.engines.torch.kv_cache import KVCache  # noqa: E402
from worker.engines.torch.model import (  # noqa: E402
    FeedForward,
    ModelConfig,
    MoE,
    Transformer,
    apply_rope,
)

DENSE = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_ff=96, n_vocab=101, rope_base=10000.0)
MOE = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_ff=48, n_vocab=101, n_expert=4, n_expert_used=2)


def random_model(config: ModelConfig, seed: int = 0, tied: bool = False) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config, tied_output=tied)
    with torch.no_grad():
        for p in model.parameters():
            # Weights big enough that attention is far from uniform and routing far from ties.
            p.normal_(0.0, 0.3)
    return model.eval()


def tokens(n: int, n_vocab: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_vocab, (batch, n), generator=g)


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
@torch.inference_mode()
def test_cached_decode_equals_full_forward(config):
    model = random_model(config)
    ids = tokens(12, config.n_vocab, batch=2)  # (B, T)
    full_logits, full_hidden = model(ids)  # (B, T, V), (B, T, E)

    cache = model.new_cache(n_ctx=16, n_batch=2)
    n_prompt = 5
    logits, hidden = model(ids[:, :n_prompt], 0, cache)
    step_logits, step_hidden = [logits], [hidden]
    for pos in range(n_prompt, ids.shape[1]):
        logits, hidden = model(ids[:, pos:pos + 1], pos, cache)  # (B, 1, V)
        step_logits.append(logits)
        step_hidden.append(hidden)

    torch.testing.assert_close(torch.cat(step_logits, 1), full_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(step_hidden, 1), full_hidden, atol=1e-4, rtol=1e-4)
    # Greedy tokens are what the engines are compared on.
    assert torch.equal(torch.cat(step_logits, 1).argmax(-1), full_logits.argmax(-1))


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
@torch.inference_mode()
def test_a_few_rows_score_each_row_as_it_scores_alone(config):
    """A verification pass multiplies 1 + n_draft rows at once; greedy speculative decoding is
    compared with plain decoding, so a row's logits within a pass must match a lone row's."""
    model = random_model(config)
    ids = tokens(12, config.n_vocab, batch=2)
    for start, T in ((0, 9), (9, 1), (10, 2)):
        a, b = model.new_cache(16, 2), model.new_cache(16, 2)
        if start:
            model(ids[:, :start], 0, a)
            model(ids[:, :start], 0, b)
        whole, _ = model(ids[:, start:start + T], start, a)
        alone = torch.cat([model(ids[:, p:p + 1], p, b)[0] for p in range(start, start + T)], 1)
        torch.testing.assert_close(whole, alone, atol=1e-4, rtol=1e-4)
    x = torch.randn(4, config.n_embd)
    torch.testing.assert_close(model.output(x)[:1], model.output(x[:1]), atol=1e-5, rtol=1e-5)


def test_the_engine_uses_no_private_torch_ops():
    """Issue 12: the CPU path calls public APIs only (no torch.ops.mkldnn, no module globals)."""
    import inspect

    from worker.engines.torch import backend, mtp
    from worker.engines.torch import model as m

    for module in (m, backend, mtp):
        source = inspect.getsource(module)
        assert "torch.ops." not in source and "global " not in source, module.__name__


@torch.inference_mode()
def test_chunked_prefill_with_last_logits_equals_full_forward():
    model = random_model(DENSE)
    ids = tokens(10, DENSE.n_vocab)
    full_logits, _ = model(ids)
    cache = model.new_cache(n_ctx=10)
    for start in (0, 4, 7):  # uneven chunks: 4, 3, 3 tokens, as a verifier would send drafts
        end = {0: 4, 4: 7, 7: 10}[start]
        logits, _ = model(ids[:, start:end], start, cache, all_logits=False)
        assert logits.shape == (1, 1, DENSE.n_vocab)
        torch.testing.assert_close(logits[:, 0], full_logits[:, end - 1], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_rewriting_cache_positions_forgets_the_old_tokens():
    # A speculative verifier rewinds by writing over rejected positions.
    model = random_model(DENSE)
    ids = tokens(8, DENSE.n_vocab)
    other = tokens(3, DENSE.n_vocab, seed=7)
    cache = model.new_cache(n_ctx=8)
    model(ids[:, :5], 0, cache)
    model(other, 5, cache)  # rejected draft
    logits, _ = model(ids[:, 5:], 5, cache)
    torch.testing.assert_close(logits, model(ids)[0][:, 5:], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_moe_of_identical_experts_and_zero_router_equals_the_ffn():
    torch.manual_seed(0)
    n_embd, n_ff = 32, 48
    ffn = FeedForward(n_embd, n_ff)
    moe = MoE(n_embd, n_ff, n_expert=4, n_expert_used=2)
    moe.router.weight.zero_()  # every expert scores the same: weights 1/K each
    for e in range(4):
        moe.w_gate[e] = ffn.w_gate.weight
        moe.w_up[e] = ffn.w_up.weight
        moe.w_down[e] = ffn.w_down.weight
    x = torch.randn(2, 7, n_embd)  # (B, T, E)
    torch.testing.assert_close(moe(x), ffn(x), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_moe_dispatch_equals_dense_top_k_mixture():
    torch.manual_seed(3)
    n_embd, n_ff, n_expert, k = 16, 24, 6, 2
    moe = MoE(n_embd, n_ff, n_expert, k)
    for p in moe.parameters():
        p.normal_(0.0, 0.5)
    x = torch.randn(11, n_embd)  # (N, E)

    # Reference: every expert on every token, zero weight outside each token's top k.
    logits = moe.router(x)  # (N, X)
    top = logits.topk(k, dim=-1)
    weight = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, -1))  # (N, X)
    per_expert = torch.stack(
        [(torch.nn.functional.silu(x @ moe.w_gate[e].T) * (x @ moe.w_up[e].T)) @ moe.w_down[e].T for e in range(n_expert)],
        dim=1,
    )  # (N, X, E)
    expected = (weight[:, :, None] * per_expert).sum(1)
    torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_moe_runs_only_the_chosen_experts():
    torch.manual_seed(4)
    moe = MoE(8, 8, n_expert=8, n_expert_used=2)
    for p in moe.parameters():
        p.normal_()
    x = torch.randn(1, 8)
    chosen = set(moe.router(x).topk(2).indices[0].tolist())
    with torch.no_grad():
        for e in set(range(8)) - chosen:
            moe.w_gate[e] = float("nan")  # any use of an unchosen expert would poison the output
    assert torch.isfinite(moe(x)).all()


@torch.inference_mode()
def test_gqa_shapes_and_equivalence_to_repeated_heads():
    model = random_model(DENSE)
    attn = model.blocks[0].attn
    D = DENSE.head_dim
    assert D == 16
    assert attn.wq.weight.shape == (DENSE.n_head * D, DENSE.n_embd)
    assert attn.wk.weight.shape == (DENSE.n_kv_head * D, DENSE.n_embd)
    assert attn.wv.weight.shape == (DENSE.n_kv_head * D, DENSE.n_embd)
    cache = model.new_cache(n_ctx=9, n_batch=3)
    assert cache.k.shape == (DENSE.n_layer, 3, DENSE.n_kv_head, 9, D)  # (L, B, H_kv, S, D)

    # The same model with every kv head copied for each query head of its group (plain MHA)
    # must compute the same thing: query head h reads kv head h // (n_head / n_kv_head).
    mha = Transformer(ModelConfig(**{**DENSE.__dict__, "n_kv_head": DENSE.n_head}))
    state = model.state_dict()
    group = DENSE.n_head // DENSE.n_kv_head
    for name, w in list(state.items()):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            state[name] = w.view(DENSE.n_kv_head, D, -1).repeat_interleave(group, dim=0).reshape(DENSE.n_head * D, -1)
    mha.load_state_dict(state)
    ids = tokens(6, DENSE.n_vocab)
    torch.testing.assert_close(mha.eval()(ids)[0], model(ids)[0], atol=1e-4, rtol=1e-4)


def test_rope_rotates_adjacent_pairs():
    # llama.cpp's LLAMA_ROPE_TYPE_NORM: dims (0, 1) are one pair, (2, 3) the next. HF's
    # rotate_half would pair (0, 2) and move x[0] into dim 2 instead of dim 1.
    angle = torch.tensor([[0.5, 0.25]])  # (T, D / 2)
    x = torch.eye(4).view(4, 1, 1, 4)  # four (B=1, T=1, H=1, D=4) unit vectors, batched as B
    y = apply_rope(x, angle.cos(), angle.sin())[:, 0, 0]  # (4, D)
    c0, s0, c1, s1 = math.cos(0.5), math.sin(0.5), math.cos(0.25), math.sin(0.25)
    expected = torch.tensor([
        [c0, s0, 0.0, 0.0],
        [-s0, c0, 0.0, 0.0],
        [0.0, 0.0, c1, s1],
        [0.0, 0.0, -s1, c1],
    ])
    torch.testing.assert_close(y, expected)


def test_rope_scores_depend_only_on_relative_position():
    config = ModelConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=2, n_ff=8, n_vocab=8)
    model = Transformer(config)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pos_q: int, pos_k: int) -> float:
        cq, sq = model._rope_tables(pos_q, 1)
        ck, sk = model._rope_tables(pos_k, 1)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-4)


def test_partial_rope_leaves_the_other_dims_alone():
    x = torch.randn(1, 3, 2, 8)
    angle = torch.rand(3, 2)  # n_rot 4 of head_dim 8
    y = apply_rope(x, angle.cos(), angle.sin())
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., :4], x[..., :4])


def test_tied_output_shares_the_embedding():
    model = random_model(DENSE, tied=True)
    assert model.output.weight is model.tok_embd.weight


def test_kv_cache_refuses_positions_past_its_end():
    cache = KVCache(n_layer=1, n_kv_head=1, head_dim=2, n_ctx=4)
    kv = torch.ones(1, 1, 3, 2)  # (B, H_kv, T, D)
    k, v = cache.write(0, 1, kv, kv)
    assert k.shape == (1, 1, 4, 2) and k[0, 0, 0].eq(0).all() and k[0, 0, 1:].eq(1).all()
    with pytest.raises(IndexError):
        cache.write(0, 2, kv, kv)


def test_config_rejects_impossible_head_counts():
    with pytest.raises(ValueError):
        ModelConfig(n_layer=1, n_embd=64, n_head=4, n_kv_head=3, n_ff=8, n_vocab=8)
    with pytest.raises(ValueError):
        ModelConfig(n_layer=1, n_embd=64, n_head=4, n_kv_head=4, n_ff=8, n_vocab=8, n_expert=4, n_expert_used=5)


def test_forward_without_cache_must_start_at_zero():
    model = random_model(DENSE)
    with pytest.raises(ValueError):
        model(tokens(2, DENSE.n_vocab), start_pos=3)


@torch.inference_mode()
def test_gguf_round_trip_of_a_tied_moe_model(tmp_path):
    # A Mixtral-style file written with the gguf package: stacked ffn_*_exps experts, a
    # router, no output.weight, and a Q8_0 embedding the loader must dequantize.
    import gguf
    import numpy as np

    from worker.engines.torch.gguf_loader import load_model

    config = MOE
    model = random_model(config, seed=5, tied=True)
    embd = model.tok_embd.weight.numpy()
    q8 = gguf.quants.quantize(embd, gguf.GGMLQuantizationType.Q8_0)
    model.tok_embd.weight.copy_(torch.from_numpy(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)))

    path = tmp_path / "tiny-moe.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.n_layer)
    w.add_embedding_length(config.n_embd)
    w.add_feed_forward_length(config.n_ff)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_kv_head)
    w.add_rope_freq_base(config.rope_base)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.n_vocab)
    w.add_expert_count(config.n_expert)
    w.add_expert_used_count(config.n_expert_used)
    # llama.cpp's tensor names, spelled out here rather than taken from the loader's own map.
    to_gguf = {"norm.weight": "output_norm.weight"}
    for n in range(config.n_layer):
        to_gguf.update({
            f"blocks.{n}.attn_norm.weight": f"blk.{n}.attn_norm.weight",
            f"blocks.{n}.attn.wq.weight": f"blk.{n}.attn_q.weight",
            f"blocks.{n}.attn.wk.weight": f"blk.{n}.attn_k.weight",
            f"blocks.{n}.attn.wv.weight": f"blk.{n}.attn_v.weight",
            f"blocks.{n}.attn.wo.weight": f"blk.{n}.attn_output.weight",
            f"blocks.{n}.ffn_norm.weight": f"blk.{n}.ffn_norm.weight",
            f"blocks.{n}.ffn.router.weight": f"blk.{n}.ffn_gate_inp.weight",
            f"blocks.{n}.ffn.w_gate": f"blk.{n}.ffn_gate_exps.weight",
            f"blocks.{n}.ffn.w_up": f"blk.{n}.ffn_up_exps.weight",
            f"blocks.{n}.ffn.w_down": f"blk.{n}.ffn_down_exps.weight",
        })
    w.add_tensor("token_embd.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for name, p in model.state_dict().items():
        if name not in ("tok_embd.weight", "output.weight"):
            w.add_tensor(to_gguf[name], p.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    loaded = load_model(path)
    # The file stores eps as float32.
    assert loaded.config.norm_eps == pytest.approx(config.norm_eps)
    assert dataclasses.replace(loaded.config, norm_eps=config.norm_eps) == config
    assert loaded.output.weight is loaded.tok_embd.weight
    ids = tokens(7, config.n_vocab)
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], atol=1e-5, rtol=1e-5)
