"""Mixtral loaded from a tiny transformers-made checkpoint directory vs transformers' MixtralForCausalLM:
8 experts, top-2 routing, and a sliding window of 6 shorter than the prompts."""

import pytest
import torch

from lucidlm.introspect import run_with_cache, run_with_hooks
from lucidlm.models.mixtral import Mixtral
from lucidlm.models.moe import route_top_k
from tiny_hf import (assert_cached_equals_uncached, assert_cuda_graph_decode_matches_reference,
                     assert_greedy_matches_reference, assert_hooks_see_every_block, assert_matches_reference,
                     assert_padded_batch_equals_alone, assert_reference_applies_window, load_ours, random_tokens,
                     save_tiny)

WINDOW = 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64, sliding_window=WINDOW, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("mixtral")
    hf = save_tiny(cfg, path)
    return hf, load_ours(path)


def test_route_top_k_renormalises_the_two_best():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    weights, chosen = route_top_k(torch.softmax(logits, dim=-1), 2)
    assert chosen.tolist() == [[1, 2]]
    e = torch.tensor([2.0, 1.0]).exp()
    torch.testing.assert_close(weights, (e / e.sum())[None])


def test_loads_eight_experts(pair):
    _, ours = pair
    moe = ours.layers[0].block_sparse_moe
    assert isinstance(ours, Mixtral) and len(moe.experts) == 8 and moe.top_k == 2


def test_logits_and_routing_match_reference(pair):
    hf, ours = pair
    tokens = random_tokens(2, 20)
    assert_reference_applies_window(hf, tokens, WINDOW)
    assert_matches_reference(ours, hf, tokens)
    with torch.inference_mode():
        hf_router_logits = hf(tokens, output_router_logits=True).router_logits  # per layer (B·T, E)
    for block, expected in zip(ours.layers, hf_router_logits):
        moe = block.block_sparse_moe
        assert moe.last_router_logits.shape == (2, 20, 8) and moe.last_expert_indices.shape == (2, 20, 2)
        torch.testing.assert_close(moe.last_router_logits.reshape(-1, 8), expected.float(), atol=1e-4, rtol=0)
        assert torch.equal(moe.last_expert_indices.reshape(-1, 2), expected.float().topk(2).indices)
        torch.testing.assert_close(moe.last_expert_weights.sum(-1), torch.ones(2, 20))
        # Tokens really are spread over the experts: many distinct pairs, most experts used.
        pairs = {tuple(sorted(p)) for p in moe.last_expert_indices.reshape(-1, 2).tolist()}
        assert len(pairs) >= 2 and len(moe.last_expert_indices.unique()) >= 4


def test_cached_decode_equals_uncached(pair):
    _, ours = pair
    assert_cached_equals_uncached(ours, random_tokens(2, 16), prefill=4)


def test_padded_batch_equals_each_alone(pair):
    _, ours = pair
    assert_padded_batch_equals_alone(ours, random_tokens(3, 12), [12, 5, 9])


def test_greedy_generation_matches_reference(pair):
    hf, ours = pair
    assert_greedy_matches_reference(ours, hf, random_tokens(1, 6)[0].tolist())


def test_hook_points_and_logit_lens(pair):
    _, ours = pair
    assert_hooks_see_every_block(ours, random_tokens(2, 9))


def test_router_hooks_capture_and_steer_routing(pair):
    """The router hook points report what the router decided (as checked against HF above) and
    can steer it: forcing every token to experts 6 and 7 makes those the chosen ones."""
    _, ours = pair
    tokens = random_tokens(1, 12)
    names = ["blocks.0.moe.hook_router_probs", "blocks.0.moe.hook_expert_indices"]
    _, cache = run_with_cache(ours, tokens, names=names)
    moe = ours.layers[0].block_sparse_moe
    torch.testing.assert_close(cache[names[0]], torch.softmax(moe.last_router_logits, dim=-1))
    assert torch.equal(cache[names[1]], moe.last_expert_indices)

    def force_last_two(probs, name):
        forced = torch.zeros_like(probs)
        forced[..., 6], forced[..., 7] = 0.6, 0.4
        return forced

    run_with_hooks(ours, tokens, {names[0]: force_last_two})
    assert moe.last_expert_indices.flatten(0, 1).tolist() == [[6, 7]] * 12


def test_cuda_graph_decode_matches_reference(pair):
    hf, ours = pair
    assert_cuda_graph_decode_matches_reference(ours, hf, random_tokens(2, 16), prefill=5)
