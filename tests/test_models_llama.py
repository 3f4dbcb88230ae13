"""LucidLM's Llama forward pass on the real SmolLM2 GGUF vs HF transformers on the same file.

Both sides see the same token ids (from the reference tokenizer; our tokenizer is tested
separately) and dequantize the same quantized weights to float32, so the only
differences are float32 summation order: we require max |Δlogit| <= 1e-3 at every
position and identical argmax.
"""

import pytest
import torch

from lucidlm.generate import generate_tokens
from lucidlm.sampling import SamplingParams, make_sampler
from prompts import PROMPTS

pytestmark = pytest.mark.slow

LOGIT_ATOL = 1e-3  # float32 reordering over 30 layers; observed ~1e-4
GREEDY_TOKENS = 48
NEAR_TIE = 1e-4  # a top-2 margin below this makes a greedy divergence a coin flip


@pytest.fixture(scope="module")
def reference_logits(hf_smollm_model, hf_smollm_tokenizer):
    out = {}
    with torch.inference_mode():
        for name, text in PROMPTS.items():
            ids = hf_smollm_tokenizer(text).input_ids
            out[name] = (ids, hf_smollm_model(torch.tensor([ids])).logits[0].float())
    return out


def test_passage_is_long(reference_logits):
    assert len(reference_logits["passage"][0]) >= 500


@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_match_reference(lucid_smollm, reference_logits, name):
    ids, expected = reference_logits[name]
    actual = lucid_smollm.logits(ids)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("name", ["prose", "code"])
def test_explicit_attention_matches_fused(lucid_smollm, reference_logits, name):
    ids, expected = reference_logits[name]
    layers = lucid_smollm.model.layers
    try:
        for block in layers:
            block.self_attn.explicit = True
        explicit = lucid_smollm.logits(ids)
    finally:
        for block in layers:
            block.self_attn.explicit = False
    torch.testing.assert_close(explicit, expected, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(explicit, lucid_smollm.logits(ids), atol=1e-4, rtol=0)


def _ours_greedy(lucid, ids, n, use_cache=True):
    steps = generate_tokens(lucid.model, ids, make_sampler(SamplingParams()), n, stop_ids=(), use_cache=use_cache)
    return [s.token_id for s in steps]


@pytest.mark.parametrize("name", ["prose", "code", "numbers", "non_english", "passage", "chat"])
def test_greedy_continuation_matches_reference(lucid_smollm, hf_smollm_model, reference_logits, name):
    ids, _ = reference_logits[name]
    with torch.inference_mode():
        hf_out = hf_smollm_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          max_new_tokens=GREEDY_TOKENS, min_new_tokens=0, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
    expected = hf_out[0, len(ids):].tolist()
    actual = _ours_greedy(lucid_smollm, ids, GREEDY_TOKENS)
    if actual != expected:
        # Allowed only at a genuine near-tie of the reference's own logits.
        k = next(i for i, (a, b) in enumerate(zip(actual, expected)) if a != b)
        with torch.inference_mode():
            logits = hf_smollm_model(torch.tensor([ids + expected[:k]])).logits[0, -1]
        top2 = logits.topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin < NEAR_TIE, f"greedy diverges at step {k} although the reference's top-2 margin is {margin:.2e}"
        pytest.skip(f"near-tie at step {k}: reference top-2 margin {margin:.2e} < {NEAR_TIE}")
    assert len(actual) == GREEDY_TOKENS


def test_cached_decode_equals_uncached(lucid_smollm, reference_logits):
    ids, _ = reference_logits["code"]
    sampler_params = SamplingParams()
    cached = list(generate_tokens(lucid_smollm.model, ids, make_sampler(sampler_params), 16, use_cache=True))
    uncached = list(generate_tokens(lucid_smollm.model, ids, make_sampler(sampler_params), 16, use_cache=False))
    assert [s.token_id for s in cached] == [s.token_id for s in uncached]
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def test_batch_of_different_lengths_equals_each_alone(lucid_smollm, reference_logits):
    """Left-padded batch with a mask, prefilled into one KV cache and decoded two steps."""
    model = lucid_smollm.model
    prompts = [reference_logits[n][0] for n in ("prose", "numbers", "non_english")]
    prompts = [prompts[0], prompts[1][:7], prompts[2]]
    T = max(len(p) for p in prompts)
    pad = 0
    tokens = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    next_tokens = torch.tensor([[11], [22], [33]])
    with torch.inference_mode():
        cache = model.new_cache(len(prompts), T + 2)
        batch_prefill = model(tokens, cache, valid)
        batch_step = model(next_tokens, cache)
        for b, p in enumerate(prompts):
            alone_cache = model.new_cache(1, len(p) + 2)
            alone_prefill = model(torch.tensor([p]), alone_cache)
            alone_step = model(next_tokens[b : b + 1], alone_cache)
            torch.testing.assert_close(batch_prefill[b, T - len(p):], alone_prefill[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(batch_step[b], alone_step[0], atol=1e-4, rtol=0)
