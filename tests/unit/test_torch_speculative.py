"""Speculative and MTP decoding on tiny random-weight models: greedy output equals plain greedy
token for token, MTP heads survive a save/load round trip, and the sampled acceptance rule
leaves the target's distribution unchanged. No files beyond tmp_path, seconds to run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from worker.engines.torch.model import ModelConfig, Transformer  # noqa: E402
from worker.engines.torch.mtp import MTPError, MTPHeads, load_heads, read_provenance, save_heads  # noqa: E402
from worker.engines.torch.speculative import (  # noqa: E402
    LookupDrafter, ModelDrafter, MTPDrafter, accept_sampled, generate,
)

TARGET = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_ff=64, n_vocab=37)
DRAFT = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, n_ff=32, n_vocab=37)


def random_model(config: ModelConfig, seed: int, std: float = 0.3) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


PROMPT = [3, 17, 5, 9, 3, 17, 5, 22]
N_GEN = 24


def plain(model: Transformer) -> list[int]:
    cache = model.new_cache(64)
    model(torch.tensor([PROMPT[:-1]]), 0, cache)
    return generate(model, cache, PROMPT, N_GEN).tokens


def with_drafter(model: Transformer, drafter, n_draft: int):
    cache = model.new_cache(64)
    model(torch.tensor([PROMPT[:-1]]), 0, cache)
    return generate(model, cache, PROMPT, N_GEN, drafter=drafter, n_draft=n_draft)


def random_heads(model: Transformer, n_mtp: int, seed: int, vocab: torch.Tensor | None = None) -> MTPHeads:
    torch.manual_seed(seed)
    heads = MTPHeads(model, n_mtp, vocab)
    with torch.no_grad():
        for p in heads.heads.parameters():
            p.normal_(0.0, 0.3)
    return heads.eval()


@pytest.mark.parametrize("n_mtp", [1, 3])
def test_greedy_mtp_reproduces_plain_greedy(n_mtp):
    model = random_model(TARGET, 0)
    out = with_drafter(model, MTPDrafter(random_heads(model, n_mtp, 1)), n_mtp)
    assert out.tokens == plain(model)
    assert out.stats.n_passes < N_GEN or out.stats.n_accepted == 0
    assert len(out.stats.drafted_by_position) == n_mtp


def test_lookup_replaying_text_it_has_seen_reproduces_plain_greedy():
    # After the same text once, lookup finds long matches and drafts many tokens per pass.
    model = random_model(TARGET, 0)
    tokens = plain(model)
    seq = PROMPT + tokens
    cache = model.new_cache(128)
    model(torch.tensor([seq[:-1]]), 0, cache)
    # Decoding again after the same text: lookup proposes the continuation seen before.
    replay = generate(model, cache, seq, N_GEN, drafter=LookupDrafter(ngram_max=4, n_draft=4), n_draft=4)
    cache2 = model.new_cache(128)
    model(torch.tensor([seq[:-1]]), 0, cache2)
    assert replay.tokens == generate(model, cache2, seq, N_GEN).tokens
    assert replay.stats.n_drafted > 0
    assert 0.0 <= replay.stats.acceptance_rate <= 1.0


def test_greedy_lookup_reproduces_plain_greedy():
    model = random_model(TARGET, 0)
    out = with_drafter(model, LookupDrafter(ngram_max=3, n_draft=4), 4)
    assert out.tokens == plain(model)


@pytest.mark.parametrize("p_min", [0.0, 0.3])
def test_greedy_draft_model_reproduces_plain_greedy(p_min):
    model = random_model(TARGET, 0)
    draft = random_model(DRAFT, 5)
    out = with_drafter(model, ModelDrafter(draft, draft.new_cache(64), n_draft=3, p_min=p_min), 3)
    assert out.tokens == plain(model)
    assert out.stats.n_drafted > 0


def test_draft_that_is_the_target_is_always_accepted():
    model = random_model(TARGET, 0)
    twin = random_model(TARGET, 0)
    out = with_drafter(model, ModelDrafter(twin, twin.new_cache(64), n_draft=4), 4)
    assert out.tokens == plain(model)
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.acceptance_by_position == [1.0] * 4
    # 1 token from the first pass and 5 per full pass after: 24 tokens need few passes.
    assert out.stats.n_passes < N_GEN / 3


def test_mtp_heads_round_trip_through_safetensors(tmp_path):
    model = random_model(TARGET, 0)
    vocab = torch.tensor([0, 3, 5, 9, 17, 22, 30])
    heads = random_heads(model, 2, 1, vocab)
    base_path = tmp_path / "base.gguf"
    save_heads(heads, base_path, {"base_sha256": "ab" * 32, "training": {"loss_by_epoch": [1.0]}})
    loaded = load_heads(model, base_path, base_sha256="ab" * 32)
    assert loaded.n_mtp == 2
    assert torch.equal(loaded.vocab, vocab)
    for (name, a), (_, b) in zip(heads.heads.state_dict().items(), loaded.heads.state_dict().items()):
        assert torch.equal(a, b), name
    hidden = torch.randn(TARGET.n_embd)
    assert loaded.propose(hidden, 5) == heads.propose(hidden, 5)
    assert read_provenance(base_path)["training"]["loss_by_epoch"] == [1.0]
    assert load_heads(model, base_path, n_mtp=1).n_mtp == 1
    with pytest.raises(MTPError, match="holds 2"):
        load_heads(model, base_path, n_mtp=3)
    with pytest.raises(MTPError, match="trained on a base"):
        load_heads(model, base_path, base_sha256="cd" * 32)
    with pytest.raises(MTPError, match="train-mtp"):
        load_heads(model, tmp_path / "other.gguf")


def test_sampled_rule_keeps_the_target_distribution():
    # Exact check of the rule itself: over many draws from q, what comes out follows p.
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    counts = torch.zeros(4)
    n = 10000
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        n_acc, nxt = accept_sampled(p, q, [x], g)
        counts[x if n_acc == 1 else nxt] += 1
    assert (counts / n - p[0]).abs().max() < 0.02


def test_sampled_speculation_first_token_follows_the_target():
    """On tiny random models: the first token of sampled speculative decoding is distributed
    as the target's own softmax, over many seeds."""
    cfg_t = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, n_ff=32, n_vocab=6)
    cfg_d = ModelConfig(n_layer=1, n_embd=8, n_head=1, n_kv_head=1, n_ff=16, n_vocab=6)
    target, draft = random_model(cfg_t, 0, std=0.6), random_model(cfg_d, 3, std=0.6)
    prompt = [1, 4, 2]
    temperature = 1.0
    with torch.inference_mode():
        p = torch.softmax(target(torch.tensor([prompt]))[0][0, -1] / temperature, -1)
    t_cache, d_cache = target.new_cache(16), draft.new_cache(16)
    counts = torch.zeros(cfg_t.n_vocab)
    n = 2000
    g = torch.Generator()
    for seed in range(n):
        g.manual_seed(seed)
        target(torch.tensor([prompt[:-1]]), 0, t_cache)
        drafter = ModelDrafter(draft, d_cache, n_draft=2, generator=g)
        out = generate(target, t_cache, prompt, 1 + 2, drafter=drafter, n_draft=2,
                       temperature=temperature, generator=g)
        counts[out.tokens[0]] += 1
    # 2000 draws: the standard error of each frequency is at most 0.011.
    assert (counts / n - p).abs().max() < 0.045


def test_training_rows_pair_each_hidden_state_with_the_tokens_after_it():
    from worker.engines.torch.mtp_train import choose_vocab, training_rows

    tokens = torch.arange(20).view(2, 10)  # (B, L): token value = position (+10 in row 2)
    hidden = tokens[..., None].float().repeat(1, 1, 4)  # (B, L, E): hidden row i holds i
    h, y = training_rows(tokens, hidden, n_prompt=3, n_mtp=2)
    # Rows start at the last prompt position (2) and stop where x[i + 3] still exists.
    assert h[:, 0].tolist() == [2, 3, 4, 5, 6, 12, 13, 14, 15, 16]
    # Head k (1-based) at position i reads x[i + k] and learns x[i + k + 1].
    assert y[0].tolist() == [3, 4, 5] and y[-1].tolist() == [17, 18, 19]
    vocab = choose_vocab(y, [0, 0, 0], n_vocab=50, n_head_vocab=8)
    assert len(vocab) == 8 and 0 in vocab.tolist()  # the most frequent token is kept
    assert choose_vocab(y, [], n_vocab=50, n_head_vocab=0) is None
