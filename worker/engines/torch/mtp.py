"""Multi-token prediction heads in the DeepSeek-V3 form, on a frozen base Transformer.

Head k (k = 1..n_mtp) takes the representation h_{k-1} of position i (the base model's final
normalised hidden state for k = 1, head k-1's output after that) and the token t_{i+k} (known,
or proposed by head k-1), and predicts t_{i+k+1}:

    h_k = Block_k( W_k [ RMSNorm(h_{k-1}) ; RMSNorm(Embed(t_{i+k})) ] )
    logits_k = Output( RMSNorm_k(h_k) )

Embed and Output are the base model's own tensors, shared and never trained; Block_k is the
base model's `Block` class. One departure from DeepSeek-V3, chosen for speculation on a CPU:
a head's attention sees only its own position (no KV cache of its own). The base hidden state
already carries the context, and a per-head cache would need rewinding with every rejected
proposal. Training (mtp_train.py) runs the heads the same way, so what is trained is what runs.

The output may be restricted to a subset of the vocabulary (`vocab`, the token ids the heads
may propose: rows of the shared output matrix), the frequency-ranked drafting vocabulary of
FR-Spec: a full 49k-row projection per head would cost a quarter of a base decode step. A
restricted head can only propose those tokens; verification keeps the output lossless.

This module owns the heads, their proposals and their file format (safetensors, with a JSON
provenance beside it). It knows nothing of training, timers or jobs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from worker.engines.torch.model import Block, RMSNorm, Transformer

HEADS_SUFFIX = ".mtp.safetensors"
PROVENANCE_SUFFIX = ".mtp.json"


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
        self.proj = nn.Linear(2 * c.n_embd, c.n_embd, bias=False)
        self.block = Block(c)
        self.out_norm = RMSNorm(c.n_embd, c.norm_eps)

    def forward(self, hidden: torch.Tensor, embd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """hidden, embd: (N, E), one row per position; returns h_k (N, E)."""
        x = self.proj(torch.cat((self.hidden_norm(hidden), self.embd_norm(embd)), dim=-1))  # (N, E)
        # Each position is its own length-1 sequence: attention over itself alone.
        return self.block(x[:, None, :], cos, sin, 0, None, 0)[:, 0, :]


class MTPHeads(nn.Module):
    """n_mtp chained heads plus the shared embedding and output of their base model."""

    def __init__(self, base: Transformer, n_mtp: int, vocab: torch.Tensor | None = None) -> None:
        super().__init__()
        if n_mtp < 1:
            raise MTPError(f"n_mtp is {n_mtp}: give at least one head")
        self.heads = nn.ModuleList(MTPHead(base) for _ in range(n_mtp))
        # Plain attributes, not submodules: the base's tensors are shared, frozen and saved
        # with the base, never with the heads.
        self.__dict__["base"] = base
        self.vocab = vocab  # (V_head,) token ids the heads may propose; None: the whole vocabulary
        self._out_weight: torch.Tensor | None = None

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
                head.block.ffn.w_down.weight.zero_()
                eye = torch.eye(E, dtype=head.proj.weight.dtype, device=head.proj.weight.device)
                head.proj.weight.copy_(torch.cat((eye, torch.zeros_like(eye)), dim=1))

    def output_weight(self) -> torch.Tensor:
        """Rows of the shared output matrix the heads score, (V_head, E); cached for decoding."""
        if self.vocab is None:
            return self.base.output.weight
        if self._out_weight is None or self._out_weight.device != self.base.output.weight.device:
            self._out_weight = self.base.output.weight[self.vocab.to(self.base.output.weight.device)]
        return self._out_weight

    def rope_identity(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Position 0 for every length-1 sequence: the rotation is the identity.
        return self.base._rope_tables(0, 1)

    def logits(self, h: torch.Tensor, k: int, out_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of head k (0-based) over its vocabulary, (N, V_head)."""
        w = self.output_weight() if out_weight is None else out_weight
        return self.heads[k].out_norm(h) @ w.T

    def to_token(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of indices into the heads' vocabulary."""
        return index if self.vocab is None else self.vocab.to(index.device)[index]

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, token: int, n: int | None = None) -> list[int]:
        """Greedy chain: hidden (E,) of the last position, token the one after it; n proposals."""
        n = self.n_mtp if n is None else min(n, self.n_mtp)
        cos, sin = self.rope_identity()
        w = self.output_weight()
        h = hidden[None, :]  # (1, E)
        tok = torch.tensor([token], device=hidden.device)
        out: list[int] = []
        for k in range(n):
            h = self.heads[k](h, self.base.tok_embd(tok), cos, sin)
            tok = self.to_token(self.logits(h, k, w).argmax(-1))  # (1,)
            out.append(int(tok.item()))
        return out


def save_heads(heads: MTPHeads, base_path: Path, provenance: dict) -> Path:
    """Write the heads next to their base file; returns the safetensors path."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().to("cpu").contiguous() for name, p in heads.heads.state_dict().items()}
    if heads.vocab is not None:
        tensors["vocab"] = heads.vocab.to("cpu", torch.int64).contiguous()
    path = heads_path(base_path)
    meta = {"n_mtp": str(heads.n_mtp), "base_sha256": str(provenance.get("base_sha256", ""))}
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
    return heads.to(device=device, dtype=dtype).eval()
