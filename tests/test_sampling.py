"""Tests for lucidlm.sampling against outside oracles.

Expected values come from the definitions, worked out by hand (kept token sets,
penalised logits) or from statistics (chi-square goodness of fit), never from
re-recording the module's own output.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lucidlm.errors import InvalidArgumentError
from lucidlm.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    make_sampler,
    min_p_filter,
    probabilities_after_filters,
    top_k_filter,
    top_p_filter,
)

NEG_INF = float("-inf")

# Probabilities 0.5, 0.3, 0.15, 0.05 deliberately stored out of order, so a filter
# that forgets to sort would fail. Index: 0 -> 0.15, 1 -> 0.5, 2 -> 0.05, 3 -> 0.3.
SHUFFLED_PROBS = [0.15, 0.5, 0.05, 0.3]


def logits_of(probs, shift=0.0):
    """Logits whose softmax is `probs` (log-probabilities, plus any constant)."""
    return torch.tensor([math.log(q) + shift for q in probs], dtype=torch.float32)


def kept(row):
    """Indices of the tokens a filter left alone (logit not -inf)."""
    return {i for i, value in enumerate(row.tolist()) if value != NEG_INF}


def assert_filtered(result, original, expected_kept):
    """Exactly `expected_kept` survive, unchanged; everything else is -inf."""
    assert result.dtype == torch.float32
    assert kept(result) == expected_kept
    for i in expected_kept:
        assert result[i].item() == original[i].item()


# --- top-k -----------------------------------------------------------------------

@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 4}), (3, {1, 4, 2}), (4, {1, 4, 2, 0})])
def test_top_k_keeps_the_k_largest(k, expected):
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5])
    assert_filtered(top_k_filter(logits, k), logits, expected)


def test_top_k_keeps_all_ties_at_the_kth_value():
    logits = torch.tensor([1.0, 2.0, 2.0, 0.0])
    assert kept(top_k_filter(logits, 2)) == {1, 2}
    assert kept(top_k_filter(logits, 1)) == {1, 2}  # both share the largest value
    assert kept(top_k_filter(logits, 3)) == {0, 1, 2}


@pytest.mark.parametrize("k", [0, 5, 6, 100])
def test_top_k_off_or_at_least_vocab_is_noop(k):
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5])
    assert torch.equal(top_k_filter(logits, k), logits)


# --- top-p -----------------------------------------------------------------------

@pytest.mark.parametrize("p, expected", [
    (0.8, {1, 3}),           # 0.5 + 0.3 = 0.8 reaches p exactly
    (0.81, {1, 3, 0}),       # needs the 0.15 token too
    (0.95, {1, 3, 0}),       # 0.5 + 0.3 + 0.15 = 0.95 reaches p exactly
    (0.96, {0, 1, 2, 3}),
    (0.5, {1}),
    (0.4, {1}),
    (1e-9, {1}),             # the top token is always kept
])
def test_top_p_keeps_smallest_set_reaching_p(p, expected):
    logits = logits_of(SHUFFLED_PROBS)
    assert_filtered(top_p_filter(logits, p), logits, expected)


def test_top_p_exact_boundary_survives_float32_rounding():
    # 0.6 + 0.35 = 0.95 exactly, but the float32 softmax sums them to 0.94999993.
    logits = logits_of([0.05, 0.6, 0.35])
    assert kept(top_p_filter(logits, 0.95)) == {1, 2}
    assert kept(top_p_filter(logits, 0.951)) == {0, 1, 2}


def test_top_p_uses_probabilities_not_raw_logits():
    # Adding a constant to every logit leaves the softmax, hence the kept set, unchanged.
    logits = logits_of(SHUFFLED_PROBS, shift=7.0)
    assert kept(top_p_filter(logits, 0.81)) == {0, 1, 3}


def test_top_p_one_is_noop():
    logits = logits_of(SHUFFLED_PROBS)
    assert torch.equal(top_p_filter(logits, 1.0), logits)


# --- min-p -----------------------------------------------------------------------

@pytest.mark.parametrize("min_p, expected", [
    (0.2, {0, 1, 3}),     # threshold 0.2 * 0.5 = 0.1: drops 0.05
    (0.5, {1, 3}),        # threshold 0.25
    (0.7, {1}),           # threshold 0.35
    (0.09, {0, 1, 2, 3}), # threshold 0.045
    (1.0, {1}),           # only the top token
])
def test_min_p_keeps_tokens_above_fraction_of_max(min_p, expected):
    logits = logits_of(SHUFFLED_PROBS)
    assert_filtered(min_p_filter(logits, min_p), logits, expected)


def test_min_p_zero_is_noop():
    logits = logits_of(SHUFFLED_PROBS)
    assert torch.equal(min_p_filter(logits, 0.0), logits)


# --- batched inputs, purity --------------------------------------------------------

def test_filters_work_row_wise_on_batches():
    rows = torch.tensor([[1.0, 3.0, 2.0, 0.0],
                         [5.0, 0.0, 1.0, 4.0]])
    result = top_k_filter(rows, 2)
    assert [kept(r) for r in result] == [{1, 2}, {0, 3}]

    probs_rows = torch.stack([logits_of([0.15, 0.5, 0.05, 0.3]), logits_of([0.6, 0.1, 0.25, 0.05])])
    assert [kept(r) for r in top_p_filter(probs_rows, 0.8)] == [{1, 3}, {0, 2}]
    assert [kept(r) for r in min_p_filter(probs_rows, 0.4)] == [{1, 3}, {0, 2}]

    three_d = probs_rows.reshape(2, 1, 4)
    assert [kept(r[0]) for r in top_p_filter(three_d, 0.8)] == [{1, 3}, {0, 2}]


@pytest.mark.parametrize("apply", [
    lambda x: top_k_filter(x, 2),
    lambda x: top_k_filter(x, 0),
    lambda x: top_p_filter(x, 0.5),
    lambda x: top_p_filter(x, 1.0),
    lambda x: min_p_filter(x, 0.3),
    lambda x: min_p_filter(x, 0.0),
    lambda x: apply_temperature(x, 0.5),
    lambda x: apply_repetition_penalty(x, torch.tensor([[0, 2], [1, 1]]), 1.5),
    lambda x: apply_repetition_penalty(x, torch.tensor([0]), 1.0),
    lambda x: probabilities_after_filters(x, SamplingParams(temperature=0.8, top_k=3, top_p=0.9)),
])
def test_input_is_never_modified(apply):
    logits = torch.tensor([[1.0, -3.0, 2.0, 0.5], [0.1, 0.2, -0.3, 4.0]])
    before = logits.clone()
    result = apply(logits)
    result.fill_(123.0)  # even a no-op must return a tensor of its own
    assert torch.equal(logits, before)


def test_outputs_are_float32_for_other_dtypes():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5], dtype=torch.bfloat16)
    assert top_k_filter(logits, 2).dtype == torch.float32
    assert apply_temperature(logits.double(), 2.0).dtype == torch.float32


# --- repetition penalty, temperature -----------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0])
    previous = torch.tensor([0, 1, 1, 1, 3, 0])  # 0 and 1 repeated: penalised once
    result = apply_repetition_penalty(logits, previous, 2.0)
    assert result.tolist() == [1.0, -2.0, 0.5, -6.0, 4.0]


def test_repetition_penalty_batched_and_broadcast():
    logits = torch.tensor([[2.0, -1.0, 3.0], [2.0, -1.0, 3.0]])
    per_row = apply_repetition_penalty(logits, torch.tensor([[0, 0], [1, 2]]), 4.0)
    assert per_row.tolist() == [[0.5, -1.0, 3.0], [2.0, -4.0, 0.75]]
    shared = apply_repetition_penalty(logits, torch.tensor([2]), 4.0)
    assert shared.tolist() == [[2.0, -1.0, 0.75], [2.0, -1.0, 0.75]]


def test_repetition_penalty_below_one_rewards_and_empty_history_is_noop():
    logits = torch.tensor([2.0, -1.0])
    assert apply_repetition_penalty(logits, torch.tensor([0, 1]), 0.5).tolist() == [4.0, -0.5]
    empty = torch.zeros(0, dtype=torch.long)
    assert apply_repetition_penalty(logits, empty, 3.0).tolist() == [2.0, -1.0]


def test_temperature_scaling_is_exact():
    logits = torch.tensor([1.0, -2.0, 0.5, 0.0])
    assert apply_temperature(logits, 0.5).tolist() == [2.0, -4.0, 1.0, 0.0]
    assert apply_temperature(logits, 2.0).tolist() == [0.5, -1.0, 0.25, 0.0]
    assert apply_temperature(logits, 1.0).tolist() == [1.0, -2.0, 0.5, 0.0]


# --- parameter validation -------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": -1.0}, {"top_p": float("nan")},
    {"top_k": -1}, {"top_k": 2.5},
    {"min_p": -0.1}, {"min_p": 1.5},
    {"repetition_penalty": 0.0}, {"repetition_penalty": -1.0}, {"repetition_penalty": 1e-39},
    {"repetition_penalty": 1e300},
])
def test_invalid_params_raise(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(InvalidArgumentError, match=name) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_valid_edge_params_accepted():
    params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=0.5, seed=0)
    assert params.greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_functions_validate_their_arguments():
    logits = torch.zeros(4)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        apply_temperature(logits, 0.0)
    with pytest.raises(InvalidArgumentError, match="top_k"):
        top_k_filter(logits, -1)
    with pytest.raises(InvalidArgumentError, match="top_p"):
        top_p_filter(logits, 0.0)
    with pytest.raises(InvalidArgumentError, match="min_p"):
        min_p_filter(logits, 2.0)
    with pytest.raises(InvalidArgumentError, match="repetition_penalty"):
        apply_repetition_penalty(logits, torch.tensor([0]), 0.0)


# --- greedy ------------------------------------------------------------------------

def test_greedy_returns_argmax_for_a_batch():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9], [-5.0, -4.0, -6.0]])
    tokens = make_sampler(SamplingParams(temperature=0.0))(logits)
    assert tokens.dtype == torch.long
    assert tokens.tolist() == [1, 0, 1]


def test_greedy_single_row_gives_scalar_and_honours_penalty():
    sampler = make_sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    logits = torch.tensor([2.0, 1.5, 0.0])
    assert sampler(logits).shape == () and sampler(logits).item() == 0
    assert sampler(logits, torch.tensor([0])).item() == 1  # 2.0 / 2 = 1.0 < 1.5


def test_probabilities_after_filters():
    logits = logits_of(SHUFFLED_PROBS)
    one_hot = probabilities_after_filters(logits, SamplingParams(temperature=0.0))
    assert one_hot.tolist() == [0.0, 1.0, 0.0, 0.0]
    nucleus = probabilities_after_filters(logits, SamplingParams(temperature=1.0, top_p=0.81))
    expected = [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95]
    assert nucleus.tolist() == pytest.approx(expected, abs=1e-6)


def test_sampler_order_temperature_then_top_k_then_top_p():
    # probs 0.5, 0.3, 0.2 at T = 0.5 become 0.25, 0.09, 0.04 (/ 0.38) = 0.658, 0.237,
    # 0.105, so top_p = 0.6 keeps only the top token; on the untempered 0.5 it would not.
    tempered = probabilities_after_filters(logits_of([0.5, 0.3, 0.2]),
                                           SamplingParams(temperature=0.5, top_p=0.6))
    assert tempered.tolist() == [1.0, 0.0, 0.0]
    # top_k = 2 leaves 0.4, 0.3, renormalised to 4/7, 3/7; top_p = 0.5 then keeps only
    # 4/7. (top_p first, on 0.4, 0.3, 0.2, 0.1, would keep two tokens.)
    both = probabilities_after_filters(logits_of([0.4, 0.3, 0.2, 0.1]),
                                       SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
    assert both.tolist() == [1.0, 0.0, 0.0, 0.0]
    # Penalty on the raw logits: 2.0 / 2 = 1.0 ties 1.0, then T = 0.5 gives 2.0 and 2.0.
    penalised = probabilities_after_filters(torch.tensor([2.0, 1.0]),
                                            SamplingParams(temperature=0.5, repetition_penalty=2.0),
                                            previous_ids=torch.tensor([0]))
    assert penalised.tolist() == [0.5, 0.5]


# --- random draws -----------------------------------------------------------------

def draw_sequence(sampler, logits, steps=100):
    return [sampler(logits).item() for _ in range(steps)]


def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.zeros(6)  # uniform: a constant sequence of 100 draws is ~6**-99 likely
    first = draw_sequence(make_sampler(SamplingParams(temperature=1.0, seed=1234)), logits)
    again = draw_sequence(make_sampler(SamplingParams(temperature=1.0, seed=1234)), logits)
    other = draw_sequence(make_sampler(SamplingParams(temperature=1.0, seed=4321)), logits)
    assert first == again
    assert first != other
    assert len(set(first)) > 1  # the sampler's stream advances between calls


def test_no_seed_gives_different_runs():
    logits = torch.zeros(6)
    one = draw_sequence(make_sampler(SamplingParams(temperature=1.0)), logits)
    two = draw_sequence(make_sampler(SamplingParams(temperature=1.0)), logits)
    assert one != two


def test_sampler_output_shapes():
    sampler = make_sampler(SamplingParams(temperature=1.0, seed=0))
    assert sampler(torch.zeros(3, 5)).shape == (3,)
    assert sampler(torch.zeros(3, 5)).dtype == torch.long
    assert sampler(torch.zeros(5)).shape == ()


# Chi-square critical values at significance 1e-3 (standard tables, e.g. NIST/SEMATECH
# e-Handbook 1.3.6.7.4), used only when scipy is not installed.
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}
DRAWS = 20_000


def assert_frequencies_match(tokens, expected_probs):
    """Pearson chi-square goodness of fit over the tokens with expected_prob > 0; tokens
    with expected probability 0 must never be drawn."""
    expected_probs = np.asarray(expected_probs, dtype=np.float64)
    counts = np.bincount(tokens.numpy(), minlength=len(expected_probs))
    assert counts[expected_probs == 0].sum() == 0
    support = expected_probs > 0
    observed = counts[support]
    expected = expected_probs[support] / expected_probs[support].sum() * len(tokens)
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    try:
        from scipy.special import chdtrc  # chi-square survival function (the p-value)
    except ImportError:
        assert statistic < CHI2_CRITICAL_0_001[dof], (observed, expected)
    else:
        assert chdtrc(dof, statistic) > 1e-3, (observed, expected)


RAW_LOGITS = [1.2, -0.4, 0.3, 2.0, -1.5, 0.9]


def softmax_by_hand(values):
    exps = np.exp(np.asarray(values, dtype=np.float64))
    return exps / exps.sum()


def sample_many(params, logits):
    return make_sampler(params)(logits.expand(DRAWS, -1))


def test_frequencies_match_softmax_at_temperature():
    expected = softmax_by_hand(np.array(RAW_LOGITS) / 0.7)
    tokens = sample_many(SamplingParams(temperature=0.7, seed=7), torch.tensor(RAW_LOGITS))
    assert_frequencies_match(tokens, expected)


def test_frequencies_match_top_k_truncation():
    # The three largest logits are 2.0 (index 3), 1.2 (index 0) and 0.9 (index 5).
    scaled = np.array(RAW_LOGITS) / 0.7
    expected = np.zeros(6)
    expected[[3, 0, 5]] = softmax_by_hand(scaled[[3, 0, 5]])
    tokens = sample_many(SamplingParams(temperature=0.7, top_k=3, seed=8), torch.tensor(RAW_LOGITS))
    assert_frequencies_match(tokens, expected)


NUCLEUS_PROBS = [0.1, 0.4, 0.04, 0.15, 0.25, 0.06]


def test_frequencies_match_top_p_truncation():
    # Sorted: 0.4, 0.25, 0.15 | 0.1 ... Mass before 0.15 is 0.65 < 0.75, before 0.1 is
    # 0.8 >= 0.75, so top_p = 0.75 keeps indices 1, 4, 3, renormalised by 0.8.
    expected = [0.0, 0.4 / 0.8, 0.0, 0.15 / 0.8, 0.25 / 0.8, 0.0]
    tokens = sample_many(SamplingParams(temperature=1.0, top_p=0.75, seed=9), logits_of(NUCLEUS_PROBS))
    assert_frequencies_match(tokens, expected)


def test_frequencies_match_min_p_truncation():
    # min_p = 0.2: threshold 0.2 * 0.4 = 0.08 keeps 0.4, 0.25, 0.15, 0.1 (sum 0.9).
    expected = [0.1 / 0.9, 0.4 / 0.9, 0.0, 0.15 / 0.9, 0.25 / 0.9, 0.0]
    tokens = sample_many(SamplingParams(temperature=1.0, min_p=0.2, seed=10), logits_of(NUCLEUS_PROBS))
    assert_frequencies_match(tokens, expected)


# --- properties from the definitions ------------------------------------------------

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=12)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(logit_rows, st.integers(0, 14))
def test_top_k_property(values, k):
    logits = torch.tensor(values)
    survivors = kept(top_k_filter(logits, k))
    if k == 0 or k >= len(values):
        assert survivors == set(range(len(values)))
        return
    kth_largest = sorted(values, reverse=True)[k - 1]
    assert survivors == {i for i, v in enumerate(values) if v >= kth_largest}


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(logit_rows, st.floats(0.01, 0.99))
def test_top_p_property(values, p):
    # From the definition, in float64: the kept set is a top set by probability, its
    # mass reaches p, and without its least probable tokens the mass falls short of p.
    # ROUNDING allows for float32 softmax: probabilities that close may tie there.
    ROUNDING = 1e-6
    probs = softmax_by_hand(values)
    survivors = kept(top_p_filter(torch.tensor(values), p))
    dropped = set(range(len(values))) - survivors
    least_kept = min(probs[i] for i in survivors)
    assert all(probs[i] <= least_kept + ROUNDING for i in dropped)
    assert probs[list(survivors)].sum() >= p - 1e-5
    clearly_above_least = [i for i in survivors if probs[i] > least_kept + ROUNDING]
    assert probs[clearly_above_least].sum() < p + 1e-5


@pytest.mark.parametrize("temperature", [1e-149, 1e-30, 1e-6, 5e-4, 2e-3])
def test_tiny_temperatures_give_the_limit_distribution_not_nan(temperature):
    """logits / 1e-30 overflows float32 (the server's fuzz test once sent 4e-149): the distribution
    must still be softmax(logits / T), here computed in float64 (no overflow down to ~1e-300):
    the argmax, ties shared, and for not-so-tiny T the near-ties still in play."""
    logits = torch.tensor([[3.0, -1.0, 2.9999, -math.inf], [5.0, 5.0, 1.0, 0.0], [-math.inf] * 3 + [-2.0]])
    expected = torch.softmax(logits.double() / temperature, dim=-1).float()
    params = SamplingParams(temperature=temperature, seed=0)
    torch.testing.assert_close(probabilities_after_filters(logits, params), expected, rtol=1e-5, atol=1e-6)
    draws = torch.stack([make_sampler(params)(logits) for _ in range(20)])  # (20, 3)
    assert (draws[:, 0] == 0).all() if temperature < 1e-4 else set(draws[:, 0].tolist()) <= {0, 2}
    assert set(draws[:, 1].tolist()) <= {0, 1} and (draws[:, 2] == 3).all()
