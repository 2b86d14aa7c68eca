"""The torch engine's side of the project's MTP build, on tiny random models: a llama GGUF and a
head exported as glm4moe (worker/mtp_export.py) read back as exactly that model and head, and
the recursive NextN head (one head drafting every position, as llama.cpp does) proposes what a
computation from scratch proposes and keeps greedy decoding lossless. No files beyond tmp_path."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402

from worker.engines.torch.backend import TorchBackend  # noqa: E402
from worker.engines.torch.model import ModelConfig, Transformer  # noqa: E402
from worker.engines.torch.mtp import MTPError, MTPHeads, save_heads  # noqa: E402
from worker.speculative import MTPDrafter, greedy, speculative  # noqa: E402

# n_ff even (the export splits it into a routed and a shared half); K/V heads grouped, so the
# Q and K permutations differ.
CONFIG = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_ff=48, n_vocab=41)
PROMPT = [3, 17, 5, 9, 3, 17, 5, 22]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Models of a few thousand weights: a second thread only adds its wake-up to every op.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(seed: int = 0, tied: bool = True) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CONFIG, tied_output=tied)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def random_head(model: Transformer, seed: int = 1, recursive: bool = True) -> MTPHeads:
    torch.manual_seed(seed)
    heads = MTPHeads(model, 1, recursive=recursive)
    with torch.no_grad():
        for p in heads.heads.parameters():
            p.normal_(0.0, 0.3)
    return heads.eval()


def write_llama(model: Transformer, path) -> None:
    """The model as a llama GGUF, named as llama.cpp names its tensors (spelled out here, not
    taken from the loader's map)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layer)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_base)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.n_vocab)
    names = {"tok_embd.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    for n in range(c.n_layer):
        names.update({
            f"blocks.{n}.attn_norm.weight": f"blk.{n}.attn_norm.weight",
            f"blocks.{n}.attn.wq.weight": f"blk.{n}.attn_q.weight",
            f"blocks.{n}.attn.wk.weight": f"blk.{n}.attn_k.weight",
            f"blocks.{n}.attn.wv.weight": f"blk.{n}.attn_v.weight",
            f"blocks.{n}.attn.wo.weight": f"blk.{n}.attn_output.weight",
            f"blocks.{n}.ffn_norm.weight": f"blk.{n}.ffn_norm.weight",
            f"blocks.{n}.ffn.w_gate.weight": f"blk.{n}.ffn_gate.weight",
            f"blocks.{n}.ffn.w_up.weight": f"blk.{n}.ffn_up.weight",
            f"blocks.{n}.ffn.w_down.weight": f"blk.{n}.ffn_down.weight",
        })
    for name, p in model.state_dict().items():
        if name != "output.weight":  # tied
            w.add_tensor(names[name], p.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_the_glm4moe_export_reads_back_as_the_model_and_head_it_was_made_of(tmp_path):
    from worker.engines.torch.gguf_loader import load_model, load_nextn_heads
    from worker.engines.torch.mtp import heads_path
    from worker.mtp_export import export_mtp

    model = random_model()
    base = tmp_path / "base.gguf"
    write_llama(model, base)
    head = random_head(model, recursive=False)
    save_heads(head, base, {"base_sha256": ""})
    export = export_mtp(base, heads_path(base), tmp_path / "mtp.gguf")

    trunk = load_model(export)
    # The llama file's own reading (its eps is stored as float32), tied output included.
    assert trunk.config == load_model(base).config and trunk.output.weight is trunk.tok_embd.weight
    want = model.state_dict()
    assert [k for k, v in trunk.state_dict().items() if not torch.equal(v, want[k])] == []
    nextn = load_nextn_heads(export, trunk)
    assert nextn.recursive and nextn.n_mtp == 1
    saved = head.heads.state_dict()
    assert [k for k, v in nextn.heads.state_dict().items() if not torch.equal(v, saved[k])] == []


def from_scratch(heads: MTPHeads, hidden: torch.Tensor, seq: list[int], n: int) -> list[int]:
    """llama.cpp's recursion computed without a cache: the head over every row at once (causal
    attention), the rows being (hidden state of position s, token s + 1) for the committed
    positions, then one row per proposal whose hidden state is the normalised output of the
    row before it."""
    base, head = heads.base, heads.heads[0]
    rows = list(hidden)  # (E,) each, positions 0 .. len(seq) - 2
    toks = list(seq[1:])
    drafts: list[int] = []
    for _ in range(n):
        cos, sin = base._rope_tables(0, len(rows))
        h = head(torch.stack(rows)[None], base.tok_embd(torch.tensor([toks])), cos, sin)[0]  # (T, E)
        normed = head.out_norm(h[-1])
        drafts.append(int(base.output(normed).argmax()))
        rows.append(normed)
        toks.append(drafts[-1])
    return drafts


@torch.inference_mode()
def test_recursive_proposals_equal_the_recursion_computed_from_scratch():
    """Pass after pass, as a decode commits positions in irregular steps: the head's cache holds
    the committed rows and the last pass's draft rows after them, which the next pass must write
    over before attending to; what it proposes is what the recursion computes afresh."""
    model = random_model()
    heads = random_head(model)
    seq = PROMPT + [4, 8, 15, 16, 23, 4, 2, 11, 7]
    _, hidden = model(torch.tensor([seq]))
    ctx = heads.new_context(64)
    ctx.start(0, hidden[0, :len(PROMPT) - 1])
    for n in (len(PROMPT), len(PROMPT) + 1, len(PROMPT) + 4, len(PROMPT) + 5, len(seq)):
        ctx.add_hidden(ctx.n_hidden, hidden[0, ctx.n_hidden:n - 1])
        got = ctx.propose(seq[:n], 4)
        assert got == from_scratch(heads, hidden[0, :n - 1], seq[:n], 4), n


@pytest.mark.parametrize("n_mtp", [1, 2, 4])
def test_greedy_decoding_with_a_recursive_head_reproduces_plain_greedy(n_mtp):
    model = random_model()
    heads = random_head(model)

    def target() -> TorchBackend:
        return TorchBackend.from_model(model, 128)

    want = greedy(target(), PROMPT, 24).tokens
    t = target()
    run = speculative(t, MTPDrafter(t, heads.new_context(128), n_mtp), PROMPT, 24)
    assert run.tokens == want
    # One head drafts every position asked for (chained heads stop at their count).
    assert len(run.drafted_at) == n_mtp and all(d > 0 for d in run.drafted_at)


def test_a_recursive_head_is_one_head():
    with pytest.raises(MTPError, match="one head, not 2"):
        MTPHeads(random_model(), 2, recursive=True)
