"""Attention over a long prompt in bfloat16, one block of queries at a time (CPU prefill).

PyTorch's fused CPU attention kernel runs a 512-token SmolLM2 layer in ~3.5 ms whether its
inputs are float32 or bfloat16: a third of a packed model's prefill on a 2-core AVX-512 CPU.
Written as two batched matmuls and a softmax in bfloat16 (AVX-512 BF16 dot products into
float32), the same layer takes ~1.5 ms, and Gemma 3's (256-wide heads) 5.3 -> 1.6 ms, provided
that the (T, S) scores are never materialised whole (they would stream through memory twice
in float32) and that masked-out keys are not computed at all:

    for each block of QUERY_BLOCK queries:
        keys [lo, hi) = the span any of its queries may see (causal: up to the block's end;
                        a sliding window: from the window's start)
        scores  = q_block k[lo:hi]ᵀ                 bfloat16 matmul, float32 accumulation
        weights = softmax(scores, masked)           computed in float32, stored as bfloat16
        out     = weights v[lo:hi]

Grouped-query attention costs no copies: the g = H / H_kv query heads that share a key/value
head are laid out as g consecutive rows per position, so one matmul per key/value head covers
them all. The result is the fused kernel's up to bfloat16 rounding of q, k, v, the scores and
the weights (`bench/quality.py` measures the next-token KL of the packed path that uses it);
models take this path only where they opted in (`prefill_dtype`), never on the exact float32 path.
"""

from __future__ import annotations

import torch

QUERY_BLOCK = 128  # queries per block: 32 and 64 were slower for both models' layers (bench/RESULTS.md)
FROM_QUERIES = 128  # shorter passes (and every decode step) keep the fused kernel


def applies(q: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype | None) -> bool:
    """Whether this pass takes the chunked path: a model opted in, a long prompt, on CPU, eager."""
    return (dtype is not None and q.shape[2] >= FROM_QUERIES and q.device.type == "cpu"
            and mask is not None and not torch.compiler.is_compiling())


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) v computed in `dtype`, QUERY_BLOCK queries at a time.

    q: (B, H, T, D); k, v: (B, H_kv, S, D); mask: (B, 1, T, S) bool, True = attend (every row
    allows at least one key, as `layers.attention_mask` guarantees). Returns (B, H, T, D) in
    q's dtype, as a transposed view of a (B, T, H, D) tensor (the callers' next step).
    """
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    g = H // H_kv
    # q as (B, H_kv, T, g, D): for one key/value head, each position's g query heads are
    # consecutive rows. Scaled here, once, rather than on the (T, S) scores.
    q_rows = torch.empty(B, H_kv, T, g, D, dtype=dtype)
    torch.mul(q.view(B, H_kv, g, T, D).transpose(2, 3), scale, out=q_rows)
    k_t = k.to(dtype).transpose(2, 3).reshape(B * H_kv, D, S)
    v = v.to(dtype).reshape(B * H_kv, S, D)
    out = torch.empty(B, T, H_kv, g, D, dtype=q.dtype)
    for start in range(0, T, QUERY_BLOCK):
        stop = min(T, start + QUERY_BLOCK)
        n = stop - start
        allowed = mask[:, :, start:stop]  # (B, 1, n, S)
        by_key = allowed.flatten(0, 2)  # (B * n, S)
        seen = by_key.any(dim=0).nonzero()  # key slots any query here sees: [lo, hi)
        lo, hi = int(seen[0]), int(seen[-1]) + 1
        queries = q_rows[:, :, start:stop].reshape(B * H_kv, n * g, D)
        scores = torch.bmm(queries, k_t[:, :, lo:hi]).view(B, H_kv, n, g, hi - lo)
        # Only the keys that some query here may not see need masking: with a causal mask, the
        # block's own diagonal (a sliding window adds its left edge).
        hidden = (~by_key[:, lo:hi]).any(dim=0).nonzero()
        if len(hidden):
            a, b = int(hidden[0]), int(hidden[-1]) + 1
            scores[..., a:b].masked_fill_(~allowed[:, :, :, None, lo + a:lo + b], float("-inf"))
        weights = torch.softmax(scores, -1).view(B * H_kv, n * g, hi - lo)  # (bfloat16 in and out, float32 sums)
        out[:, start:stop] = torch.bmm(weights, v[:, lo:hi]).view(B, H_kv, n, g, D).transpose(1, 2)
    return out.view(B, T, H, D).transpose(1, 2)
