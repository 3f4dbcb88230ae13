"""Phi-3 loaded from a tiny transformers-made checkpoint directory vs transformers' Phi3ForCausalLM.

The tiny model has a sliding window of 5 (Phi-3-mini-4k's config has 2047) and the prompts
are longer, so the window changes the result."""

import pytest

from lucidlm.models.phi3 import Phi3
from tiny_hf import (assert_cached_equals_uncached, assert_cuda_graph_decode_matches_reference,
                     assert_greedy_matches_reference, assert_hooks_see_every_block, assert_matches_reference,
                     assert_padded_batch_equals_alone, assert_reference_applies_window, load_ours, random_tokens,
                     save_tiny)

WINDOW = 5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import Phi3Config

    cfg = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, sliding_window=WINDOW, pad_token_id=0,
                     bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("phi3")
    hf = save_tiny(cfg, path)
    return hf, load_ours(path)


def test_loads_fused_projections(pair):
    _, ours = pair
    assert isinstance(ours, Phi3) and ours.config.sliding_window == WINDOW
    assert ours.layers[0].self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert ours.layers[0].mlp.gate_up_proj.weight.shape == (2 * 96, 64)


def test_logits_match_reference_beyond_the_window(pair):
    hf, ours = pair
    tokens = random_tokens(2, 20)
    assert_reference_applies_window(hf, tokens, WINDOW)
    assert_matches_reference(ours, hf, tokens)


def test_cached_decode_equals_uncached(pair):
    _, ours = pair
    assert_cached_equals_uncached(ours, random_tokens(2, 16), prefill=3)


def test_padded_batch_equals_each_alone(pair):
    _, ours = pair
    assert_padded_batch_equals_alone(ours, random_tokens(3, 12), [12, 4, 9])


def test_greedy_generation_matches_reference(pair):
    hf, ours = pair
    assert_greedy_matches_reference(ours, hf, random_tokens(1, 6)[0].tolist())


def test_hook_points_and_logit_lens(pair):
    _, ours = pair
    assert_hooks_see_every_block(ours, random_tokens(2, 9))


def test_cuda_graph_decode_matches_reference(pair):
    hf, ours = pair
    assert_cuda_graph_decode_matches_reference(ours, hf, random_tokens(2, 16), prefill=5)
