"""The KV cache: keys and values of every layer, written by absolute position.

It owns the storage and the bounds check and nothing else: it does not know how many
positions are valid (the caller passes `start_pos`, so a speculative verifier can rewind by
simply writing over rejected positions) and it never computes attention.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        n_ctx: int,
        n_batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layer, n_batch, n_kv_head, n_ctx, head_dim)  # (L, B, H_kv, S, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_ctx = n_ctx

    @property
    def n_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) at positions [start_pos, start_pos + T).

        Returns views of every position up to the last one written, (B, H_kv, start_pos + T, D):
        what the queries of this step may attend to.
        """
        end = start_pos + k.shape[2]
        if start_pos < 0 or end > self.n_ctx:
            raise IndexError(f"positions [{start_pos}, {end}) do not fit a KV cache of {self.n_ctx}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
