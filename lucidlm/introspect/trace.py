"""Generation step by step: each chosen token with its probability and the runners-up.

The steps come from `generate_tokens`, the same loop every front end uses, so the traced
tokens are exactly the ones `generate` would produce with the same sampling parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import InvalidArgumentError
from ..generate import generate_tokens
from ..sampling import SamplingParams, make_sampler, probabilities_after_filters
from .token_labels import token_text


@dataclass
class Candidate:
    token_id: int
    text: str
    prob: float  # the model's probability: softmax of its raw logits
    sampled_prob: float | None  # in the distribution actually drawn from (after temperature and filters); None if greedy


@dataclass
class TraceStep:
    index: int
    chosen: Candidate
    candidates: list[Candidate]  # the top-k by model probability, most likely first

    def to_json(self) -> dict:
        return asdict(self)


def trace_generation(model, tokenizer, prompt_ids: list[int], params: SamplingParams, steps: int,
                     top_k: int = 5, stop_ids=()) -> list[TraceStep]:
    """Generate up to `steps` tokens and record each step's choice and top-k candidates."""
    if top_k < 1:
        raise InvalidArgumentError(f"top_k (candidates shown) must be >= 1, got {top_k}")
    if params.repetition_penalty != 1:
        # Steps carry log-softmax(logits), not the logits; the penalty depends on the
        # logits' signs, so the drawn-from distribution could not be rebuilt here.
        raise InvalidArgumentError("trace does not support a repetition penalty")
    trace = []
    for index, step in enumerate(generate_tokens(model, prompt_ids, make_sampler(params), steps, stop_ids=stop_ids)):
        probs = step.logprobs.exp()  # (V,)
        # Temperature, top-k, top-p and min-p only compare logits or divide them, so
        # log-softmax(logits) (logits shifted by a constant) gives the same distribution.
        sampled = None if params.greedy else probabilities_after_filters(step.logprobs, params)

        def candidate(token_id: int) -> Candidate:
            return Candidate(token_id, token_text(tokenizer, token_id), float(probs[token_id]),
                             None if sampled is None else float(sampled[token_id]))

        top = torch.topk(probs, min(top_k, probs.shape[0])).indices.tolist()
        trace.append(TraceStep(index, candidate(step.token_id), [candidate(t) for t in top]))
    return trace
