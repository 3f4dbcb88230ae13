"""Logit controls (lucidlm.penalties) and the generator options that use them.

Pure functions are checked on hand-built cases against their definitions (OpenAI's
presence/frequency formula, Hugging Face's no_repeat_ngram rule), the n-gram ban by a
hypothesis property; in generation, our greedy decoding under each control is compared
with Hugging Face transformers' `generate` under its equivalent option on the same weights.
"""

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_decoding_model import tiny_pair

from lucidlm.errors import InvalidArgumentError
from lucidlm.generate import generate_tokens
from lucidlm.penalties import (
    LogitControls,
    apply_logit_bias,
    apply_presence_frequency_penalties,
    ban_repeated_ngrams,
    ban_tokens,
)
from lucidlm.sampling import SamplingParams, make_sampler

NEG_INF = float("-inf")
LOGITS = torch.tensor([1.0, 2.0, -3.0, 4.0, 0.5])


def test_presence_and_frequency_penalties_follow_openai_formula():
    # token 1 generated twice, token 3 once: logit -= count * frequency + (count > 0) * presence
    out = apply_presence_frequency_penalties(LOGITS, torch.tensor([1, 3, 1]), presence_penalty=0.5,
                                             frequency_penalty=0.25)
    assert out.tolist() == [1.0, 2.0 - 2 * 0.25 - 0.5, -3.0, 4.0 - 0.25 - 0.5, 0.5]
    assert LOGITS.tolist() == [1.0, 2.0, -3.0, 4.0, 0.5]  # input untouched


def test_negative_penalties_encourage_repetition_per_row():
    logits = LOGITS.expand(2, -1)
    out = apply_presence_frequency_penalties(logits, torch.tensor([[0, 0], [4, 2]]), -1.0, -0.5)
    assert out[0].tolist() == [1.0 + 2 * 0.5 + 1.0, 2.0, -3.0, 4.0, 0.5]
    assert out[1].tolist() == [1.0, 2.0, -3.0 + 0.5 + 1.0, 4.0, 0.5 + 0.5 + 1.0]


def test_logit_bias_adds_exactly_the_bias():
    out = apply_logit_bias(LOGITS, {0: 5.0, 2: -100, 4: 0.25})
    assert out.tolist() == [6.0, 2.0, -103.0, 4.0, 0.75]
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        apply_logit_bias(LOGITS, {5: 1.0})


@pytest.mark.parametrize(("n", "banned"), [(3, {3}), (2, {3}), (1, {1, 2, 3}), (5, set()), (6, set()), (0, set())])
def test_ban_repeated_ngrams_hand_built(n, banned):
    sequence = torch.tensor([1, 2, 3, 1, 2])  # the next token after "1 2" must not be 3 for n = 3
    out = ban_repeated_ngrams(LOGITS, sequence, n)
    assert {i for i, v in enumerate(out.tolist()) if v == NEG_INF} == banned


def test_ban_tokens():
    assert ban_tokens(LOGITS, [0, 3, 99]).tolist() == [NEG_INF, 2.0, -3.0, NEG_INF, 0.5]


def test_min_new_tokens_bans_stop_ids_until_reached():
    controls = LogitControls(min_new_tokens=2)
    sequence = torch.tensor([1, 2, 3])
    assert controls.apply(LOGITS, sequence, 1, stop_ids={4})[4] == NEG_INF
    assert controls.apply(LOGITS, sequence, 2, stop_ids={4}).tolist() == LOGITS.tolist()


def test_controls_count_only_generated_tokens():
    controls = LogitControls(presence_penalty=1.0, logit_bias={2: 1.0})
    out = controls.apply(LOGITS, torch.tensor([0, 0, 3]), n_generated=1)  # prompt [0, 0], generated [3]
    assert out.tolist() == [1.0, 2.0, -2.0, 3.0, 0.5]


@pytest.mark.parametrize("kwargs", [
    dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(frequency_penalty=float("nan")),
    dict(no_repeat_ngram_size=-1), dict(min_new_tokens=1.5), dict(logit_bias={"7": 1.0}),
    dict(logit_bias={7: float("inf")}), dict(logit_bias=[7]), dict(logit_bias={7: 1e308}), dict(logit_bias={7: -100.5}),
])
def test_bad_controls(kwargs):
    with pytest.raises(InvalidArgumentError) as info:
        LogitControls(**kwargs)
    assert "\n" not in str(info.value)


def _repeats_an_ngram(sequence: list[int], n: int) -> bool:
    """Does the sequence's last n-gram occur earlier in it?"""
    if len(sequence) < n:
        return False
    last = sequence[-n:]
    return any(sequence[j: j + n] == last for j in range(len(sequence) - n))


@settings(max_examples=60, deadline=None)
@given(vocab=st.integers(2, 6), n=st.integers(1, 4), prompt=st.lists(st.integers(0, 5), min_size=1, max_size=12),
       seed=st.integers(0, 2**16))
def test_no_repeat_ngram_never_lets_an_ngram_repeat(vocab, n, prompt, seed):
    """Greedy decoding of random logits under the ban: every banned token is exactly one
    that would repeat an n-gram, and no generated token ever completes a repeated n-gram."""
    generator = torch.Generator().manual_seed(seed)
    sequence = [t % vocab for t in prompt]
    for _ in range(15):
        scores = ban_repeated_ngrams(torch.randn(vocab, generator=generator), torch.tensor(sequence), n)
        banned = {v for v in range(vocab) if scores[v] == NEG_INF}
        assert banned == {v for v in range(vocab) if _repeats_an_ngram(sequence + [v], n)}
        if len(banned) == vocab:
            break  # every continuation would repeat: nothing left to choose
        sequence.append(int(scores.argmax()))
        assert not _repeats_an_ngram(sequence, n)


# ----- in generation, against Hugging Face transformers -----

EOS = 5
PROMPT = [7, 20, 33, 41, 9, 20, 33]


@pytest.fixture(scope="module")
def tiny():
    return tiny_pair(seed=1, eos_id=EOS, boost=2.0)


def ours_greedy(model, n, controls, stop_ids=(), **kwargs):
    steps = generate_tokens(model, PROMPT, make_sampler(SamplingParams(**kwargs)), n, stop_ids, controls=controls)
    return [s.token_id for s in steps]


def hf_greedy(hf, n, **kwargs):
    with torch.inference_mode():
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(PROMPT):].tolist()


def test_no_repeat_ngram_generation_matches_transformers(tiny):
    hf, ours = tiny
    def repeats(generated):
        sequence = PROMPT + generated
        return any(_repeats_an_ngram(sequence[: i + 1], 2) for i in range(len(PROMPT), len(sequence)))

    assert repeats(ours_greedy(ours, 16, None))  # greedy alone repeats itself, so the ban matters
    expected = hf_greedy(hf, 16, no_repeat_ngram_size=2, eos_token_id=None)
    actual = ours_greedy(ours, 16, LogitControls(no_repeat_ngram_size=2))
    assert actual == expected and not repeats(actual)


def test_min_new_tokens_matches_transformers(tiny):
    hf, ours = tiny
    assert len(ours_greedy(ours, 12, None, stop_ids={EOS})) < 6  # without it, EOS comes early
    expected = hf_greedy(hf, 12, min_new_tokens=6, eos_token_id=EOS)
    expected = expected[: expected.index(EOS) + 1] if EOS in expected else expected
    actual = ours_greedy(ours, 12, LogitControls(min_new_tokens=6), stop_ids={EOS})
    assert actual == expected and len(actual) >= 6


def test_logit_bias_matches_transformers_sequence_bias(tiny):
    hf, ours = tiny
    bias = {11: 3.0, 27: -2.0, 40: 2.5}
    expected = hf_greedy(hf, 10, sequence_bias={(k,): v for k, v in bias.items()}, eos_token_id=None)
    assert expected != ours_greedy(ours, 10, None)
    assert ours_greedy(ours, 10, LogitControls(logit_bias=bias)) == expected


def test_frequency_penalty_in_generation_lowers_chosen_logits(tiny):
    """Each step's choice is the argmax of raw logits minus the OpenAI penalty of the
    tokens generated so far (checked with the reference's logits)."""
    hf, ours = tiny
    steps = list(generate_tokens(ours, PROMPT, make_sampler(SamplingParams()), 8,
                                 controls=LogitControls(presence_penalty=0.4, frequency_penalty=0.7)))
    generated = [s.token_id for s in steps]
    assert generated != ours_greedy(ours, 8, None)  # the penalties changed the choices
    with torch.inference_mode():
        logits = hf(torch.tensor([PROMPT + generated])).logits[0, len(PROMPT) - 1: -1]  # (8, V)
    for t, row in enumerate(logits):
        counts = torch.bincount(torch.tensor(generated[:t], dtype=torch.long), minlength=row.numel()).float()
        penalised = row - 0.7 * counts - 0.4 * (counts > 0).float()
        assert int(penalised.argmax()) == generated[t]


def test_max_time_stops_generation(tiny):
    _, ours = tiny
    started = time.perf_counter()
    steps = list(generate_tokens(ours, PROMPT, make_sampler(SamplingParams()), 200, max_time=1e-6))
    assert len(steps) == 1  # the first token always comes; then the time is up
    assert time.perf_counter() - started < 5
    assert math.isfinite(float(steps[0].logprobs[steps[0].token_id]))
