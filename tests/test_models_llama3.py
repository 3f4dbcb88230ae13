"""Llama from a Hugging Face directory (a tiny transformers-made checkpoint) and Llama 3.1's
RoPE frequency scaling, as pure functions against transformers' own."""

import pytest
import torch

from lucidlm.models.layers import FrequencyRotaryEmbedding, llama3_scaled_inv_freq, rope_inv_freq
from lucidlm.models.llama import Llama
from tiny_hf import (assert_cached_equals_uncached, assert_cuda_graph_decode_matches_reference,
                     assert_greedy_matches_reference, assert_matches_reference, load_ours, random_tokens, save_tiny)

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192, rope_theta=500000.0)


def _hf_llama_config(**overrides):
    from transformers import LlamaConfig

    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0,
                 eos_token_id=0)
    return LlamaConfig(**{**sizes, **overrides})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = save_tiny(_hf_llama_config(), path)
    return hf, load_ours(path)


def test_hf_directory_loads_as_llama(pair):
    hf, ours = pair
    assert isinstance(ours, Llama) and ours.lm_head.weight is ours.embed_tokens.weight
    assert_matches_reference(ours, hf, random_tokens(2, 20))
    assert_cached_equals_uncached(ours, random_tokens(2, 16), prefill=5)
    assert_greedy_matches_reference(ours, hf, random_tokens(1, 6)[0].tolist())


@pytest.mark.parametrize("head_dim", [64, 128])
def test_llama3_inv_freq_matches_reference(head_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _hf_llama_config(hidden_size=head_dim * 4, head_dim=head_dim, max_position_embeddings=131072,
                           rope_parameters=LLAMA3)
    expected, attention_scaling = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    actual = llama3_scaled_inv_freq(rope_inv_freq(head_dim, LLAMA3["rope_theta"]), LLAMA3["factor"],
                                    LLAMA3["low_freq_factor"], LLAMA3["high_freq_factor"],
                                    LLAMA3["original_max_position_embeddings"])
    assert attention_scaling == 1.0
    torch.testing.assert_close(actual.float(), expected, rtol=1e-6, atol=0)
    # All three regimes occur: kept (high frequencies), divided by factor (low), blended.
    ratio = actual / rope_inv_freq(head_dim, LLAMA3["rope_theta"])
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(1 / 8) and ((ratio < 1) & (ratio > 1 / 8)).any()


def test_frequency_rotary_embedding_matches_reference_cos_sin():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = _hf_llama_config(hidden_size=256, head_dim=64, max_position_embeddings=131072, rope_parameters=LLAMA3)
    positions = torch.tensor([[0, 1, 17, 1000, 4095]])
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions)  # (1, T, D)
    inv_freq = llama3_scaled_inv_freq(rope_inv_freq(64, LLAMA3["rope_theta"]), 8.0, 1.0, 4.0, 8192)
    ours_cos, ours_sin = FrequencyRotaryEmbedding(inv_freq, 4096).tables(torch.device("cpu"))
    # transformers multiplies position x frequency in float32 (we in float64): its angles are
    # off by up to position x 2^-24 rad, 2.4e-4 at position 4095 (observed max |Δ| 2e-4).
    torch.testing.assert_close(ours_cos[positions[0]], cos[0], atol=5e-4, rtol=0)
    torch.testing.assert_close(ours_sin[positions[0]], sin[0], atol=5e-4, rtol=0)


def test_llama3_scaled_checkpoint_matches_reference(tmp_path):
    # An original context of 16 positions makes all three frequency regimes matter within 40 tokens
    # (without the scaling the logits differ by ~1.7).
    scaling = {**LLAMA3, "rope_theta": 10000.0, "original_max_position_embeddings": 16}
    hf = save_tiny(_hf_llama_config(rope_parameters=scaling), tmp_path)
    ours = load_ours(tmp_path)
    assert_matches_reference(ours, hf, random_tokens(2, 40))
    assert_cached_equals_uncached(ours, random_tokens(2, 40), prefill=10)


def test_frequency_rotary_embedding_builds_on_the_meta_device():
    # Models are constructed under torch.device("meta"); the frequencies must stay real.
    with torch.device("meta"):
        rope = FrequencyRotaryEmbedding(llama3_scaled_inv_freq(rope_inv_freq(64, 5e5), 8.0, 1.0, 4.0, 8192), 16)
    cos, sin = rope.tables(torch.device("cpu"))
    assert cos.shape == sin.shape == (16, 64) and not cos.is_meta


def test_cuda_graph_decode_matches_reference(pair):
    hf, ours = pair
    assert_cuda_graph_decode_matches_reference(ours, hf, random_tokens(2, 16), prefill=5)
