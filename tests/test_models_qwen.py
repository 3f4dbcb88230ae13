"""Qwen2 (q/k/v biases) and Qwen3 (QK-norm, explicit head_dim, tied head) loaded from tiny
transformers-made checkpoint directories vs transformers' own models."""

import pytest
import torch

from lucidlm.models.qwen3 import Qwen3
from tiny_hf import (assert_cached_equals_uncached, assert_cuda_graph_decode_matches_reference,
                     assert_greedy_matches_reference, assert_hooks_see_every_block, assert_matches_reference,
                     assert_padded_batch_equals_alone, load_ours, random_tokens, save_tiny)


def _qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def _qwen3_config():
    from transformers import Qwen3Config

    # head_dim 32 with 4 heads in a 64-wide model: H·D = 128 != C, as in real Qwen3 models.
    return Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def pair(request, tmp_path_factory):
    cfg = _qwen2_config() if request.param == "qwen2" else _qwen3_config()
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(cfg, path)
    return hf, load_ours(path)


def test_family_specific_weights(pair):
    hf, ours = pair
    attn = ours.layers[0].self_attn
    if ours.config.architecture == "qwen2":
        assert attn.q_proj.bias is not None and attn.o_proj.bias is None
        torch.testing.assert_close(attn.k_proj.bias, hf.model.layers[0].self_attn.k_proj.bias)
    else:
        assert isinstance(ours, Qwen3) and ours.config.head_dim == 32
        assert attn.q_norm.weight.shape == (32,) and attn.q_proj.bias is None
        assert ours.lm_head.weight is ours.embed_tokens.weight


def test_logits_match_reference(pair):
    hf, ours = pair
    assert_matches_reference(ours, hf, random_tokens(2, 20))


def test_cached_decode_equals_uncached(pair):
    _, ours = pair
    assert_cached_equals_uncached(ours, random_tokens(2, 16), prefill=5)


def test_padded_batch_equals_each_alone(pair):
    _, ours = pair
    assert_padded_batch_equals_alone(ours, random_tokens(3, 12), [12, 5, 9])


def test_greedy_generation_matches_reference(pair):
    hf, ours = pair
    assert_greedy_matches_reference(ours, hf, random_tokens(1, 6)[0].tolist())


def test_hook_points_and_logit_lens(pair):
    _, ours = pair
    assert_hooks_see_every_block(ours, random_tokens(2, 9))


def test_cuda_graph_decode_matches_reference(pair):
    hf, ours = pair
    assert_cuda_graph_decode_matches_reference(ours, hf, random_tokens(2, 16), prefill=5)
