"""GPT-2 loaded from a tiny transformers-made checkpoint directory vs transformers' GPT2LMHeadModel."""

import pytest
import torch

from lucidlm.models.gpt2 import GPT2
from tiny_hf import (assert_cached_equals_uncached, assert_cuda_graph_decode_matches_reference,
                     assert_greedy_matches_reference, assert_hooks_see_every_block, assert_matches_reference,
                     assert_padded_batch_equals_alone, load_ours, random_tokens, save_tiny)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2")
    hf = save_tiny(cfg, path)
    return hf, load_ours(path)


def test_loads_as_gpt2_with_tied_head(pair):
    _, ours = pair
    assert isinstance(ours, GPT2) and ours.config.architecture == "gpt2"
    assert ours.lm_head.weight is ours.wte.weight
    assert ours.norm is ours.ln_f  # the generic name used by the logit lens / contrastive search


def test_logits_match_reference(pair):
    hf, ours = pair
    assert_matches_reference(ours, hf, random_tokens(2, 20))


def test_conv1d_weights_are_transposed(pair):
    hf, ours = pair
    torch.testing.assert_close(ours.h[0].attn.c_attn.weight, hf.transformer.h[0].attn.c_attn.weight.t())


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
