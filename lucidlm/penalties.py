"""Controls that reshape logits from what was generated so far: pure functions, plus `LogitControls`.

Like the functions in `sampling.py`, each takes `logits` of shape [..., V], works on a
float32 copy and returns a new tensor of the same shape; banned tokens get `-inf`.

- `apply_presence_frequency_penalties`: OpenAI's presence and frequency penalties,
  https://platform.openai.com/docs/advanced-usage (parameter details):
      logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty
  where count[j] is how often token j was *generated* so far (the prompt does not count).
- `apply_logit_bias`: add a fixed bias to chosen token ids (OpenAI's `logit_bias`).
- `ban_repeated_ngrams`: the `no_repeat_ngram_size` rule (Paulus et al. 2017,
  arXiv:1705.04304; Hugging Face's NoRepeatNGramLogitsProcessor): a token that would
  complete an n-gram already present in the sequence (prompt included) is banned.
- `ban_tokens`: set given ids to -inf; used to hold back stop tokens until
  `min_new_tokens` tokens exist.

`LogitControls` bundles the options and applies them in one call, before the sampler (or
before a search strategy picks its candidates).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .errors import InvalidArgumentError


def _float_copy(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.float32, copy=True)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def apply_presence_frequency_penalties(logits: torch.Tensor, generated_ids: torch.Tensor,
                                       presence_penalty: float, frequency_penalty: float) -> torch.Tensor:
    """logits [..., V] -> [..., V], penalising tokens by how often they were generated.

    generated_ids [..., N]: the tokens generated so far, same leading dims as logits (or [N],
    shared by every row). Negative penalties make repetition more likely.
    """
    scores = _float_copy(logits)
    if generated_ids.numel() == 0 or (presence_penalty == 0 and frequency_penalty == 0):
        return scores
    ids = generated_ids.to(device=scores.device, dtype=torch.long)
    ids = ids.expand(*scores.shape[:-1], ids.shape[-1])
    counts = torch.zeros_like(scores).scatter_add_(-1, ids, torch.ones_like(ids, dtype=scores.dtype))  # [..., V]
    return scores - counts * frequency_penalty - (counts > 0).to(scores.dtype) * presence_penalty


def apply_logit_bias(logits: torch.Tensor, logit_bias: Mapping[int, float]) -> torch.Tensor:
    """Add logit_bias[id] to the logit of each listed token id: logits [..., V] -> [..., V]."""
    scores = _float_copy(logits)
    if not logit_bias:
        return scores
    vocab_size = scores.shape[-1]
    for token_id in logit_bias:
        if not 0 <= token_id < vocab_size:
            raise InvalidArgumentError(f"logit_bias names token id {token_id}, outside the vocabulary "
                                       f"[0, {vocab_size})")
    ids = torch.tensor(list(logit_bias), dtype=torch.long, device=scores.device)
    bias = torch.tensor(list(logit_bias.values()), dtype=scores.dtype, device=scores.device)
    scores[..., ids] += bias
    return scores


def repeated_ngram_completions(sequence: torch.Tensor, n: int) -> torch.Tensor:
    """Token ids that would complete an n-gram already in `sequence` ([N] long): the last
    tokens of every earlier n-gram whose first n-1 tokens equal the sequence's last n-1."""
    if n <= 0 or sequence.numel() < n:
        return sequence.new_empty(0)
    windows = sequence.unfold(0, n, 1)  # (N - n + 1, n): every n-gram, in order
    prefix = sequence[sequence.numel() - (n - 1):]  # (n-1,): the n-gram the next token would end
    matches = (windows[:, : n - 1] == prefix).all(dim=1)  # for n = 1 every window matches
    return windows[matches, n - 1].unique()


def ban_repeated_ngrams(logits: torch.Tensor, sequence: torch.Tensor, n: int) -> torch.Tensor:
    """Ban every token that would repeat an n-gram of `sequence` ([N] ids, prompt included).

    logits [..., V] -> [..., V], every row judged against the same sequence. n = 0: no-op.
    """
    scores = _float_copy(logits)
    banned = repeated_ngram_completions(sequence.to(device=scores.device, dtype=torch.long), n)
    scores[..., banned] = -math.inf
    return scores


def ban_tokens(logits: torch.Tensor, token_ids: Iterable[int]) -> torch.Tensor:
    """Set the logits of `token_ids` to -inf: logits [..., V] -> [..., V]."""
    scores = _float_copy(logits)
    ids = [i for i in token_ids if 0 <= i < scores.shape[-1]]
    if ids:
        scores[..., ids] = -math.inf
    return scores


@dataclass(frozen=True)
class LogitControls:
    """Options that adjust logits from the sequence so far; validated on construction.

    Applied in this order: logit_bias, presence/frequency penalties, n-gram ban, stop-token
    ban (min_new_tokens). Bans come last so that no bias can bring a banned token back.
    """

    presence_penalty: float = 0.0  # in [-2, 2], as in OpenAI's API
    frequency_penalty: float = 0.0  # in [-2, 2]
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit
    no_repeat_ngram_size: int = 0  # 0 = off
    min_new_tokens: int = 0  # stop tokens are banned until this many tokens are generated

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise InvalidArgumentError(f"{name} must be in [-2, 2], got {value!r}")
        for name in ("no_repeat_ngram_size", "min_new_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise InvalidArgumentError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.logit_bias, Mapping):
            raise InvalidArgumentError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
        for token_id, bias in self.logit_bias.items():
            if not _is_int(token_id) or token_id < 0:
                raise InvalidArgumentError(f"logit_bias keys must be token ids (integers >= 0), got {token_id!r}")
            # OpenAI's range: -100 bans a token, +100 forces it; far beyond, float32 logits overflow to inf
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise InvalidArgumentError(f"logit_bias[{token_id}] must be a number in [-100, 100], got {bias!r}")

    @property
    def active(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.no_repeat_ngram_size or self.min_new_tokens)

    def apply(self, logits: torch.Tensor, sequence: torch.Tensor, n_generated: int,
              stop_ids: Iterable[int] = ()) -> torch.Tensor:
        """logits [..., V] for the token after `sequence` ([N] ids: prompt then the
        `n_generated` tokens generated so far) -> adjusted float32 logits [..., V]."""
        if not self.active:
            return logits
        scores = apply_logit_bias(logits, self.logit_bias)
        generated = sequence[sequence.numel() - n_generated:] if n_generated else sequence[:0]
        scores = apply_presence_frequency_penalties(scores, generated, self.presence_penalty, self.frequency_penalty)
        scores = ban_repeated_ngrams(scores, sequence, self.no_repeat_ngram_size)
        if n_generated < self.min_new_tokens:
            scores = ban_tokens(scores, stop_ids)
        return scores
