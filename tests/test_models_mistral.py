"""Mistral loaded from a tiny transformers-made checkpoint directory vs transformers' MistralForCausalLM,
with a sliding window of 4 and prompts longer than it."""

import pytest

from lucidlm.models.llama import Llama
from tiny_hf import (assert_cached_equals_uncached, assert_cuda_graph_decode_matches_reference,
                     assert_greedy_matches_reference, assert_hooks_see_every_block, assert_matches_reference,
                     assert_padded_batch_equals_alone, assert_reference_applies_window, load_ours, random_tokens,
                     save_tiny)

WINDOW = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import MistralConfig

    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=WINDOW, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("mistral")
    hf = save_tiny(cfg, path)
    return hf, load_ours(path)


def test_loads_with_window(pair):
    _, ours = pair
    assert isinstance(ours, Llama) and ours.config.architecture == "mistral" and ours.config.sliding_window == WINDOW


def test_logits_match_reference_beyond_the_window(pair):
    hf, ours = pair
    tokens = random_tokens(2, 20)
    assert_reference_applies_window(hf, tokens, WINDOW)
    assert_matches_reference(ours, hf, tokens)


def test_cached_decode_equals_uncached(pair):
    _, ours = pair
    assert_cached_equals_uncached(ours, random_tokens(2, 16), prefill=2)


def test_padded_batch_equals_each_alone(pair):
    _, ours = pair
    assert_padded_batch_equals_alone(ours, random_tokens(3, 12), [12, 3, 9])


def test_greedy_generation_matches_reference(pair):
    hf, ours = pair
    assert_greedy_matches_reference(ours, hf, random_tokens(1, 6)[0].tolist())


def test_hook_points_and_logit_lens(pair):
    _, ours = pair
    assert_hooks_see_every_block(ours, random_tokens(2, 9))


def test_cuda_graph_decode_matches_reference(pair):
    hf, ours = pair
    assert_cuda_graph_decode_matches_reference(ours, hf, random_tokens(2, 16), prefill=5)


def test_decode_steps_read_only_the_window(pair, monkeypatch):
    """Past the window a decode step's attention gets only the last WINDOW key slots (the others are
    masked anyway: `layers.window_of_keys`), and still matches the uncached logits (above)."""
    import torch

    import lucidlm.models.llama as llama

    _, ours = pair
    seen = []
    real = llama.scaled_dot_product_attention
    monkeypatch.setattr(llama, "scaled_dot_product_attention",
                        lambda q, k, v, mask, **kw: seen.append((q.shape[2], k.shape[2])) or real(q, k, v, mask, **kw))
    tokens = random_tokens(1, 10)
    with torch.inference_mode():
        cache = ours.new_cache(1, 10)
        ours(tokens[:, :6], cache)
        for t in range(6, 10):
            ours(tokens[:, t:t + 1], cache)
    assert seen[:2] == [(6, 6)] * 2  # the prompt pass: every slot (its queries need different windows)
    assert seen[2:] == [(1, WINDOW)] * 8  # 4 steps x 2 layers
