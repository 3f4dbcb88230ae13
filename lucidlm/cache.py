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
`torch.cat` every step) keeps decode free of reallocation and copying. The tensors' dtype is
the model's choice (`new_cache`): its activations' dtype, or float16 in packed models on CPUs
where our decode attention kernel reads float16 (half the bytes a step reads at long contexts).

Two ways to address the stored positions. Ordinarily a pass writes into slots
[length, length + T) by slicing with the host integer `length`, and attention reads the
`length + T` slots in use: tensor shapes grow by one position per step. A *static* cache
(`make_static`) keeps the write position also on the device (`slot`, a 0-dim tensor),
writes with `index_copy_` at it and lets attention read all `max_positions` slots, the
unwritten ones masked out. Then every decode step has the same shapes and the same tensor
addresses, which is what a CUDA graph needs to replay it (`lucidlm.cuda_graphs`).
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
        self.slot: torch.Tensor | None = None  # static caches: `length` on the device (0-dim long)
        self._slots: torch.Tensor | None = None  # (T,) slots of the pass in progress

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def static(self) -> bool:
        return self.slot is not None

    def make_static(self) -> None:
        """From now on, write at the device-side `slot` and expose every slot (see the module docstring)."""
        if self.slot is None:
            self.slot = torch.tensor(self.length, device=self.valid.device)

    def check_room(self, n: int) -> None:
        """Raise a clear error if `n` more positions do not fit."""
        if self.length + n > self.max_positions:
            raise ValueError(f"KV cache holds {self.max_positions} positions; {self.length} used, {n} more requested")

    def begin(self, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a pass of T new positions. new_valid: (B, T) bool, False for padding.

        Records which new positions are real and returns (keys_valid (B, S), query_slots (T,)):
        the validity of every key slot the pass attends over, and the slot each new position
        is written to. The layers then `update` with their keys and values, and the pass ends
        with `advance(T)`.
        """
        T = new_valid.shape[1]
        self.check_room(T)
        if self.slot is None:
            self._slots = torch.arange(self.length, self.length + T, device=self.valid.device)
            self.valid[:, self.length : self.length + T] = new_valid
            return self.valid[:, : self.length + T], self._slots
        self._slots = self.slot + torch.arange(T, device=self.valid.device)  # (T,), computed on the device
        self.valid.index_copy_(1, self._slots, new_valid)
        return self.valid, self._slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v (B, H_kv, T, D) in this pass's slots and return the keys and values
        to attend over, (B, H_kv, S, D), as views into the cache: S = length + T slots in use, or
        all `max_positions` for a static cache. The first pass into an empty cache (a prompt)
        attends over k and v themselves, as computed: the same keys and values, unless the cache
        rounds them to a narrower dtype (a float16 cache under float32 activations), and then the
        prompt's logits are still the uncached forward pass's."""
        if self.slot is None:
            end = self.length + k.shape[2]
            self.keys[layer][:, :, self.length : end] = k
            self.values[layer][:, :, self.length : end] = v
            if self.length == 0:
                return k, v
            return self.in_use(layer, k.shape[2])
        self.keys[layer].index_copy_(2, self._slots, k.to(self.keys[layer].dtype))  # (index_copy_ does not convert)
        self.values[layer].index_copy_(2, self._slots, v.to(self.values[layer].dtype))
        return self.keys[layer], self.values[layer]

    def in_use(self, layer: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of a layer's keys and values over the slots in use once a pass of `new` positions is
        stored, (B, H_kv, length + new, D): what `update` returns after writing them, for a kernel that
        writes them itself (`cpu_decode.rope_and_store`, in direct decode steps). Not for static caches."""
        end = self.length + new
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
        if self.slot is not None:
            self.slot += n  # on the device: a replayed CUDA graph advances it too (the host count is its owner's job)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (prompt lookup drops the K/V of rejected guesses).
        Nothing needs erasing: the next pass writes those slots again, and until then no query
        sees them, since a query attends only to slots up to its own (also in a static cache)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if self.slot is not None:
            self.slot -= self.length - length
        self.length = length

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep only / duplicate / permute batch rows (beam search, sequences leaving a batch).

        A static cache whose batch size stays the same is permuted in place, so that a CUDA
        graph captured on its tensors stays valid; otherwise the tensors are new ones.
        """
        if self.slot is not None and batch_indices.shape[0] == self.batch_size:
            for t in self.keys + self.values + [self.valid]:
                t.copy_(t[batch_indices])
            return
        self.keys = [k[batch_indices] for k in self.keys]
        self.values = [v[batch_indices] for v in self.values]
        self.valid = self.valid[batch_indices]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
