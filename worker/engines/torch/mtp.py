"""Multi-token prediction heads in the DeepSeek-V3 form, on a frozen base Transformer.

Head k (k = 1..n_mtp) takes the representation h_{k-1} of position i (the base model's final
normalised hidden state for k = 1, head k-1's output after that) and the token t_{i+k} (known,
or proposed by head k-1), and predicts t_{i+k+1}:

    h_k = Block_k( W_k [ RMSNorm(h_{k-1}) ; RMSNorm(Embed(t_{i+k})) ] )
    logits_k = Output( RMSNorm_k(h_k) )

Embed and Output are the base model's own tensors, shared and never trained; Block_k is the
base model's `Block` class, with causal attention over the head's own representations of every
earlier position, as in DeepSeek-V3: the head can copy from the context (a code edit repeats
most of its prompt), which the base's last hidden state alone tells it little about. Each head
keeps a KV cache written by position, like the base's, so a rejected proposal is rewound by
writing over it (`MTPContext`).

One head may also draft every position by itself (`recursive`), as llama.cpp's draft-mtp does
with a file's one NextN layer (gguf_loader.load_nextn_heads reads it into this form): past the
first position the head is fed back its own normalised output RMSNorm_1(h_1) (llama.cpp's
`h_nextn`, the row its logits are scored from) as the hidden state, with the proposed token,
one position further on in its own KV cache; the chained heads above each read instead the
un-normalised output of the head before, each trained for its own position. Both engines then
compute the same thing at every draft position of the same file.

The output may be restricted to a subset of the vocabulary (`vocab`, the token ids the heads
may propose: rows of the shared output matrix), the frequency-ranked drafting vocabulary of
FR-Spec: a full 49k-row projection per head would cost a quarter of a base decode step. A
restricted head can only propose those tokens; verification keeps the output lossless.

This module owns the heads, their running context while decoding, their proposals and their
file format (safetensors, with a JSON provenance beside it). It knows nothing of training,
timers or jobs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from worker.engines.torch.kv_cache import KVCache
from worker.engines.torch.model import Block, Linear, RMSNorm, Transformer

HEADS_SUFFIX = ".mtp.safetensors"
PROVENANCE_SUFFIX = ".mtp.json"
# Heads saved in another form (the earlier heads without attention over the context) cannot
# be loaded into these modules' meaning even where the tensor names agree.
HEADS_FORM = "causal-context-v1"


class MTPError(Exception):
    """Heads cannot be used with this model; the message names the problem and the fix."""


def heads_path(base: Path) -> Path:
    """Where the heads of a base GGUF file live: next to it, named after it."""
    return Path(str(base) + HEADS_SUFFIX)


def provenance_path(base: Path) -> Path:
    return Path(str(base) + PROVENANCE_SUFFIX)


class MTPHead(nn.Module):
    def __init__(self, base: Transformer) -> None:
        super().__init__()
        c = base.config
        self.hidden_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.embd_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.proj = Linear(2 * c.n_embd, c.n_embd, bias=False)
        self.block = Block(c)
        self.out_norm = RMSNorm(c.n_embd, c.norm_eps)

    def forward(self, hidden: torch.Tensor, embd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start_pos: int = 0, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """hidden, embd: (B, T, E) for positions [start_pos, start_pos + T); returns h_k (B, T, E).
        Without a cache, attention is causal over these T positions alone (training)."""
        x = self.proj(torch.cat((self.hidden_norm(hidden), self.embd_norm(embd)), dim=-1))  # (B, T, E)
        return self.block(x, cos, sin, start_pos, cache, layer)


class MTPHeads(nn.Module):
    """n_mtp chained heads, or one recursive head, plus the shared embedding and output of their base model."""

    def __init__(self, base: Transformer, n_mtp: int, vocab: torch.Tensor | None = None,
                 recursive: bool = False) -> None:
        super().__init__()
        if n_mtp < 1:
            raise MTPError(f"n_mtp is {n_mtp}: give at least one head")
        if recursive and n_mtp != 1:
            raise MTPError(f"a recursive head drafts every position alone: one head, not {n_mtp}")
        self.heads = nn.ModuleList(MTPHead(base) for _ in range(n_mtp))
        # One head drafting past itself, fed its own normalised output (see the module docstring).
        self.recursive = recursive
        # Plain attributes, not submodules: the base's tensors are shared, frozen and saved
        # with the base, never with the heads.
        self.__dict__["base"] = base
        self.vocab = vocab  # (V_head,) token ids the heads may propose; None: the whole vocabulary
        self._out_weight: torch.Tensor | None = None
        self._output: Linear | None = None

    @property
    def n_mtp(self) -> int:
        return len(self.heads)

    def init_from_base(self) -> None:
        """A starting point that predicts what the base predicts, softened: each block a copy
        of the base's last block with its residual branches' output matrices zeroed (so it
        starts as the identity; ReZero-like), the projection passing the normalised hidden state
        through and the token embedding with zero weight (its gradient is not zero), and unit
        norm weights. The logits then start as the base's next-token logits divided by the RMS
        of its final hidden state: the right tokens, not yet sharp, which keeps the first
        steps' cross-entropy low. (Copying the base's final norm weight would apply it twice.)"""
        base = self.base
        E = base.config.n_embd
        with torch.no_grad():
            for head in self.heads:
                head.block.load_state_dict(base.blocks[-1].state_dict())
                head.block.attn.wo.weight.zero_()
                down = head.block.ffn.w_down  # a Linear, or an MoE's stacked experts (X, E, F)
                (down if isinstance(down, nn.Parameter) else down.weight).zero_()
                eye = torch.eye(E, dtype=head.proj.weight.dtype, device=head.proj.weight.device)
                head.proj.weight.copy_(torch.cat((eye, torch.zeros_like(eye)), dim=1))

    def output_weight(self) -> torch.Tensor:
        """Rows of the shared output matrix the heads score, (V_head, E); cached for decoding."""
        if self.vocab is None:
            return self.base.output.weight
        if self._out_weight is None or self._out_weight.device != self.base.output.weight.device:
            self._out_weight = self.base.output.weight[self.vocab.to(self.base.output.weight.device)].contiguous()
        return self._out_weight

    def logits(self, h: torch.Tensor, k: int, out_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of head k (0-based) over its vocabulary, (..., V_head); out_weight: the rows
        of the output matrix as a tensor (training, where gradients flow through h)."""
        if out_weight is not None:
            return self.heads[k].out_norm(h) @ out_weight.T
        return self.output_linear()(self.heads[k].out_norm(h))

    def output_linear(self) -> Linear:
        """The heads' output as a Linear, for decoding."""
        if self.vocab is None:
            return self.base.output
        w = self.output_weight()
        if self._output is None or self._output.weight.device != w.device or self._output.weight.dtype != w.dtype:
            out = Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            out.weight = nn.Parameter(w.detach(), requires_grad=False)
            self._output = out
        return self._output

    def to_token(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of indices into the heads' vocabulary."""
        return index if self.vocab is None else self.vocab.to(index.device)[index]

    def chain(self, hidden: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced outputs of every head over whole sequences, as training sees them.

        hidden (B, L, E): the base's hidden states; tokens (B, L). Head k's output row i reads
        tokens[i + k + 1] and predicts tokens[i + k + 2]; returns h_k (B, L - k - 1, E) for
        k = 0..n_mtp-1 (0-based). Decoding with `MTPContext` computes the same rows."""
        L = tokens.shape[1]
        cos, sin = self.base._rope_tables(0, L)
        out, h = [], hidden
        for k, head in enumerate(self.heads):
            n = L - k - 1
            h = head(h[:, :n], self.base.tok_embd(tokens[:, k + 1:k + 1 + n]), cos[:n], sin[:n])
            out.append(h)
        return out

    def new_context(self, n_ctx: int) -> "MTPContext":
        return MTPContext(self, n_ctx)


class MTPContext:
    """The heads' state while decoding one sequence: a KV cache per head, and each head's input
    rows (the base's hidden states for head 1, the previous head's outputs after that), both
    indexed by position.

    A row of head k (0-based) at position i reads token i + k + 1. Rows whose tokens are all
    committed are final and never recomputed; the newest rows of heads after the first read
    proposals of the heads before them and are recomputed in the next pass, once the tokens are
    known. So a pass runs each head on the positions committed since the last one (1 + the
    accepted proposals, a few rows: on a CPU, the cost of one), and nothing recomputes the prefix.
    """

    def __init__(self, heads: MTPHeads, n_ctx: int) -> None:
        base = heads.base
        c = base.config
        w = base.tok_embd.weight
        self.heads = heads
        self.n_ctx = n_ctx
        self.cache = KVCache(heads.n_mtp, c.n_kv_head, c.head_dim, n_ctx, 1, dtype=w.dtype, device=w.device)
        self.inputs = torch.zeros(heads.n_mtp, n_ctx, c.n_embd, dtype=w.dtype, device=w.device)  # (K, S, E)
        self.first = 0  # position of slot 0: the first position whose base hidden state was given
        self.n_hidden = 0  # slots holding a base hidden state
        self.n_final = [0] * heads.n_mtp  # per head: slots [0, n_final) are final

    def start(self, position: int, hidden: torch.Tensor | None = None) -> None:
        """Begin a sequence whose first hidden state will be that of `position`; hidden (T, E)
        the base's hidden states of [position, position + T) if known (the prompt's)."""
        self.first, self.n_hidden = position, 0
        self.n_final = [0] * self.heads.n_mtp
        if hidden is not None and len(hidden):
            self.add_hidden(position, hidden)

    def add_hidden(self, position: int, hidden: torch.Tensor) -> None:
        """hidden (T, E): the base's hidden states of committed positions [position, position + T)."""
        slot = position - self.first
        if slot > self.n_hidden or slot < 0:
            raise ValueError(f"hidden states from position {position}, but the heads hold {self.first + self.n_hidden} positions")
        end = slot + hidden.shape[0]
        if end > self.n_ctx:
            raise IndexError(f"position {position + hidden.shape[0]} does not fit an MTP context of {self.n_ctx}")
        self.inputs[0, slot:end] = hidden
        self.n_hidden = end
        self.n_final = [min(n, slot) for n in self.n_final]

    @torch.inference_mode()
    def propose(self, seq: list[int], n: int, p_min: float = 0.0) -> list[int]:
        """Up to n proposals to follow seq, whose last position's predecessor is the newest hidden
        state given (seq[first + n_hidden] is the last token). Stops early when a head's top
        probability (over its vocabulary) is below p_min. Chained heads propose at most one
        token each; a recursive head any number."""
        heads, base = self.heads, self.heads.base
        end = self.n_hidden  # slot of the last hidden row + 1
        L = self.first + end + 1
        if len(seq) != L:
            raise ValueError(f"{len(seq)} tokens, but hidden states for {L - 1} positions: the heads are out of step")
        n = n if heads.recursive else min(n, heads.n_mtp)
        device = self.inputs.device
        drafts: list[int] = []
        fed_back: torch.Tensor | None = None  # recursive: the last row's normalised output (E,)
        for k in range(n):
            if fed_back is not None:
                # One row past the last (slot end - 1 + k, this head's cache, where the next
                # pass's committed rows overwrite it): the previous proposal and, as its hidden
                # state, the head's own normalised output of the row before.
                slot = end - 1 + k
                toks = torch.tensor([[drafts[-1]]], device=device)  # (1, 1)
                cos, sin = base._rope_tables(slot, 1)
                h = heads.heads[0](fed_back[None, None], base.tok_embd(toks), cos, sin,
                                   slot, self.cache, 0)[0]  # (1, E)
                normed = heads.heads[0].out_norm(h[-1])  # (E,)
                fed_back, logits = normed, heads.output_linear()(normed)  # (V_head,)
            else:
                # At least the last row: its output is the proposal (and a second call without
                # new positions recomputes it alike).
                lo = min(self.n_final[k], end - 1)
                # Row at slot s (position first + s) reads token first + s + k + 1: committed up to
                # L - 1, then the proposals of the heads before (exactly k of them).
                toks = torch.tensor([[*seq[self.first + lo + k + 1:], *drafts]], device=device)  # (1, T)
                cos, sin = base._rope_tables(lo, end - lo)
                h = heads.heads[k](self.inputs[k, lo:end][None], base.tok_embd(toks), cos, sin,
                                   lo, self.cache, k)[0]  # (T, E)
                if k + 1 < heads.n_mtp:
                    self.inputs[k + 1, lo:end] = h
                self.n_final[k] = max(0, end - k)
                if heads.recursive:
                    fed_back = heads.heads[0].out_norm(h[-1])  # (E,)
                    logits = heads.output_linear()(fed_back)  # (V_head,)
                else:
                    logits = heads.logits(h[-1], k)  # (V_head,)
            best = int(logits.argmax())
            if p_min > 0 and float(torch.softmax(logits.float(), -1)[best]) < p_min:
                break
            drafts.append(int(heads.to_token(torch.tensor(best, device=device))))
        return drafts


def save_heads(heads: MTPHeads, base_path: Path, provenance: dict) -> Path:
    """Write the heads next to their base file; returns the safetensors path."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().to("cpu").contiguous() for name, p in heads.heads.state_dict().items()}
    if heads.vocab is not None:
        tensors["vocab"] = heads.vocab.to("cpu", torch.int64).contiguous()
    path = heads_path(base_path)
    meta = {"n_mtp": str(heads.n_mtp), "base_sha256": str(provenance.get("base_sha256", "")), "form": HEADS_FORM}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=meta)
    partial.replace(path)
    provenance_path(base_path).write_text(json.dumps({**provenance, "n_mtp": heads.n_mtp,
                                                      "heads_file": path.name}, indent=2))
    return path


def read_provenance(base_path: Path) -> dict:
    p = provenance_path(base_path)
    return json.loads(p.read_text()) if p.exists() else {}


def load_heads(base: Transformer, base_path: Path, n_mtp: int | None = None, base_sha256: str | None = None) -> MTPHeads:
    """The heads saved next to base_path, on the base's device and dtype; the first n_mtp if given."""
    from safetensors import safe_open

    path = heads_path(base_path)
    if not path.exists():
        raise MTPError(f"no MTP heads for {base_path} ({path.name} is missing): run `tokenfarm models train-mtp` on that model first")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    n_saved = int(meta.get("n_mtp", "0"))
    if meta.get("form") != HEADS_FORM:
        raise MTPError(f"{path.name} holds heads of an older form ({meta.get('form', 'without attention over the context')}): "
                       "train them again with `tokenfarm models train-mtp`")
    if base_sha256 and meta.get("base_sha256") and meta["base_sha256"] != base_sha256:
        raise MTPError(f"{path.name} was trained on a base with sha256 {meta['base_sha256'][:16]}…, not this file ({base_sha256[:16]}…): train heads for this file")
    n = n_saved if n_mtp is None else n_mtp
    if not 1 <= n <= n_saved:
        raise MTPError(f"{n} MTP heads asked for, but {path.name} holds {n_saved}: lower n_mtp or train more heads with --heads {n}")
    vocab = tensors.pop("vocab", None)
    device, dtype = base.tok_embd.weight.device, base.tok_embd.weight.dtype
    heads = MTPHeads(base, n, None if vocab is None else vocab.to(device))
    state = {name: t for name, t in tensors.items() if int(name.split(".")[0]) < n}
    heads.heads.load_state_dict(state, strict=True)
    heads = heads.to(device=device, dtype=dtype).eval()
    return heads
