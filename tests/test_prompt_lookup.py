"""Prompt-lookup decoding (`lucidlm.prompt_lookup`) against outside references.

- The n-gram index drafts what a brute-force search of the definition finds.
- Greedy decoding with guesses gives Hugging Face's greedy `generate` tokens and its per-step
  distributions, on a tiny random Llama whose runs accept some guesses and reject others (so
  the KV cache is cut back, and a wrong cut would change every later logit).
- Sampling with guesses draws from the model's distribution: the joint frequencies of three
  tokens match probabilities computed from Hugging Face's logits (chi-square).
- Bad options are clear errors.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from lucidlm.cache import KVCache
from lucidlm.decoding import DecodingOptions, token_steps
from lucidlm.errors import InvalidArgumentError
from lucidlm.generate import GenerationStats, TextStream
from lucidlm.generate import generate_tokens
from lucidlm.prompt_lookup import NgramIndex
from lucidlm.sampling import SamplingParams, make_sampler
from test_sampling import assert_frequencies_match
from tiny_llama import hf_logits, tiny_llama_pair


def brute_force_draft(ids: list[int], k: int, max_n: int = 3) -> list[int]:
    """The definition: for n = max_n..1, the latest earlier occurrence of the last n tokens
    (one that has a token after it), and the k tokens after it."""
    for n in range(min(max_n, len(ids)), 0, -1):
        suffix = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == suffix:
                return ids[start + n:start + n + k]
    return []


def test_ngram_index_drafts_what_a_search_finds():
    rng = random.Random(0)
    for trial in range(300):
        ids = [rng.randrange(5) for _ in range(rng.randrange(1, 40))]  # small alphabet: many repeats
        index = NgramIndex()
        split = rng.randrange(len(ids) + 1)
        index.extend(ids[:split])  # built in two goes, as prompt then generated tokens
        index.extend(ids[split:])
        for k in (1, 3, 8):
            assert index.draft(k) == brute_force_draft(ids, k), (ids, k)
    assert NgramIndex().draft(4) == []
    assert NgramIndex().draft(0) == []


@pytest.fixture(scope="module")
def pair():
    return tiny_llama_pair(3)


REPETITIVE_PROMPT = [5, 17, 33, 2, 90, 5, 17, 33, 2, 90, 5, 17, 33]


def _pass_sizes(model):
    """Record the number of positions of every forward pass of `model`."""
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[1]))
    return sizes, handle


def test_greedy_with_guesses_gives_transformers_greedy_tokens(pair):
    hf, ours = pair
    new = 40
    with torch.inference_mode():
        out = hf.generate(torch.tensor([REPETITIVE_PROMPT]), attention_mask=torch.ones(1, len(REPETITIVE_PROMPT),
                          dtype=torch.long), max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = out[0, len(REPETITIVE_PROMPT):].tolist()
    reference = hf_logits(hf, REPETITIVE_PROMPT + expected).log_softmax(-1)[len(REPETITIVE_PROMPT) - 1:]
    sizes, handle = _pass_sizes(ours)
    try:
        steps = list(generate_tokens(ours, REPETITIVE_PROMPT, make_sampler(SamplingParams()), new, prompt_lookup=4))
    finally:
        handle.remove()
    assert [s.token_id for s in steps] == expected
    # Each step's distribution is the reference's at that position: a cache cut back wrongly
    # after a rejected guess would shift every later one. (float32; observed max |Δ| ~1e-6.)
    torch.testing.assert_close(torch.stack([s.logprobs for s in steps]), reference[:new], atol=1e-4, rtol=0)
    accepted = sum(s.drafted for s in steps)
    guessed = sum(size - 1 for size in sizes[1:])  # every pass after the prefill: its token + guesses
    assert accepted > 0 and guessed - accepted > 0, "this run must accept some guesses and reject others"
    assert len(sizes) - 1 < new - 1, "guesses must save passes"


def test_stop_ids_and_max_new_tokens_end_a_pass_early(pair):
    _, ours = pair
    greedy = [s.token_id for s in generate_tokens(ours, REPETITIVE_PROMPT, make_sampler(SamplingParams()), 40, prompt_lookup=0)]
    stop = greedy[25]
    first_stop = greedy.index(stop)
    steps = list(generate_tokens(ours, REPETITIVE_PROMPT, make_sampler(SamplingParams()), 40, stop_ids={stop}, prompt_lookup=4))
    assert [s.token_id for s in steps] == greedy[:first_stop + 1]
    for n in (1, 2, 7):
        steps = list(generate_tokens(ours, REPETITIVE_PROMPT, make_sampler(SamplingParams()), n, prompt_lookup=4))
        assert [s.token_id for s in steps] == greedy[:n]


def test_sampling_with_guesses_draws_from_the_model_distribution(pair):
    """Three sampled tokens (temperature 1.5, top-k 2: 8 possible sequences). A guess is made
    after the first token, so the second and third are drawn partly from rows of a
    multi-position pass, partly after a rejected guess. The prompt (the repetitive one and 4
    greedy tokens of this model) makes the guess one of the 2 candidates about half the time."""
    hf, ours = pair
    temperature, top_k, draws = 1.5, 2, 4000
    with torch.inference_mode():
        greedy = hf.generate(torch.tensor([REPETITIVE_PROMPT]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones(1, len(REPETITIVE_PROMPT), dtype=torch.long))[0].tolist()

    def next_probs(ids):  # the sampler's distribution by hand: scale, keep the top 2, softmax
        logits = hf_logits(hf, ids)[-1].double() / temperature
        values, indices = logits.topk(top_k)
        return dict(zip(indices.tolist(), values.softmax(-1).tolist()))

    expected = {}
    for a, pa in next_probs(greedy).items():
        for b, pb in next_probs(greedy + [a]).items():
            for c, pc in next_probs(greedy + [a, b]).items():
                expected[(a, b, c)] = pa * pb * pc
    sampler = make_sampler(SamplingParams(temperature=temperature, top_k=top_k, seed=11))
    counts = dict.fromkeys(expected, 0)
    accepted = 0
    for _ in range(draws):
        steps = list(generate_tokens(ours, greedy, sampler, 3, prompt_lookup=2))
        counts[tuple(s.token_id for s in steps)] += 1  # a sequence outside the support: KeyError
        accepted += sum(s.drafted for s in steps)
    assert accepted > draws // 20, "the test must exercise accepted guesses"
    cells = sorted(expected)
    tokens = torch.tensor(list(itertools.chain.from_iterable([i] * counts[cell] for i, cell in enumerate(cells))))
    assert_frequencies_match(tokens, np.array([expected[cell] for cell in cells]))


def test_text_stream_counts_the_confirmed_guesses(pair):
    _, ours = pair

    class Digits:  # a stand-in incremental decoder: token ids as text
        def push(self, token_id):
            return f"{token_id} "

        def flush(self):
            return ""

    stats = GenerationStats()
    steps = list(generate_tokens(ours, REPETITIVE_PROMPT, make_sampler(SamplingParams()), 30, prompt_lookup=4))
    "".join(TextStream(iter(steps), Digits(), (), [], stats, 0.0))
    assert stats.drafted_tokens == sum(s.drafted for s in steps) > 0
    assert f"{stats.drafted_tokens} of them from prompt lookup" in stats.summary()


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lookup=-1), "prompt_lookup must be an integer >= 0"),
    (dict(prompt_lookup=2.5), "prompt_lookup must be an integer >= 0"),
    (dict(prompt_lookup=True), "prompt_lookup must be an integer >= 0"),
    (dict(prompt_lookup=3, num_beams=2), "prompt_lookup is available for greedy and sample"),
    (dict(prompt_lookup=3, n=2), "prompt_lookup is available for greedy and sample"),
    (dict(prompt_lookup=3, use_cache=False), "prompt_lookup is available for greedy and sample"),
    (dict(prompt_lookup=3, penalty_alpha=0.5, top_k=4), "prompt_lookup is available for greedy and sample"),
])
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        DecodingOptions.from_kwargs(**kwargs)


def test_options_route_to_prompt_lookup(pair):
    _, ours = pair
    options = DecodingOptions.from_kwargs(max_new_tokens=30, prompt_lookup=4)
    steps = list(token_steps(ours, REPETITIVE_PROMPT, options, set()))
    assert len(steps) == 30 and any(s.drafted for s in steps)


def test_truncating_a_cache_forgets_positions():
    cache = KVCache(n_layers=1, batch=1, n_kv_heads=1, max_positions=8, head_dim=2)
    cache.begin(torch.ones(1, 5, dtype=torch.bool))
    cache.advance(5)
    cache.make_static()
    cache.truncate(3)
    assert cache.length == 3 and int(cache.slot) == 3
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(4)


def test_a_static_cache_forgets_rejected_guesses(pair):
    """The cache a CUDA graph replays (`make_static`: every slot attended, unwritten ones masked)
    after a pass whose guesses were wrong: cut back, it must give transformers' logits of the
    tokens actually kept."""
    hf, ours = pair
    prompt, kept = REPETITIVE_PROMPT, [7, 60]
    with torch.inference_mode():
        cache = ours.new_cache(1, 32)
        ours(torch.tensor([prompt]), cache)
        cache.make_static()
        ours(torch.tensor([[kept[0], 1, 2, 3]]), cache)  # the first token and three wrong guesses
        cache.truncate(len(prompt) + 1)
        got = ours(torch.tensor([kept[1:]]), cache)[0]  # (1, V): two of the wrong guesses' slots stay unwritten
    torch.testing.assert_close(got, hf_logits(hf, prompt + kept)[-1:], atol=1e-4, rtol=0)
