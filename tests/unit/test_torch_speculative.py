"""Speculative and MTP decoding through the one loop (worker/speculative.py) on TorchBackends
over tiny random-weight models: greedy output equals plain greedy
token for token, MTP heads survive a save/load round trip, and the sampled acceptance rule
leaves the target's distribution unchanged. No files beyond tmp_path, seconds to run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from worker.engines.torch.backend import TorchBackend  # noqa: E402
from worker.engines.torch.model import ModelConfig, Transformer  # noqa: E402
from worker.engines.torch.mtp import (  # noqa: E402
    MTPError,
    MTPHeads,
    load_heads,
    read_provenance,
    save_heads,
)
from worker.speculative import (  # noqa: E402
    LookupDrafter,
    ModelDrafter,
    MTPDrafter,
    Sampler,
    greedy,
    speculative,
)

TARGET = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_ff=64, n_vocab=37)
DRAFT = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, n_ff=32, n_vocab=37)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Models of a few hundred weights: a second thread only adds its wake-up to every op, and on a
    loaded 2-core machine that wait is most of the time (126 s against 14 s for 2,000 sampled runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(config: ModelConfig, seed: int, std: float = 0.3) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


PROMPT = [3, 17, 5, 9, 3, 17, 5, 22]
N_GEN = 24


def backend(model: Transformer, n_ctx: int = 64) -> TorchBackend:
    return TorchBackend.from_model(model, n_ctx)


def plain(model: Transformer) -> list[int]:
    # N_GEN tokens after PROMPT: the prefill's, then N_GEN - 1 decode steps.
    return greedy(backend(model), PROMPT, N_GEN - 1).tokens


def with_drafter(model: Transformer, make_drafter):
    """make_drafter(target backend) -> drafter; the run's stats are the Run itself."""
    target = backend(model)
    return speculative(target, make_drafter(target), PROMPT, N_GEN - 1)


def mtp(heads: MTPHeads, n_mtp: int, p_min: float = 0.0):
    return lambda target: MTPDrafter(target, heads.new_context(64), n_mtp, p_min)


def random_heads(model: Transformer, n_mtp: int, seed: int, vocab: torch.Tensor | None = None) -> MTPHeads:
    torch.manual_seed(seed)
    heads = MTPHeads(model, n_mtp, vocab)
    with torch.no_grad():
        for p in heads.heads.parameters():
            p.normal_(0.0, 0.3)
    return heads.eval()


@pytest.mark.parametrize("n_mtp", [1, 3])
@pytest.mark.parametrize("vocab", [None, [0, 2, 3, 5, 9, 11, 17, 22, 30]], ids=["full-vocab", "reduced-vocab"])
@pytest.mark.parametrize("p_min", [0.0, 0.06])
def test_greedy_mtp_reproduces_plain_greedy(n_mtp, vocab, p_min):
    # A reduced drafting vocabulary and a confidence threshold change what is proposed, never
    # what is kept: verification with the full output head decides.
    model = random_model(TARGET, 0)
    heads = random_heads(model, n_mtp, 1, None if vocab is None else torch.tensor(vocab))
    out = with_drafter(model, mtp(heads, n_mtp, p_min))
    assert out.tokens == plain(model)
    assert out.n_drafted > 0
    if p_min == 0.0:  # every head proposed
        assert len(out.drafted_at) == n_mtp and all(d > 0 for d in out.drafted_at)
    else:  # some proposals fall below the threshold (random heads are unsure)
        assert out.n_drafted < n_mtp * out.n_passes


def test_heads_that_reproduce_the_target_are_always_accepted():
    """A target whose attention adds nothing (each token's logits depend on that token alone),
    with heads that recompute it: each head's block is the target's layer and reads only the
    token's embedding. Every proposal of the chain is then the target's own token, which checks
    that each head reads the right token and the right previous head's rows, pass after pass."""
    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=4, n_kv_head=2, n_ff=64, n_vocab=37)
    model = random_model(cfg, 0)
    E = cfg.n_embd
    heads = MTPHeads(model, 3)
    with torch.no_grad():
        model.blocks[0].attn.wo.weight.zero_()
        e = model.tok_embd.weight
        e.copy_(e / e.pow(2).mean(-1, keepdim=True).sqrt())  # unit RMS: the head's norm keeps it
        for head in heads.heads:
            head.block.load_state_dict(model.blocks[0].state_dict())
            head.proj.weight.copy_(torch.cat((torch.zeros(E, E), torch.eye(E)), dim=1))
            head.embd_norm.eps = 0.0
            head.out_norm.weight.copy_(model.norm.weight)
    out = with_drafter(model, mtp(heads.eval(), 3))
    assert out.tokens == plain(model)
    assert out.acceptance_by_position == [1.0] * 3
    assert out.n_passes <= N_GEN // 4 + 1


def test_cached_proposals_equal_the_teacher_forced_chain():
    """What decoding proposes with the heads' KV cache is what training computes over the whole
    sequence (MTPHeads.chain): the same rows, the same attention, the same positions."""
    model = random_model(TARGET, 0)
    heads = random_heads(model, 3, 1)
    seq = PROMPT + [4, 8, 15, 16, 23, 4, 2]
    with torch.inference_mode():
        _, hidden = model(torch.tensor([seq]))
        outs = heads.chain(hidden, torch.tensor([seq]))
        ctx = heads.new_context(64)
        # Committed in irregular steps, as passes accept different numbers of proposals.
        ctx.start(0, hidden[0, :len(PROMPT) - 1])
        for n in (len(PROMPT), len(PROMPT) + 1, len(PROMPT) + 4, len(seq)):
            ctx.add_hidden(ctx.n_hidden, hidden[0, ctx.n_hidden:n - 1])
            first = ctx.propose(seq[:n], 1)
            # Head 1's proposal after seq[:n] is its teacher-forced row at position n - 2.
            expected = int(heads.logits(outs[0][0, n - 2], 0).argmax())
            assert first == [expected]
        drafts = ctx.propose(seq, 3)
    # Deeper heads read the proposals before them; teacher-forced, they read seq. Where the
    # proposals happen to be wrong the rows differ, so compare the first head's only, and the
    # chain's length.
    assert len(drafts) == 3 and drafts[0] == int(heads.logits(outs[0][0, len(seq) - 2], 0).argmax())


def test_lookup_replaying_text_it_has_seen_reproduces_plain_greedy():
    # After the same text once, lookup finds long matches and drafts many tokens per pass.
    model = random_model(TARGET, 0)
    tokens = plain(model)
    seq = PROMPT + tokens
    # Decoding again after the same text: lookup proposes the continuation seen before.
    replay = speculative(backend(model, 128), LookupDrafter(ngram_max=4, n_draft=4), seq, N_GEN - 1)
    assert replay.tokens == greedy(backend(model, 128), seq, N_GEN - 1).tokens
    assert replay.n_drafted > 0
    assert 0.0 <= replay.acceptance_rate <= 1.0


def test_greedy_lookup_reproduces_plain_greedy():
    model = random_model(TARGET, 0)
    out = with_drafter(model, lambda target: LookupDrafter(ngram_max=3, n_draft=4))
    assert out.tokens == plain(model)


@pytest.mark.parametrize("p_min", [0.0, 0.3])
def test_greedy_draft_model_reproduces_plain_greedy(p_min):
    model = random_model(TARGET, 0)
    # Weights spread wider than the target's: a draft sure enough of itself that p_min = 0.3
    # (checked before every proposal, the first included) keeps some proposals and cuts others.
    draft = random_model(DRAFT, 5, std=0.6)
    out = with_drafter(model, lambda target: ModelDrafter(backend(draft), n_draft=3, p_min=p_min))
    assert out.tokens == plain(model)
    assert out.n_drafted > 0
    if p_min > 0:
        assert out.n_drafted < 3 * out.n_passes


def test_draft_that_is_the_target_is_always_accepted():
    model = random_model(TARGET, 0)
    twin = random_model(TARGET, 0)
    out = with_drafter(model, lambda target: ModelDrafter(backend(twin), n_draft=4))
    assert out.tokens == plain(model)
    assert out.acceptance_rate == 1.0
    assert out.acceptance_by_position == [1.0] * 4
    # 1 token from the prefill and 5 per full pass after: 24 tokens need few passes.
    assert out.n_passes < N_GEN / 3


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
    hidden = torch.randn(5, TARGET.n_embd)
    proposals = []
    for h in (heads, loaded):
        ctx = h.new_context(16)
        ctx.start(0, hidden)
        proposals.append(ctx.propose([1, 2, 3, 4, 5, 6], 2))
    assert proposals[0] == proposals[1] and len(proposals[0]) == 2
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
    sampler = Sampler(1.0, 0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    counts = torch.zeros(4)
    n = 10000
    for _ in range(n):
        x = sampler.draw(q[0])
        n_acc, nxt = sampler.accept(p, q, [x])
        counts[x if n_acc == 1 else nxt] += 1
    assert (counts / n - p[0]).abs().max() < 0.02


def test_sampled_speculation_first_token_follows_the_target():
    """On tiny random models: the first token of sampled speculative decoding is distributed
    as the target's own softmax, and so is the second (the first one a verify pass decides,
    through the acceptance rule), over many seeds."""
    cfg_t = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, n_ff=32, n_vocab=6)
    cfg_d = ModelConfig(n_layer=1, n_embd=8, n_head=1, n_kv_head=1, n_ff=16, n_vocab=6)
    target, draft = random_model(cfg_t, 0, std=0.6), random_model(cfg_d, 3, std=0.6)
    prompt = [1, 4, 2]
    temperature = 1.0
    with torch.inference_mode():
        p = torch.softmax(target(torch.tensor([prompt]))[0][0, -1] / temperature, -1)
        # The second token's marginal: sum over the first x of p(x) p(. | prompt, x).
        after = torch.softmax(target(torch.tensor([[*prompt, x] for x in range(cfg_t.n_vocab)]))[0][:, -1]
                              / temperature, -1)  # (V, V)
        p2 = p @ after
    t_backend, d_backend = backend(target, 16), backend(draft, 16)
    counts = torch.zeros(cfg_t.n_vocab)
    counts2 = torch.zeros(cfg_t.n_vocab)
    n = 2000
    for seed in range(n):
        drafter = ModelDrafter(d_backend, n_draft=2)
        out = speculative(t_backend, drafter, prompt, 2, Sampler(temperature, seed))
        counts[out.tokens[0]] += 1
        counts2[out.tokens[1]] += 1
    # 2000 draws: the standard error of each frequency is at most 0.011.
    assert (counts / n - p).abs().max() < 0.045
    assert (counts2 / n - p2).abs().max() < 0.045


def test_training_rows_start_where_decoding_first_proposes():
    from worker.engines.torch.mtp_train import Continuation, choose_vocab, collate

    # Two sequences of 10 and 7 tokens with prompts of 3 and 4: token value = position + 100 * b.
    seqs = [Continuation(torch.arange(10) + 100 * b, torch.zeros(9 - 3 * b, 4), n_prompt)
            for b, n_prompt in ((0, 3), (1, 4))]
    seqs[1].tokens = seqs[1].tokens[:7]
    tokens, hidden, rows = collate(seqs, n_mtp=2)
    assert tokens.shape == (2, 10) and hidden.shape == (2, 10, 4)
    # Head k (0-based) at row i reads token i + k + 1 and learns i + k + 2: rows from the
    # prompt's last position while the target is a generated token.
    b, i = rows[0]
    assert list(zip(b.tolist(), i.tolist())) == [(0, p) for p in range(2, 8)] + [(1, p) for p in range(3, 5)]
    b, i = rows[1]
    assert list(zip(b.tolist(), i.tolist())) == [(0, p) for p in range(2, 7)] + [(1, 3)]
    assert tokens[b, i + 3].tolist() == [5, 6, 7, 8, 9, 106]
    vocab = choose_vocab(tokens, [0, 0, 0], n_vocab=500, n_head_vocab=8)
    assert len(vocab) == 8 and 0 in vocab.tolist()  # the most frequent token is kept
    assert choose_vocab(tokens, [], n_vocab=50, n_head_vocab=0) is None


def test_left_padded_batch_decodes_like_each_sequence_alone():
    """generate_batch pads prompts of unequal length on the left and masks the padding: each
    row's greedy continuation and hidden states are those of the sequence decoded alone."""
    from worker.engines.torch.mtp_train import generate_batch

    model = random_model(TARGET, 0)
    prompts = [PROMPT, PROMPT[2:], [7]]
    batch = generate_batch(model, prompts, 6)
    for p, got in zip(prompts, batch):
        alone = generate_batch(model, [p], 6)[0]
        assert got.tokens.tolist() == alone.tokens.tolist()
        assert got.n_prompt == len(p) and got.hidden.shape == (len(p) + 5, TARGET.n_embd)
        torch.testing.assert_close(got.hidden, alone.hidden, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("soft_weight", [0.0, 1.0])
def test_training_on_the_base_s_own_text_teaches_the_heads(soft_weight):
    """A few epochs of train_epoch on a tiny base's greedy continuations raise the heads'
    accuracy on that text well above where init_from_base starts: the targets, the rows and the
    loss (with and without the soft labels) line up."""
    import random

    from worker.engines.torch.mtp_train import (
        TrainConfig,
        evaluate,
        generate_batch,
        train_epoch,
    )

    base = random_model(TARGET, 0, std=0.5)
    for p in base.parameters():
        p.requires_grad_(False)
    rng = random.Random(0)
    prompts = [[rng.randrange(TARGET.n_vocab) for _ in range(4)] for _ in range(48)]
    seqs = generate_batch(base, prompts, 12)
    cfg = TrainConfig(n_mtp=2, n_rows_batch=128, soft_weight=soft_weight)
    torch.manual_seed(0)
    heads = MTPHeads(base, cfg.n_mtp)
    heads.init_from_base()
    before, _ = evaluate(heads.eval(), seqs, cfg.n_rows_batch, None)
    heads.train()
    opt = torch.optim.AdamW(heads.heads.parameters(), lr=1e-2)
    losses = [train_epoch(heads, seqs, cfg, opt, None, None, heads.output_weight().detach(), rng) for _ in range(15)]
    after, chain = evaluate(heads.eval(), seqs, cfg.n_rows_batch, None)
    # The soft labels' entropy is a floor the loss cannot go below: a looser bound on it.
    assert losses[-1] < 0.75 * losses[0]
    assert after[0] > before[0] + 0.2 and after[1] > before[1] + 0.2, (before, after)
    assert chain[1] <= chain[0] <= after[0] + 1e-9


def test_distillation_text_is_kept_per_request_and_reused(tmp_path, monkeypatch):
    """A second training run with more requests generates only the new ones, and gets back
    exactly the text of the first run for the old ones."""
    from worker.engines.torch import mtp_train
    from worker.engines.torch.mtp_train import TrainConfig, distillation_text

    base = random_model(TARGET, 0)
    cfg = TrainConfig(n_cont=5, n_batch_gen=2)
    cache = tmp_path / "text.safetensors"
    first = [PROMPT, PROMPT[3:], [4, 4]]
    made = distillation_text(base, first, cfg, cache, lambda m: None)
    generated = []
    real = mtp_train.generate_batch
    monkeypatch.setattr(mtp_train, "generate_batch", lambda m, ps, n: generated.extend(ps) or real(m, ps, n))
    more = [[9, 1, 2], *first, [30]]
    again = distillation_text(base, more, cfg, cache, lambda m: None)
    assert sorted(generated) == sorted([[9, 1, 2], [30]])
    for old, new in zip(made, again[1:4]):
        assert new.tokens.tolist() == old.tokens.tolist() and new.n_prompt == old.n_prompt
        torch.testing.assert_close(new.hidden, old.hidden)
    assert again[0].tokens[:3].tolist() == [9, 1, 2] and len(again[4].tokens) == 1 + 5
    # Another length is other text: nothing is reused.
    generated.clear()
    distillation_text(base, first, TrainConfig(n_cont=4, n_batch_gen=2), cache, lambda m: None)
    assert len(generated) == 3


def test_heads_on_an_moe_base_start_from_it_and_decode_losslessly(tmp_path):
    """On an MoE base the heads' blocks are MoE blocks too (DeepSeek-V3's form): they start as
    the identity like a dense head's, decode losslessly, and survive a save/load round trip."""
    import dataclasses

    moe = random_model(dataclasses.replace(TARGET, n_expert=4, n_expert_used=2), 0)
    heads = MTPHeads(moe, 2)
    heads.init_from_base()
    x = torch.randn(1, 5, TARGET.n_embd)
    cos, sin = moe._rope_tables(0, 5)
    block_out = heads.heads[0].block(x, cos, sin, 0, None, 0)
    torch.testing.assert_close(block_out, x)  # residual branches start at zero
    assert with_drafter(moe, mtp(heads.eval(), 2)).tokens == plain(moe)
    path = tmp_path / "moe.gguf"
    save_heads(heads, path, {"base_sha256": ""})
    again = load_heads(moe, path)
    assert with_drafter(moe, mtp(again, 2)).tokens == plain(moe)


# The one draft-and-verify loop (worker/speculative.py) over TorchBackend's SpeculativeBackend side.

def _backend(seed: int, config: ModelConfig = TARGET):
    return TorchBackend.from_model(random_model(config, seed), n_ctx=128)


@pytest.mark.parametrize("drafter_kind", ["lookup", "model", "self"])
def test_shared_loop_on_the_torch_backend_reproduces_plain_greedy(drafter_kind):
    target = _backend(1)
    prompt = [1, 5, 9, 5, 9, 3, 7, 5, 9]
    base = greedy(target, prompt, 24)
    if drafter_kind == "lookup":
        drafter = LookupDrafter(n_draft=4)
    else:
        drafter = ModelDrafter(_backend(1) if drafter_kind == "self" else _backend(2, DRAFT), n_draft=4)
    run = speculative(target, drafter, prompt, 24)
    assert run.tokens == base.tokens
    assert run.n_drafted > 0
    if drafter_kind == "self":
        # A draft that is the target is never rejected.
        assert run.n_accepted == run.n_drafted


def test_torch_backend_verify_equals_token_by_token_decode_and_truncate_rewinds():
    target = _backend(3)
    target.prefill([1, 2, 3])
    predicted = target.verify([4, 5, 6])
    assert target.n_past == 6
    target.truncate(3)
    assert [target.decode(t) for t in (4, 5, 6)] == predicted
    assert target.last_hidden().shape == (1, TARGET.n_embd)
    assert 0.0 < target.top_prob() <= 1.0
