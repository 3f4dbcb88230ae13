"""The KV cache: keys and values of every past position, kept so each new token costs one step.

Without a cache, generating token t means re-running the whole model over all t previous
tokens (quadratic work overall). Keys and values of past positions never change in a
causal model, so we store them once and each decode step only computes the new token's
K and V and attends over the stored ones.

Layout, per layer: `keys[layer]` and `values[layer]` are preallocated tensors of shape

    (B, H_kv, S_max, D)    batch, key/value heads, positions, head_dim

filled from position 0 up to `length`. `valid` (B, S_max) marks which stored positions are
real tokens, so that left-padded batches of different-length prompts can share one cache:
padding positions are stored but never attended to. Preallocating (instead of growing by
`torch.cat` every step) keeps decode free of reallocation and copying.
"""

from __future__ import annotations

import torch


class KVCache:
    """A static, preallocated key/value cache for `n_layers` attention layers."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_positions: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_heads, max_positions, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch, max_positions, dtype=torch.bool, device=device)
        self.max_positions = max_positions
        self.length = 0  # positions filled so far (same for every sequence in the batch)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def append_mask(self, new_valid: torch.Tensor) -> None:
        """Record which of the T positions about to be written are real tokens. new_valid: (B, T) bool.

        Called once per forward pass, before the layers write their keys and values; the
        pass then advances `length` with `advance`.
        """
        T = new_valid.shape[1]
        if self.length + T > self.max_positions:
            raise ValueError(f"KV cache holds {self.max_positions} positions; {self.length} used, {T} more requested")
        self.valid[:, self.length : self.length + T] = new_valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v (B, H_kv, T, D) at positions [length, length+T) and return all keys
        and values so far, (B, H_kv, length+T, D), as views into the cache."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep only / duplicate / permute batch rows (beam search, sequences leaving a batch)."""
        self.keys = [k[batch_indices] for k in self.keys]
        self.values = [v[batch_indices] for v in self.values]
        self.valid = self.valid[batch_indices]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
