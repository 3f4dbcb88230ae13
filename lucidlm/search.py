"""Search strategies: beam search and contrastive search, for one prompt at a time.

Both prefill the prompt once with batch 1, then widen the KV cache to several rows with
`KVCache.reorder` (a row per beam, or per candidate token), so the prompt is never
recomputed. Shapes: K = beams or candidates, V = vocabulary, C = d_model, S = positions.

Beam search follows Hugging Face transformers' definition (generation/utils.py,
`_beam_search`), so that its sequences and `sequences_scores` can be compared exactly:

- every step keeps the 2K best (beam, token) continuations by summed log-probability
  (more when there are several stop ids: max(2, 1 + #stop ids) * K), so that K of them
  are still running even if the best ones all end;
- a continuation ending with a stop id, or reaching max_new_tokens, is finished if it is
  among the K best of the step; its score is  sum of log-probs / L ** length_penalty,
  L = number of generated tokens (the stop token included, the prompt not);
- the K best finished hypotheses are kept. Search ends when no running beam can beat the
  worst of them (early_stopping=False: judged at the current length; "never": at
  max_new_tokens if length_penalty > 0), or, with early_stopping=True, as soon as K
  hypotheses are finished.

Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation",
arXiv:2202.06417) picks, among the top_k most probable tokens v,

    argmax_v (1 - alpha) * p(v | context) - alpha * max_j cos(h_v, h_j)

where h_v is the last hidden state (output of the final norm) of the sequence extended by
v and h_j those of every earlier position, prompt included: a penalty on tokens that would
make the representation repeat itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError
from .generate import Step, check_fits
from .models.layers import model_device
from .penalties import LogitControls
from .sampling import apply_repetition_penalty

NOT_A_SCORE = -1.0e9  # Hugging Face's stand-in for "excluded"; finite, so arithmetic on it stays finite


@dataclass(frozen=True)
class BeamParams:
    num_beams: int = 4
    length_penalty: float = 1.0  # > 0 favours longer hypotheses, < 0 shorter ones
    early_stopping: bool | str = False  # True, False or "never", as in Hugging Face
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise InvalidArgumentError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            raise InvalidArgumentError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidArgumentError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        n = self.num_return_sequences
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.num_beams:
            raise InvalidArgumentError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], got {n!r}")


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens; ends with the stop id when it ended on one
    score: float  # sum of (processed) log-probs / len(token_ids) ** length_penalty
    steps: list[Step] = field(default_factory=list)  # raw log-probs per token, if asked for


def _processed_logprobs(logprobs: torch.Tensor, sequences: torch.Tensor, n_generated: int, stop_ids: set[int],
                        controls: LogitControls | None, repetition_penalty: float) -> torch.Tensor:
    """Apply the logit controls to each row of logprobs (K, V) given its sequence (K, N)."""
    if (controls is None or not controls.active) and repetition_penalty == 1:
        return logprobs
    rows = []
    for row, sequence in zip(logprobs, sequences):
        if controls is not None:
            row = controls.apply(row, sequence, n_generated, stop_ids)
        rows.append(apply_repetition_penalty(row, sequence, repetition_penalty))
    return torch.stack(rows)


@torch.inference_mode()
def beam_search(model, prompt_ids: list[int], max_new_tokens: int, params: BeamParams,
                stop_ids: Iterable[int] = (), controls: LogitControls | None = None,
                repetition_penalty: float = 1.0, keep_steps: bool = False,
                max_time: float | None = None) -> list[Hypothesis]:
    """The `num_return_sequences` best hypotheses, best first (see the module docstring).

    Log-probabilities go through `controls` and the repetition penalty (as Hugging Face
    runs its logits processors on log-probs) before they are summed into scores.
    keep_steps: record each token's raw log-softmax row (V,) in `Hypothesis.steps`.
    max_time: once this many seconds have passed, the step under way is the last one (every
    continuation ends there, as with Hugging Face's MaxTimeCriteria).
    """
    check_fits(len(prompt_ids), max_new_tokens, model.config.context_length)
    started = time.perf_counter()
    K, stop_ids = params.num_beams, set(stop_ids)
    if max_new_tokens == 0:
        return [Hypothesis([], 0.0) for _ in range(params.num_return_sequences)]
    keep = max(2, 1 + len(stop_ids)) * K  # continuations kept per step
    lp, early = params.length_penalty, params.early_stopping
    device = model_device(model)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, P)

    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    logits = model(prompt, cache, last_only=True)[:, -1]  # (1, V)
    cache.reorder(torch.zeros(K, dtype=torch.long, device=device))  # one row per beam
    logits = logits.expand(K, -1)  # (K, V)
    # Only beam 0 is live at first, so the first step's K beams are K different tokens.
    running_scores = torch.full((K,), NOT_A_SCORE, device=device)
    running_scores[0] = 0.0
    running = torch.empty(K, 0, dtype=torch.long, device=device)  # (K, t) generated tokens per beam
    running_steps: list[list[Step]] = [[] for _ in range(K)]
    finished: list[Hypothesis] = []  # at most K, best first
    can_improve = True  # Hugging Face's "early stop heuristic unsatisfied"

    for t in range(max_new_tokens):  # t tokens generated so far
        raw = torch.log_softmax(logits.float(), dim=-1)  # (K, V)
        logprobs = _processed_logprobs(raw, torch.cat([prompt.expand(K, -1), running], dim=1), t, stop_ids,
                                       controls, repetition_penalty)
        V = logprobs.shape[-1]
        totals = (logprobs + running_scores[:, None]).view(-1)  # (K*V,): every (beam, token) continuation
        top_scores, top_index = totals.topk(keep)  # best first
        beam_of, token_of = top_index // V, top_index % V  # (keep,)
        last_step = t + 1 == max_new_tokens or (max_time is not None and time.perf_counter() - started >= max_time)
        ends = torch.tensor([last_step or int(v) in stop_ids for v in token_of], device=device)  # (keep,)

        def extend(i: int) -> tuple[list[int], list[Step]]:
            b, v = int(beam_of[i]), int(token_of[i])
            steps = running_steps[b] + [Step(v, raw[b])] if keep_steps else []
            return running[b].tolist() + [v], steps

        # Finished hypotheses: only the K best continuations may end, and none once the
        # search can no longer improve, or (early_stopping=True) the K slots are full.
        if can_improve and not (early is True and len(finished) == K):
            for i in range(K):
                if ends[i]:
                    ids, steps = extend(i)
                    finished.append(Hypothesis(ids, float(top_scores[i]) / (t + 1) ** lp, steps))
            finished = sorted(finished, key=lambda h: -h.score)[:K]  # stable: earlier ones win ties

        if bool(ends.all()):
            break
        # The K best continuations that did not end keep running.
        chosen = (top_scores + ends * NOT_A_SCORE).topk(K).indices  # (K,)
        running_scores = top_scores[chosen]
        if keep_steps:
            running_steps = [extend(int(i))[1] for i in chosen]
        running = torch.cat([running[beam_of[chosen]], token_of[chosen, None]], dim=1)  # (K, t+1)

        # Can a running beam still beat the worst finished hypothesis?
        best_length = max_new_tokens if early == "never" and lp > 0 else t + 1
        worst_finished = finished[-1].score if len(finished) == K else NOT_A_SCORE
        can_improve = can_improve and float(running_scores[0]) / best_length**lp > worst_finished
        if not can_improve or (early is True and len(finished) == K):
            break
        cache.reorder(beam_of[chosen])  # each row continues the cache of the beam it extends
        logits = model(token_of[chosen, None], cache)[:, -1]  # (K, V)
    return finished[: params.num_return_sequences]


class FinalHiddenStates:
    """Capture the output of `model.norm`, the last hidden state (B, T, C), on every forward.

    The model maps tokens to logits and returns nothing else (by design: no output flags in
    `forward`), but contrastive search needs the vector that `lm_head` reads. A forward hook
    on the final norm gives exactly that without touching the model, and costs nothing once
    removed: use as a context manager.
    """

    def __init__(self, model):
        self.model = model
        self.last: torch.Tensor | None = None

    def _hook(self, module, inputs, output) -> None:
        self.last = output

    def __enter__(self) -> "FinalHiddenStates":
        self._handle = self.model.norm.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def check_contrastive(penalty_alpha: float, top_k: int) -> None:
    if isinstance(penalty_alpha, bool) or not isinstance(penalty_alpha, (int, float)) or not 0 <= penalty_alpha <= 1:
        raise InvalidArgumentError(f"penalty_alpha must be in [0, 1], got {penalty_alpha!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidArgumentError(f"contrastive search needs top_k >= 1 candidates, got {top_k!r}")


@torch.inference_mode()
def contrastive_search_tokens(model, prompt_ids: list[int], max_new_tokens: int, penalty_alpha: float,
                              top_k: int, stop_ids: Iterable[int] = (), controls: LogitControls | None = None,
                              repetition_penalty: float = 1.0, max_time: float | None = None) -> Iterator[Step]:
    """Yield contrastive-search steps, one per token (like `generate.generate_tokens`).

    Each step runs the top_k candidates as one batch of k rows over the shared prefix (the
    cache widened to k rows), then keeps the winner's row: its logits are the next step's
    and its hidden state joins the context, so every step costs one forward pass.
    """
    check_fits(len(prompt_ids), max_new_tokens, model.config.context_length)
    check_contrastive(penalty_alpha, top_k)
    started, stop_ids = time.perf_counter(), set(stop_ids)
    if max_new_tokens == 0:
        return
    device = model_device(model)
    sequence = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (N,)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    with FinalHiddenStates(model) as hidden:
        logits = model(sequence[None], cache)[0, -1]  # (V,)
        context = F.normalize(hidden.last[0].float(), dim=-1)  # (S, C) unit vectors, S = positions so far
        for step in range(max_new_tokens):
            scores = logits if controls is None else controls.apply(logits, sequence, step, stop_ids)
            scores = apply_repetition_penalty(scores, sequence, repetition_penalty)
            top_probs, candidates = scores.softmax(dim=-1).topk(min(top_k, scores.shape[-1]))  # (k,), (k,)
            k = candidates.shape[0]
            cache.reorder(torch.zeros(k, dtype=torch.long, device=device))  # k copies of the prefix
            candidate_logits = model(candidates[:, None], cache)[:, -1]  # (k, V)
            candidate_hidden = F.normalize(hidden.last[:, -1].float(), dim=-1)  # (k, C)
            degeneration = (candidate_hidden @ context.T).max(dim=-1).values  # (k,) max cosine similarity
            best = int(((1 - penalty_alpha) * top_probs - penalty_alpha * degeneration).argmax())
            cache.reorder(torch.tensor([best], device=device))
            token_id = int(candidates[best])
            yield Step(token_id, torch.log_softmax(logits.float(), dim=-1))
            if token_id in stop_ids or step == max_new_tokens - 1:
                return
            if max_time is not None and time.perf_counter() - started >= max_time:
                return
            sequence = torch.cat([sequence, candidates[best, None]])
            context = torch.cat([context, candidate_hidden[best, None]])  # (S+1, C)
            logits = candidate_logits[best]
