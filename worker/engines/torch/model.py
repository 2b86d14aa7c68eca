"""A compact llama-family decoder in PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU
feed-forward, and a Mixtral-style mixture of experts with top-k routing.

It owns the arithmetic of one forward pass, written to agree with llama.cpp's `llama`
architecture: RoPE rotates adjacent pairs (llama.cpp's LLAMA_ROPE_TYPE_NORM, which GGUF's
converter prepares Q and K for), norms are computed in float32, and MoE weights are the
softmax over the chosen experts. It does not know about files (gguf_loader.py builds it),
tokenizers, timers or sampling: callers get logits and hidden states and choose.

Shapes: B batch, T new tokens, S positions attended to (cached + new), E n_embd, H n_head,
H_kv n_kv_head, D head_dim, V n_vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.engines.torch.kv_cache import KVCache


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    n_ff: int
    n_vocab: int
    head_dim: int = 0  # 0: n_embd // n_head
    n_rot: int = 0  # dimensions of each head that RoPE rotates; 0: all of head_dim
    rope_base: float = 10000.0
    rope_freq_scale: float = 1.0  # linear RoPE scaling: positions are multiplied by this
    norm_eps: float = 1e-5
    n_expert: int = 0  # 0: a dense SwiGLU FFN in every layer
    n_expert_used: int = 0
    n_ctx_train: int = 0

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if not self.n_rot:
            object.__setattr__(self, "n_rot", self.head_dim)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.n_rot % 2 or self.n_rot > self.head_dim:
            raise ValueError(f"n_rot {self.n_rot} must be even and at most head_dim {self.head_dim}")
        if self.n_expert and not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError(f"n_expert_used {self.n_expert_used} must be in 1..n_expert ({self.n_expert})")


class Linear(nn.Linear):
    """nn.Linear without bias, multiplied by F.linear (MKL on the CPU) at every row count.

    It replaced routing of 1-3-row products between MKL and oneDNN prepacked weights through
    private oneDNN ops (mkldnn._linear_pointwise) and process-wide state (issue 12): only public APIs here.
    Decode speed before and after is in the README's paragraph on the torch engine's CPU path."""


class RMSNorm(nn.Module):
    def __init__(self, n_embd: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # Fused: a decode step runs 61 norms, and on a CPU each operation has its overhead.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # The mean of squares in float32 even for bf16 activations, as llama.cpp does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Angle per position of each rotated pair, (n_rot / 2,), in float64."""
    # On the CPU explicitly: the loader builds the model under torch.device("meta").
    i = torch.arange(0, config.n_rot, 2, dtype=torch.float64, device="cpu")
    inv_freq = config.rope_base ** (-i / config.n_rot) * config.rope_freq_scale
    if freq_factors is not None:
        # Llama 3's long-context scaling: some frequencies are divided by a per-pair factor.
        inv_freq = inv_freq / freq_factors.to("cpu", torch.float64)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first n_rot dims of each head.

    x: (B, T, H, D); cos, sin: (T, n_rot / 2). Adjacent pairs, not the two halves that HF's
    rotate_half uses: the GGUF converter permutes the rows of Q and K so that this layout
    gives the same result as the original checkpoint.
    """
    n_rot = cos.shape[-1] * 2
    if x.dtype == torch.float32 and n_rot == x.shape[-1]:
        # The same four products as below in three operations: each pair as a complex number
        # times cos + i sin. A decode step runs this 60 times, and on a CPU each operation's
        # overhead counts against 25 ms of matrix products.
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # (B, T, H, n_rot / 2)
        return torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).flatten(-2)
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    pairs = rot.float().unflatten(-1, (-1, 2))  # (B, T, H, n_rot / 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos = cos[:, None, :]  # (T, 1, n_rot / 2): broadcast over heads
    sin = sin[:, None, :]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.wq = Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.wk = Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.wv = Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.wo = Linear(config.n_head * config.head_dim, config.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int,
        cache: KVCache | None,
        layer: int,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), cos, sin)  # (B, T, H, D)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), cos, sin)  # (B, T, H_kv, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, H_kv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H*, T, D)
        if cache is not None:
            k, v = cache.write(layer, start_pos, k, v)  # (B, H_kv, S, D)
        if T == 1 and key_valid is None:
            mask = None  # one new token sees every position written so far
        else:
            S = k.shape[2]
            q_pos = torch.arange(S - T, S, device=x.device)[:, None]
            k_pos = torch.arange(S, device=x.device)[None, :]
            mask = k_pos <= q_pos  # (T, S): causal, offset by the cached positions
            if key_valid is not None:
                # Padding is hidden from every query; a padding query still sees itself, since
                # a row with nothing to attend to is NaN and NaN would leak through the values.
                mask = mask & key_valid[:, None, None, :S] | (k_pos == q_pos)  # (B, 1, T, S)
        # enable_gqa maps query head h to kv head h // (H / H_kv), as llama.cpp does.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, n_embd: int, n_ff: int) -> None:
        super().__init__()
        self.w_gate = Linear(n_embd, n_ff, bias=False)
        self.w_up = Linear(n_embd, n_ff, bias=False)
        self.w_down = Linear(n_ff, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


# --- Mixture of experts -------------------------------------------------------------------
# N  tokens routed in one call (B * T, flattened)
# E  n_embd
# F  n_ff of one expert
# X  n_expert, the experts in the layer
# K  n_expert_used, the experts each token is sent to
# Each token runs only its K experts: tokens are grouped by expert, each expert runs once on
# its group, and results are scattered back weighted by the router. The cost of a step grows
# with K, not X, which is the point of an MoE and what a benchmark of one must reproduce.


class MoE(nn.Module):
    def __init__(self, n_embd: int, n_ff: int, n_expert: int, n_expert_used: int) -> None:
        super().__init__()
        self.n_expert, self.n_expert_used = n_expert, n_expert_used
        self.router = Linear(n_embd, n_expert, bias=False)
        # Stacked like GGUF's ffn_*_exps tensors, so loading is one copy per tensor.
        self.w_gate = nn.Parameter(torch.empty(n_expert, n_ff, n_embd))  # (X, F, E)
        self.w_up = nn.Parameter(torch.empty(n_expert, n_ff, n_embd))  # (X, F, E)
        self.w_down = nn.Parameter(torch.empty(n_expert, n_embd, n_ff))  # (X, E, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, E)
        top_logits, top_expert = self.router(x).topk(self.n_expert_used, dim=-1)  # (N, K)
        # Softmax over all X then renormalised over the K chosen equals softmax over the K.
        top_weight = F.softmax(top_logits.float(), dim=-1).to(x.dtype)  # (N, K)

        flat_expert = top_expert.flatten()  # (N * K,): slot n * K + k is token n's k-th choice
        order = torch.argsort(flat_expert, stable=True)  # slots grouped by expert
        counts = torch.bincount(flat_expert, minlength=self.n_expert).tolist()  # (X,)
        flat_weight = top_weight.flatten()
        out = torch.zeros_like(x)  # (N, E)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slots = order[start:start + n]  # (n,)
            start += n
            tokens = slots // self.n_expert_used  # (n,)
            h = x[tokens]  # (n, E)
            h = F.silu(h @ self.w_gate[e].T) * (h @ self.w_up[e].T)  # (n, F)
            h = h @ self.w_down[e].T  # (n, E)
            h = h * flat_weight[slots, None]
            out.index_add_(0, tokens, h)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn: nn.Module = (
            MoE(config.n_embd, config.n_ff, config.n_expert, config.n_expert_used)
            if config.n_expert
            else FeedForward(config.n_embd, config.n_ff)
        )

    def forward(self, x, cos, sin, start_pos: int, cache: KVCache | None, layer: int,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, start_pos, cache, layer, key_valid)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, tied_output: bool = False, freq_factors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.tok_embd = nn.Embedding(config.n_vocab, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = Linear(config.n_embd, config.n_vocab, bias=False)
        if tied_output:
            self.output.weight = self.tok_embd.weight
        # A plain attribute, not a buffer: Module.to(dtype) would cast a buffer to bf16 and
        # ruin the angles; _rope_tables moves it to the weights' device instead.
        self.inv_freq = rope_inv_freq(config, freq_factors)

    def new_cache(self, n_ctx: int, n_batch: int = 1) -> KVCache:
        c = self.config
        return KVCache(
            c.n_layer, c.n_kv_head, c.head_dim, n_ctx, n_batch,
            dtype=self.tok_embd.weight.dtype, device=self.tok_embd.weight.device,
        )

    def _rope_tables(self, start_pos: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.tok_embd.weight.device
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        # float64 angles: at positions in the tens of thousands float32 loses the low bits.
        pos = torch.arange(start_pos, start_pos + n_tokens, dtype=torch.float64, device=device)
        angles = pos[:, None] * self.inv_freq[None, :]  # (T, n_rot / 2)
        return angles.cos().float(), angles.sin().float()

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        all_logits: bool = True,
        key_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run tokens (B, T) placed at positions [start_pos, start_pos + T).

        With a cache, keys and values are written there and the tokens attend to every earlier
        position in it; without one, start_pos must be 0 and attention is over `tokens` alone.
        Returns (logits, hidden): logits (B, T, V), or (B, 1, V) for the last position only
        when all_logits is False (prefill has no use for the others); hidden (B, T, E) is the
        final normalised hidden state of every position.

        key_valid (B, S), for batches of unequal sequences (left-padded): False at padding
        positions, which no query attends to; S covers every position attended to so far.
        """
        if cache is None and start_pos != 0:
            raise ValueError("without a KV cache the tokens must start at position 0")
        T = tokens.shape[1]
        cos, sin = self._rope_tables(start_pos, T)
        x = self.tok_embd(tokens)  # (B, T, E)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, start_pos, cache, layer, key_valid)
        hidden = self.norm(x)  # (B, T, E)
        logits = self.output(hidden if all_logits else hidden[:, -1:])  # (B, T or 1, V)
        return logits, hidden
