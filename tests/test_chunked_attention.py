"""Chunked prefill attention (`lucidlm.models.chunked_attention`) against PyTorch's fused kernel.

The oracle is `F.scaled_dot_product_attention` (with `enable_gqa`) on the same inputs and the
masks the models build (`layers.attention_mask`): causal prompts spanning several query blocks
and a partial last one, a sliding window, left-padded batches, a prompt after cached tokens and a
static cache with empty slots; grouped (3 and 4 query heads per key/value head) and multi-head
attention, 64- and 256-wide heads. In float32 the chunked computation must give the fused
kernel's result to float32 accumulation error; in bfloat16 it is judged against the error of
the fused kernel itself run in bfloat16 (which rounds only q, k and v).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lucidlm.models import chunked_attention as ca
from lucidlm.models.layers import attention_mask, scaled_dot_product_attention


def _case(B, H, H_kv, T, S, D, seed, window=None, left_pad=(), empty_tail=0):
    """q, k, v and the model's mask for T new queries in the last T of S filled key slots
    (the first S - T from a cache), `empty_tail` unfilled slots after them (a static cache), and
    left padding of left_pad[b] slots in row b."""
    g = torch.Generator().manual_seed(seed)
    slots = S + empty_tail
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, H_kv, slots, D, generator=g)
    v = torch.randn(B, H_kv, slots, D, generator=g)
    valid = torch.ones(B, slots, dtype=torch.bool)
    valid[:, S:] = False
    for b, pad in enumerate(left_pad):
        valid[b, :pad] = False
    mask = attention_mask(valid, torch.arange(S - T, S), window=window, may_skip=False)
    return q, k, v, mask


CASES = {
    # name: (B, H, H_kv, T, S, D, window, left_pad, empty_tail)
    "causal-gqa-3-blocks-and-tail": (1, 9, 3, 3 * ca.QUERY_BLOCK + 37, 3 * ca.QUERY_BLOCK + 37, 64, None, (), 0),
    "mha": (1, 4, 4, ca.QUERY_BLOCK + 5, ca.QUERY_BLOCK + 5, 64, None, (), 0),
    "mqa-wide-heads": (1, 4, 1, 2 * ca.QUERY_BLOCK, 2 * ca.QUERY_BLOCK, 256, None, (), 0),
    "sliding-window": (1, 4, 1, 3 * ca.QUERY_BLOCK, 3 * ca.QUERY_BLOCK, 64, 100, (), 0),
    "left-padded-batch": (3, 8, 2, ca.QUERY_BLOCK + 20, ca.QUERY_BLOCK + 20, 64, None, (0, 7, 140), 0),
    "after-cached-tokens": (1, 9, 3, ca.QUERY_BLOCK + 9, ca.QUERY_BLOCK + 9 + 50, 64, None, (), 0),
    "static-cache-empty-slots": (2, 9, 3, ca.QUERY_BLOCK, ca.QUERY_BLOCK + 30, 64, 64, (0, 12), 90),
}


@pytest.mark.parametrize("name", CASES)
def test_float32_equals_fused_kernel(name):
    B, H, H_kv, T, S, D, window, left_pad, empty_tail = CASES[name]
    q, k, v, mask = _case(B, H, H_kv, T, S, D, seed=len(name), window=window, left_pad=left_pad, empty_tail=empty_tail)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5, enable_gqa=True)
    got = ca.chunked_attention(q, k, v, mask, D**-0.5, dtype=torch.float32)
    assert got.shape == expected.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_error_near_the_fused_kernels_own(name):
    """bfloat16 rounds the scores and the weights as well as q, k, v: its error from the float32
    result may exceed that of the fused kernel given bfloat16 inputs, but by a small factor."""
    B, H, H_kv, T, S, D, window, left_pad, empty_tail = CASES[name]
    q, k, v, mask = _case(B, H, H_kv, T, S, D, seed=len(name) + 100, window=window, left_pad=left_pad,
                          empty_tail=empty_tail)
    q = q * 2  # scores with a spread of a few units, as in trained models
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=D**-0.5,
                                           enable_gqa=True)
    fused = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask,
                                           scale=D**-0.5, enable_gqa=True).double()
    got = ca.chunked_attention(q, k, v, mask, D**-0.5, dtype=torch.bfloat16).double()
    fused_err, err = (fused - exact).abs(), (got - exact).abs()
    assert err.mean() <= 2.5 * fused_err.mean(), (float(err.mean()), float(fused_err.mean()))
    assert err.max() <= 0.1, float(err.max())


def test_dispatch():
    """Models opt in with `prefill_dtype`; short passes, decode steps and unmasked calls keep the
    fused kernel, and so does a traced (compiled) pass."""
    n = ca.FROM_QUERIES
    q, k, v, mask = _case(1, 4, 2, n, n, 64, seed=3)
    assert ca.applies(q, mask, torch.bfloat16)
    assert not ca.applies(q, mask, None)
    assert not ca.applies(q[:, :, 1:], mask[:, :, 1:], torch.bfloat16)
    assert not ca.applies(q, None, torch.bfloat16)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    exact, _ = scaled_dot_product_attention(q, k, v, mask, scale=0.125)
    assert torch.equal(exact, expected)  # not opted in: the fused kernel itself
    chunked, weights = scaled_dot_product_attention(q, k, v, mask, scale=0.125, prefill_dtype=torch.float32)
    assert weights is None
    torch.testing.assert_close(chunked, expected, atol=2e-6, rtol=1e-5)
    # The explicit path (attention patterns for introspection) wins over the opt-in.
    _, weights = scaled_dot_product_attention(q, k, v, mask, scale=0.125, explicit=True, prefill_dtype=torch.bfloat16)
    assert weights is not None and weights.shape == (1, 4, n, n)

    @torch.compile(backend="eager", fullgraph=True)
    def traced(q, mask):
        return ca.applies(q, mask, torch.bfloat16)

    assert traced(q, mask) is False
