"""Analyses built on the hook points, on a tiny random model loaded from a GGUF file:
logit lens, traces, attention patterns, word vectors, PCA / t-SNE, model description, KV demo.
Expected values are computed independently here (softmax of logits, numpy SVD, ...)."""

import numpy as np
import pytest
import torch
from test_loading_gguf import write_tiny_model

import lucidlm
from lucidlm.errors import InvalidArgumentError
from lucidlm.generate import generate_tokens
from lucidlm.introspect import lens_logits, logit_lens
from lucidlm.introspect.architecture import describe
from lucidlm.introspect.attention import attention_patterns, check_head, check_layer
from lucidlm.introspect.embeddings import word_vectors
from lucidlm.introspect.kv_demo import kv_cache_demo
from lucidlm.introspect.projection import pca_2d, tsne_2d
from lucidlm.introspect.trace import trace_generation
from lucidlm.sampling import SamplingParams, make_sampler, probabilities_after_filters

PROMPT = "the capital of France is"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return lucidlm.load(str(write_tiny_model(tmp_path_factory.mktemp("introspect") / "tiny.gguf")), progress=False)


# ----- logit lens -----

def test_lens_after_the_last_layer_is_the_models_output(tiny):
    tokens = tiny.token_batch(PROMPT)
    logits, cache = tiny.run_with_cache(tokens, names=lambda n: n.endswith("hook_resid_post"))
    last = tiny.config.n_layers - 1
    torch.testing.assert_close(lens_logits(tiny.model, cache[f"blocks.{last}.hook_resid_post"]), logits, atol=1e-5, rtol=0)
    reading = logit_lens(tiny.model, tokens, k=3)
    T = tokens.shape[1]
    assert reading.top_ids.shape == reading.top_probs.shape == (tiny.config.n_layers, T, 3)
    expected = logits[0].softmax(-1).topk(3)
    assert torch.equal(reading.top_ids[-1], expected.indices)
    torch.testing.assert_close(reading.top_probs[-1], expected.values, atol=1e-6, rtol=0)
    assert not torch.equal(reading.top_ids[0], reading.top_ids[-1])  # earlier layers read differently


# ----- trace -----

def test_greedy_trace_matches_generation_and_softmax(tiny):
    ids = tiny.token_batch(PROMPT)[0].tolist()
    steps = trace_generation(tiny.model, tiny.tokenizer, ids, SamplingParams(), 4, top_k=3)
    greedy = [s.token_id for s in generate_tokens(tiny.model, ids, make_sampler(SamplingParams()), 4)]
    assert [s.chosen.token_id for s in steps] == greedy
    probs = tiny.logits(ids)[-1].softmax(-1)  # the first step's distribution
    first = steps[0]
    assert [c.token_id for c in first.candidates] == probs.topk(3).indices.tolist()
    assert first.chosen.token_id == first.candidates[0].token_id
    assert first.chosen.prob == pytest.approx(float(probs.max()), abs=1e-6)
    assert first.chosen.sampled_prob is None and first.chosen.text == tiny.tokenizer.decode([first.chosen.token_id])


def test_sampled_trace_reports_the_distribution_drawn_from(tiny):
    ids = tiny.token_batch(PROMPT)[0].tolist()
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9, seed=3)
    steps = trace_generation(tiny.model, tiny.tokenizer, ids, params, 3, top_k=6)
    drawn = [s.token_id for s in generate_tokens(tiny.model, ids, make_sampler(params), 3)]
    assert [s.chosen.token_id for s in steps] == drawn  # same seed, same tokens
    expected = probabilities_after_filters(tiny.logits(ids)[-1], params)  # from the raw logits
    for c in steps[0].candidates:
        assert c.sampled_prob == pytest.approx(float(expected[c.token_id]), abs=1e-6)
    assert sum(c.sampled_prob > 0 for c in steps[0].candidates) <= 4  # top-k 4 filter
    assert steps[0].chosen.sampled_prob > 0


def test_trace_rejects_what_it_cannot_show(tiny):
    with pytest.raises(InvalidArgumentError, match="repetition penalty"):
        trace_generation(tiny.model, tiny.tokenizer, [5, 6], SamplingParams(repetition_penalty=1.2), 2)
    with pytest.raises(InvalidArgumentError, match="top_k"):
        trace_generation(tiny.model, tiny.tokenizer, [5, 6], SamplingParams(), 2, top_k=0)


# ----- attention -----

def test_attention_patterns_are_causal_distributions(tiny):
    patterns = attention_patterns(tiny.model, tiny.token_batch(PROMPT))
    L, H, T, _ = patterns.shape
    assert (L, H) == (tiny.config.n_layers, tiny.config.n_heads)
    torch.testing.assert_close(patterns.sum(-1), torch.ones(L, H, T), atol=1e-5, rtol=0)
    assert torch.all(patterns.triu(diagonal=1) == 0)
    one = attention_patterns(tiny.model, tiny.token_batch(PROMPT), layers=[1])
    # Layer 0 ran fused here, explicitly before: equal up to float rounding.
    torch.testing.assert_close(one[0], patterns[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("check", "value", "message"), [
    (check_layer, 2, "layer 2 is out of range: the model has 2 layers (0-1)"),
    (check_layer, -1, "layer -1 is out of range"),
    (check_head, 4, "head 4 is out of range: each layer has 4 attention heads (0-3)"),
])
def test_layer_and_head_out_of_range(tiny, check, value, message):
    with pytest.raises(InvalidArgumentError) as info:
        check(tiny.model, value)
    assert message in str(info.value)


# ----- word vectors and 2-D maps -----

def test_word_vectors(tiny):
    words = ["hello", " world", "Paris"]
    vectors = word_vectors(tiny.model, tiny.tokenizer, words)
    table = tiny.model.embed_tokens.weight
    for word, vector in zip(words, vectors):
        ids = tiny.tokenizer.encode(word, add_special=False)
        torch.testing.assert_close(vector, table[ids].mean(0))
    contextual = word_vectors(tiny.model, tiny.tokenizer, words, contextual=True)
    ids = tiny.tokenizer.encode("Paris", add_special=False)
    _, cache = tiny.run_with_cache(ids, names="hook_final_norm")
    torch.testing.assert_close(contextual[2], cache["hook_final_norm"][0].mean(0))


@pytest.mark.parametrize(("words", "message"), [
    ([], "no words given"), (["king", ""], "empty word"), (["king"], "at least two words")])
def test_bad_word_lists(tiny, words, message):
    with pytest.raises(InvalidArgumentError, match=message):
        word_vectors(tiny.model, tiny.tokenizer, words)


def test_pca_matches_numpy_svd():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 3, 1, 0.5, 0.1])
    coords, ratio = pca_2d(x)
    centred = (x - x.mean(0)).double().numpy()
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    np.testing.assert_allclose(np.abs(coords.numpy()), np.abs(expected), atol=1e-5)
    np.testing.assert_allclose(ratio.numpy(), (s**2 / (s**2).sum())[:2], atol=1e-6)
    assert torch.all(coords[0] >= 0)  # sign convention: first point on the positive side
    line = torch.tensor([[0.0, 0], [1, 2], [2, 4]])  # all variance along one direction
    assert pca_2d(line)[1].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_tsne_separates_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 10
    x = torch.cat([c + torch.randn(5, 20, generator=g) for c in centres])
    y = tsne_2d(x, steps=500)
    label = torch.arange(15) // 5
    d = torch.cdist(y, y)
    within, between = d[label[:, None] == label[None]].mean(), d[label[:, None] != label[None]].mean()
    assert between > 3 * within
    assert torch.equal(y, tsne_2d(x, steps=500))
    with pytest.raises(InvalidArgumentError, match="perplexity"):
        tsne_2d(x, perplexity=15)


# ----- inspect and KV demo -----

def test_describe(tiny):
    d = describe(tiny)
    cfg = tiny.config
    n_params = sum(p.numel() for p in tiny.model.parameters())  # untied: every tensor once
    assert d["parameters"] == n_params
    assert d["tensor_types"] == [{"type": "F32", "tensors": 2 + 9 * cfg.n_layers + 1, "parameters": n_params,
                                  "file_bytes": 4 * n_params, "memory_bytes": 4 * n_params}]
    stored = tiny.model.new_cache(1, 1).keys[0]  # what the cache really allocates (float16 where our kernel reads it)
    assert d["kv_cache_bytes_per_token"] == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * stored.element_size()
    assert d["kv_cache_dtype"] == str(stored.dtype).removeprefix("torch.")
    assert d["module_tree"].startswith("Llama(") and "(0-1): 2 x Block(" in d["module_tree"]
    assert d["hook_points"]["blocks.{0-1}.attn.hook_pattern"] == "(B, H, T, S)"
    assert d["file_bytes"] == tiny.path.stat().st_size > 4 * n_params


def test_kv_demo_gives_identical_tokens(tiny):
    r = kv_cache_demo(tiny, PROMPT, max_new_tokens=6)
    assert r["identical"] and r["token_ids_with_cache"] == r["token_ids_without_cache"]
    assert r["new_tokens"] == len(r["token_ids_with_cache"]) > 0
    assert r["seconds_with_cache"] > 0 and r["speedup"] == pytest.approx(r["seconds_without_cache"] / r["seconds_with_cache"])
