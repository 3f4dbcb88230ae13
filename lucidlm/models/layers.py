"""Primitives shared by the model families: norms, rotary embeddings, masks, attention.

Dimension letters used in shape comments throughout LucidLM:

    B  batch            T  new positions in this pass      S  all key positions (past + new)
    H  query heads      H_kv  key/value heads              D  head_dim
    C  d_model (residual width)     F  feed-forward width  V  vocabulary size
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight  (Zhang & Sennrich 2019, arXiv:1910.07467).

    Computed in float32 whatever the activation dtype, because the mean of squares of
    a wide vector loses precision in half types.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class Embedding(nn.Module):
    """Token id -> row of a (V, C) table. Like nn.Embedding, but with no random
    initialisation: weights always come from a checkpoint, and skipping the init keeps
    model construction on the `meta` device instant."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, arXiv:2104.09864), "rotate half" layout.

    Dimension pair (i, i + D/2) of every query and key head is rotated by the angle
    position * base^(-2i/D). Rotating both q and k makes their dot product depend only
    on the distance between positions. cos/sin tables are built once for all positions.
    """

    def __init__(self, head_dim: int, base: float, max_positions: int):
        super().__init__()
        self.head_dim, self.base, self.max_positions = head_dim, base, max_positions
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each (S_max, D) float32, built on first use (not at construction, so a
        model can be created on the `meta` device and loaded without rebuilding them)."""
        if self._tables is None or self._tables[0].device != device:
            D = self.head_dim
            inv_freq = 1.0 / (self.base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
            angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)  # (S_max, D/2)
            angles = torch.cat([angles, angles], dim=-1)  # (S_max, D): same angle for i and i + D/2
            self._tables = (angles.cos().float().to(device), angles.sin().float().to(device))
        return self._tables

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); positions: (B, T) absolute positions -> rotated x, same shape."""
        cos_table, sin_table = self.tables(x.device)
        cos = cos_table[positions].unsqueeze(1).to(x.dtype)  # (B, 1, T, D)
        sin = sin_table[positions].unsqueeze(1).to(x.dtype)
        half = x.shape[-1] // 2
        rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated_half * sin


def token_positions(valid: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Absolute positions of the T new tokens: how many real tokens precede each one.

    valid: (B, start + T) bool over all stored positions, False for left padding. Padding
    slots get position 0 (their outputs are never used).
    """
    counts = valid.long().cumsum(dim=1) - 1  # (B, start+T)
    return counts[:, start : start + T].clamp(min=0)


def attention_mask(valid: torch.Tensor, start: int, T: int, window: int | None = None) -> torch.Tensor | None:
    """Which keys each new query may attend to, as a (B, 1, T, S) bool mask (True = attend).

    A query at cache index start+t sees keys at index <= start+t (causal), that are real
    tokens (not padding) and, with a sliding window, fewer than `window` positions back.
    Padding queries are allowed to see themselves so no softmax row is empty (an empty row
    would produce NaN). Returns None when nothing needs masking (one new token, no padding,
    no window): the fused kernel then runs unmasked.
    """
    S = start + T
    if T == 1 and window is None and bool(valid[:, :S].all()):
        return None
    query_index = torch.arange(start, S, device=valid.device)[:, None]  # (T, 1)
    key_index = torch.arange(S, device=valid.device)[None, :]  # (1, S)
    allowed = key_index <= query_index  # (T, S)
    if window is not None:
        allowed = allowed & (key_index > query_index - window)
    allowed = allowed[None] & valid[:, None, :S]  # (B, T, S)
    allowed = allowed | (key_index == query_index)[None]
    return allowed[:, None]  # (B, 1, T, S)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                                 scale: float, explicit: bool = False):
    """softmax(q kᵀ · scale + mask) v, with grouped-query attention.

    q: (B, H, T, D); k, v: (B, H_kv, S, D) where H is a multiple of H_kv (each key/value head
    is shared by H / H_kv query heads); mask: (B, 1, T, S) bool or None.
    Returns (out (B, H, T, D), weights (B, H, T, S) or None).

    The default path is PyTorch's fused kernel, which never materialises the (T, S)
    weights. `explicit=True` computes them step by step so they can be looked at; both
    paths compute the same function.
    """
    if not explicit:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out, None
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return weights @ v, weights


class SwiGLU(nn.Module):
    """Gated feed-forward: down(silu(gate(x)) * up(x))  (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
