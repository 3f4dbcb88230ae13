"""Choosing the next token: pure functions on logits, composed by `make_sampler`.

Every function takes `logits` of shape [..., V] (V = vocabulary size, any leading batch
dimensions), works on a float32 copy and returns a new float32 tensor of the same shape;
the input is never modified. Filtered-out tokens get the logit `-inf`, so a later
softmax gives them probability exactly 0 and they can never be drawn.

The sampler applies the steps in this order:

1. repetition penalty -- defined (CTRL paper, Hugging Face) on the raw logits, whose
   sign decides whether to divide or multiply. Dividing by a temperature > 0 keeps
   signs, so the two steps commute; penalising first lets greedy decoding, which
   skips temperature, share the step.
2. greedy (temperature 0): take the argmax and stop; nothing below changes the argmax.
3. temperature -- reshapes the distribution that the filters then look at, so "top-p 0.9"
   means 90% of the mass of the distribution we actually draw from.
4. top-k, 5. top-p, 6. min-p -- each filter sees the logits left by the previous one, so
   top-p measures mass among the top-k survivors, as in Hugging Face and llama.cpp.
   Filters work on logits (setting -inf) rather than on probabilities, so they compose
   without renormalising in between: softmax renormalises once at the end.
7. softmax, then `torch.multinomial` with the sampler's own seeded `torch.Generator`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lucidlm.errors import InvalidArgumentError
from lucidlm.kernels import cpu_decode

# Cumulative probability within this distance of top_p counts as having reached it, so
# that e.g. probabilities 0.6 + 0.35 meet top_p = 0.95 although float32 sums them to less.
TOP_P_TOLERANCE = 1e-6


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# parameter name -> (test of an allowed value, the allowed range in words)
_ALLOWED = {
    "temperature": (lambda t: _is_real(t) and math.isfinite(t) and t >= 0, "finite and >= 0"),
    "top_k": (lambda k: _is_int(k) and k >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda p: _is_real(p) and 0 < p <= 1, "in (0, 1] (1 = off)"),
    "min_p": (lambda m: _is_real(m) and 0 <= m <= 1, "in [0, 1] (0 = off)"),
    # (bounded: logits divided by a penalty near 0, or multiplied by a huge one, overflow float32)
    "repetition_penalty": (lambda r: _is_real(r) and 1e-6 <= r <= 1e6, "in [1e-6, 1e6] (1 = off)"),
    "seed": (lambda s: s is None or (_is_int(s) and 0 <= s < 2**64),
             "None or an integer in [0, 2**64)"),
}


def _check(name: str, value: object) -> None:
    """Raise InvalidArgumentError naming the parameter and its range if value is not allowed."""
    is_allowed, allowed_range = _ALLOWED[name]
    if not is_allowed(value):
        raise InvalidArgumentError(f"{name} must be {allowed_range}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; validated on construction (InvalidArgumentError)."""

    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1 means no nucleus filter
    min_p: float = 0.0  # 0 means no min-p filter
    repetition_penalty: float = 1.0  # 1 means no penalty
    seed: int | None = None  # None means fresh randomness for every sampler

    def __post_init__(self) -> None:
        for name in _ALLOWED:
            _check(name, getattr(self, name))

    @property
    def greedy(self) -> bool:
        """True when sampling is deterministic argmax (temperature == 0)."""
        return self.temperature == 0


def _float_copy(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.float32, copy=True)


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: logits [..., V] -> [..., V].

    previous_ids [..., N] (integer ids, same leading dims as logits or broadcastable to
    them, e.g. [N] for every row). Each token that occurs in previous_ids has its logit
    divided by `penalty` if positive, multiplied by it if <= 0 (the CTRL / Hugging Face
    definition). A token is penalised once however many times it occurred: repeated
    ids all write the same value, computed from the original logit.
    """
    _check("repetition_penalty", penalty)
    scores = _float_copy(logits)
    if penalty == 1 or previous_ids.numel() == 0:
        return scores
    ids = previous_ids.to(device=scores.device, dtype=torch.long)
    ids = ids.expand(*scores.shape[:-1], ids.shape[-1])
    seen = scores.gather(-1, ids)
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)
    return scores.scatter_(-1, ids, penalised)


SHIFT_BELOW = 1e-3  # apply_temperature: temperatures below this divide logits less their row maximum


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits [..., V] by temperature (> 0): below 1 sharpens, above 1 flattens.

    Below SHIFT_BELOW each row's largest finite logit is subtracted first: the same distribution,
    but a tiny temperature (1e-30, say) would otherwise turn every logit into ±inf (float32 has no
    larger numbers), and softmax(inf - inf) is NaN. Shifted, the best logits stay 0 and the rest
    go to -inf: the argmax, ties shared, as the limit of a vanishing temperature should be. A
    temperature below 1e-30 divides as 1e-30 (float32 would round it to 0), which gives the same
    distribution: e^(-d / 1e-30) is 0 in float32 for any gap d above 1e-28 between two logits.
    """
    _check("temperature", temperature)
    if temperature == 0:
        raise InvalidArgumentError("temperature must be > 0 here (0 means greedy: use argmax)")
    scores = _float_copy(logits)
    if temperature < SHIFT_BELOW:
        best = scores.masked_fill(~scores.isfinite(), -math.inf).amax(dim=-1, keepdim=True)
        scores -= torch.where(best.isfinite(), best, torch.zeros_like(best))  # (a row with no finite logit: as is)
    return scores / max(temperature, 1e-30)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row [..., V], set the rest to -inf.

    Ties: every token whose logit >= the k-th largest value is kept, so more than k
    tokens survive when several share the k-th value. k = 0 or k >= V: no-op.
    """
    _check("top_k", k)
    scores = _float_copy(logits)
    if k == 0 or k >= scores.shape[-1]:
        return scores
    kth_largest = scores.topk(k, dim=-1).values[..., -1:]
    return scores.masked_fill_(scores < kth_largest, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter on logits [..., V]: keep the smallest set of most probable tokens
    whose total probability (softmax of the row) is >= p; set the rest to -inf.

    The most probable token is always kept. Ties: every token as probable as the least
    probable kept one is kept too. Mass within TOP_P_TOLERANCE of p counts as p.
    p = 1: no-op.
    """
    _check("top_p", p)
    scores = _float_copy(logits)
    if p == 1:
        return scores
    probs = scores.softmax(dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    mass_before = F.pad(sorted_probs.cumsum(dim=-1)[..., :-1], (1, 0))  # exclusive sum
    kept_count = (mass_before < p - TOP_P_TOLERANCE).sum(dim=-1, keepdim=True).clamp(min=1)
    smallest_kept_prob = sorted_probs.gather(-1, kept_count - 1)
    return scores.masked_fill_(probs < smallest_kept_prob, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability >= min_p * (probability of the top token).

    logits [..., V] -> [..., V]. Computed on logits: p_i >= min_p * p_max is
    logit_i >= max_logit + log(min_p). min_p = 0: no-op; min_p = 1 keeps the top ties.
    """
    _check("min_p", min_p)
    scores = _float_copy(logits)
    if min_p == 0:
        return scores
    threshold = scores.amax(dim=-1, keepdim=True) + math.log(min_p)
    return scores.masked_fill_(scores < threshold, -math.inf)


def _final_logits(logits: torch.Tensor, params: SamplingParams,
                  previous_ids: torch.Tensor | None) -> torch.Tensor:
    """Apply every step before the draw (see module docstring for the order)."""
    scores = logits
    if previous_ids is not None and params.repetition_penalty != 1:  # (1: a copy of the logits, unchanged)
        scores = apply_repetition_penalty(scores, previous_ids, params.repetition_penalty)
    if params.greedy:
        return scores
    scores = apply_temperature(scores, params.temperature)
    scores = top_k_filter(scores, params.top_k)
    scores = top_p_filter(scores, params.top_p)
    return min_p_filter(scores, params.min_p)


def probabilities_after_filters(logits: torch.Tensor, params: SamplingParams,
                                previous_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution [..., V] the sampler draws from (a one-hot at the argmax if greedy)."""
    scores = _final_logits(logits, params, previous_ids)
    if params.greedy:
        return F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(torch.float32)
    return scores.softmax(dim=-1)


class Sampler:
    """Picks next tokens for one generation; holds one random stream across calls.

    Draws happen on the CPU with a CPU generator, so a seed gives the same tokens
    whatever device the logits live on.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is None:
            self.generator.seed()  # fresh, non-deterministic seed
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor,
                 previous_ids: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] -> token ids [B] (long); logits [V] -> a 0-dim long tensor.

        previous_ids [B, N] or [N]: tokens seen so far, for the repetition penalty.
        """
        scores = _final_logits(logits, self.params, previous_ids)
        if self.params.greedy:
            return _argmax(scores)
        probs = scores.softmax(dim=-1)
        rows = probs.reshape(-1, probs.shape[-1]).cpu()
        draws = torch.multinomial(rows, num_samples=1, generator=self.generator)
        return draws.reshape(probs.shape[:-1]).to(logits.device)


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(dim=-1); for (B, V) float32 rows on a CPU through our kernel where it is loaded
    (packed models on AVX-512 VNNI CPUs: `kernels.cpu_decode`), the same indices ~10x sooner (PyTorch's
    reduction takes ~0.13 ms over Gemma 3's 262,144 logits, ~2 % of a decode step)."""
    if (scores.dim() == 2 and scores.dtype == torch.float32 and scores.device.type == "cpu"
            and scores.stride(-1) == 1 and cpu_decode.loaded()):
        return cpu_decode.argmax(scores)
    return scores.argmax(dim=-1)


def make_sampler(params: SamplingParams) -> Sampler:
    """A callable `sampler(logits, previous_ids=None) -> token ids` for these params."""
    return Sampler(params)
