"""Choosing a decoding strategy from the user's options, and the detailed result it returns.

`DecodingOptions.from_kwargs(**kwargs)` turns the keyword arguments of
`LucidModel.generate_detailed` (and the CLI flags) into one validated object; `decode`
runs the strategy it names and returns a `Generation`:

    greedy       argmax at every step                        generate.generate_tokens
    sample       temperature > 0, with top-k/top-p/min-p     generate.generate_tokens
                 (with prompt_lookup = k > 0: up to k guesses  (prompt_lookup.NgramIndex)
                 checked per forward pass, same distribution)
    beam         num_beams > 1                               search.beam_search
    contrastive  penalty_alpha > 0 with top_k candidates     search.contrastive_search_tokens
    n > 1        (greedy or sample) n rows in one batch      batch.BatchGenerator

With `strategy=None` it is inferred from the options in that order (beam, contrastive,
sample, greedy). Log-probabilities reported per token are those of the model's raw
distribution (log-softmax of its logits, before penalties, temperature and filters).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import torch

from .batch import BatchGenerator
from .errors import InvalidArgumentError
from .generate import GenerationStats, Step, TextStream, generate_tokens
from .penalties import LogitControls
from .sampling import SamplingParams, make_sampler
from .search import BeamParams, beam_search, check_contrastive, contrastive_search_tokens
from .tokenizers import IncrementalDecoder

STRATEGIES = ("greedy", "sample", "beam", "contrastive")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TokenLogprob:
    id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    token: str
    logprob: float  # log-probability of this token under the model
    top: list[TokenLogprob]  # the `logprobs` most likely tokens at this step, most likely first


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # as in `text`: without a final stop token
    finish_reason: str  # "stop", "length" or "time"
    score: float | None = None  # beam search: length-normalised sum of log-probs
    tokens: list[GeneratedToken] | None = None  # with logprobs > 0: one entry per token id


@dataclass
class Generation:
    """What `LucidModel.generate_detailed` returns; `.text` is the first (best) completion."""

    strategy: str
    prompt_ids: list[int]
    completions: list[Completion]
    stats: GenerationStats

    @property
    def text(self) -> str:
        return self.completions[0].text

    def to_dict(self) -> dict:
        """Plain JSON-ready data (the CLI's --json output)."""
        stats = {k: v for k, v in asdict(self.stats).items() if k != "token_ids"}
        return {"strategy": self.strategy, "prompt_tokens": len(self.prompt_ids),
                "completions": [asdict(c) for c in self.completions], "stats": stats}


MAX_ROWS = 64  # most beams or samples one call decodes side by side (each a batch row with its own cache)


@dataclass(frozen=True)
class DecodingOptions:
    max_new_tokens: int = 128
    strategy: str | None = None  # one of STRATEGIES; None: inferred (see module docstring)
    sampling: SamplingParams = SamplingParams()
    controls: LogitControls = LogitControls()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    penalty_alpha: float = 0.0
    n: int = 1
    logprobs: int = 0  # how many top alternatives to report per token (0: no log-probs)
    max_time: float | None = None  # seconds
    stop: tuple[str, ...] = ()
    use_cache: bool = True
    prompt_lookup: int = 0  # guesses checked per forward pass (0: one token per pass); see prompt_lookup.py

    @classmethod
    def from_kwargs(cls, **kwargs) -> "DecodingOptions":
        """Split flat keyword arguments into sampling params, logit controls and the rest."""
        groups = {}
        for group, group_cls in (("sampling", SamplingParams), ("controls", LogitControls)):
            names = {f.name for f in fields(group_cls)}
            groups[group] = group_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        stop = kwargs.pop("stop", None)
        stops = (stop,) if isinstance(stop, str) else stop or ()
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise InvalidArgumentError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        kwargs["stop"] = tuple(stops)
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidArgumentError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs, **groups)

    def __post_init__(self) -> None:
        for name in ("num_beams", "n"):
            value = getattr(self, name)
            # (bounded: each beam or sample is a row of the batch, with its own KV cache)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ROWS:
                raise InvalidArgumentError(f"{name} must be an integer in [1, {MAX_ROWS}], got {value!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InvalidArgumentError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.early_stopping not in (True, False, "never"):  # (checked here too: BeamParams only sees beam search)
            raise InvalidArgumentError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.use_cache, bool):
            raise InvalidArgumentError(f"use_cache must be True or False, got {self.use_cache!r}")
        for name in ("logprobs", "prompt_lookup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(f"{name} must be an integer >= 0, got {value!r}")
        if self.max_time is not None and not (_is_number(self.max_time) and self.max_time > 0):
            raise InvalidArgumentError(f"max_time must be None or > 0 seconds, got {self.max_time!r}")
        if not (_is_number(self.penalty_alpha) and 0 <= self.penalty_alpha <= 1):
            raise InvalidArgumentError(f"penalty_alpha must be in [0, 1], got {self.penalty_alpha!r}")
        if self.strategy is None:
            inferred = ("beam" if self.num_beams > 1 else "contrastive" if self.penalty_alpha > 0
                        else "sample" if not self.sampling.greedy else "greedy")
            object.__setattr__(self, "strategy", inferred)
        if self.strategy not in STRATEGIES:
            raise InvalidArgumentError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        self._check_combination()

    def _check_combination(self) -> None:
        s, greedy = self.strategy, self.sampling.greedy
        if s == "greedy" and not greedy:
            raise InvalidArgumentError("strategy 'greedy' needs temperature 0 (use strategy 'sample')")
        if s == "sample" and greedy:
            raise InvalidArgumentError("strategy 'sample' needs temperature > 0")
        if s in ("beam", "contrastive") and not greedy:
            raise InvalidArgumentError(f"{s} search is deterministic: it cannot be combined with temperature > 0")
        if s in ("beam", "contrastive") and self.n > 1:
            raise InvalidArgumentError(f"n > 1 needs greedy or sample, not {s} (beam search: num_return_sequences)")
        if s != "beam" and (self.num_beams > 1 or self.num_return_sequences > 1):
            raise InvalidArgumentError(f"num_beams and num_return_sequences apply to beam search, not {s}")
        if s == "beam":
            BeamParams(self.num_beams, self.length_penalty, self.early_stopping, self.num_return_sequences)
        if s == "contrastive":
            check_contrastive(self.penalty_alpha, self.sampling.top_k)
        if s != "contrastive" and self.penalty_alpha > 0:
            raise InvalidArgumentError(f"penalty_alpha applies to contrastive search, not {s}")
        if not self.use_cache and (s not in ("greedy", "sample") or self.n > 1):
            raise InvalidArgumentError("use_cache=False is only available for greedy and sample with n = 1")
        if self.prompt_lookup and (s not in ("greedy", "sample") or self.n > 1 or not self.use_cache):
            raise InvalidArgumentError("prompt_lookup is available for greedy and sample with n = 1 and the KV cache")


def token_steps(model, prompt_ids: list[int], options: DecodingOptions, stop_ids: set[int]) -> Iterator[Step]:
    """The steps of a one-sequence, token-by-token strategy (greedy, sample, contrastive)."""
    o = options
    if o.strategy == "contrastive":
        return contrastive_search_tokens(model, prompt_ids, o.max_new_tokens, o.penalty_alpha, o.sampling.top_k,
                                         stop_ids, o.controls, o.sampling.repetition_penalty, o.max_time)
    if o.strategy == "beam" or o.n > 1:
        raise InvalidArgumentError(f"{o.strategy} with n={o.n} does not stream: use generate_detailed")
    return generate_tokens(model, prompt_ids, make_sampler(o.sampling), o.max_new_tokens, stop_ids, o.use_cache,
                           o.controls, o.max_time, o.prompt_lookup)


def top_logprobs(logprobs: torch.Tensor, k: int, token_text) -> list[TokenLogprob]:
    """The k most likely tokens of a (V,) log-prob row, most likely first."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return [TokenLogprob(int(i), token_text(int(i)), float(v)) for v, i in zip(values, ids)]


class _Decoder:
    """Runs one `decode` call: text assembly, stop strings and log-prob records."""

    def __init__(self, lucid_model, prompt_ids: list[int], options: DecodingOptions):
        self.lucid, self.prompt_ids, self.options = lucid_model, prompt_ids, options
        self.tokenizer, self.stop_ids = lucid_model.tokenizer, lucid_model.stop_ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def details(self, steps: list[Step]) -> list[GeneratedToken] | None:
        k = self.options.logprobs
        if k == 0:
            return None
        return [GeneratedToken(s.token_id, self.token_text(s.token_id), float(s.logprobs[s.token_id]),
                               top_logprobs(s.logprobs, k, self.token_text)) for s in steps]

    def completion(self, ids: list[int], steps: list[Step], finish_reason: str, score: float | None = None
                   ) -> Completion:
        """Text of generated ids: a final stop id dropped, cut before the first stop string.
        steps: the ids' steps, for log-probs (may be empty when none were asked for)."""
        if ids and ids[-1] in self.stop_ids:
            ids, finish_reason = ids[:-1], "stop"
        text = self.tokenizer.decode(ids)
        cuts = [i for i in (text.find(s) for s in self.options.stop if s) if i >= 0]
        if cuts:
            text, finish_reason = text[: min(cuts)], "stop"
            while ids and self.tokenizer.decode(ids[:-1]).startswith(text):
                ids = ids[:-1]  # drop the tokens the cut text does not need
        return Completion(text, ids, finish_reason, score, self.details(steps[: len(ids)]))

    def streamed(self, stats: GenerationStats, started: float) -> list[Completion]:
        steps: list[Step] = []

        def recorded():
            for step in token_steps(self.lucid.model, self.prompt_ids, self.options, self.stop_ids):
                steps.append(step)
                yield step

        text = "".join(TextStream(recorded(), IncrementalDecoder(self.tokenizer), self.stop_ids,
                                  list(self.options.stop), stats, started))
        ids = list(stats.token_ids)
        reason = stats.finish_reason
        if reason == "length" and len(steps) < self.options.max_new_tokens:
            reason = "time"
        return [Completion(text, ids, reason, None, self.details(steps[: len(ids)]))]

    def batched(self) -> list[Completion]:
        o = self.options
        generator = BatchGenerator(self.lucid.model)
        generator.add(self.prompt_ids, make_sampler(o.sampling), o.max_new_tokens, self.stop_ids, o.controls, o.n,
                      o.max_time)
        steps: list[list[Step]] = [[] for _ in range(o.n)]
        reasons = ["length"] * o.n
        while generator.active:
            for event in generator.step():
                steps[event.sample_index].append(event.step)
                reasons[event.sample_index] = event.finish_reason or reasons[event.sample_index]
        return [self.completion([s.token_id for s in row], row, r) for row, r in zip(steps, reasons)]

    def beams(self) -> list[Completion]:
        o = self.options
        params = BeamParams(o.num_beams, o.length_penalty, o.early_stopping, o.num_return_sequences)
        hypotheses = beam_search(self.lucid.model, self.prompt_ids, o.max_new_tokens, params, self.stop_ids,
                                 o.controls, o.sampling.repetition_penalty, keep_steps=o.logprobs > 0,
                                 max_time=o.max_time)
        return [self.completion(h.token_ids, h.steps, "length", h.score) for h in hypotheses]


def decode(lucid_model, prompt_ids: list[int], options: DecodingOptions, started: float | None = None) -> Generation:
    """Run `options.strategy` on a LucidModel (model + tokenizer) and return every completion."""
    started = time.perf_counter() if started is None else started
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    decoder = _Decoder(lucid_model, prompt_ids, options)
    if options.strategy == "beam":
        completions = decoder.beams()
    elif options.n > 1:
        completions = decoder.batched()
    else:
        completions = decoder.streamed(stats, started)
    if options.strategy == "beam" or options.n > 1:  # nothing was delivered before the end
        stats.time_to_first_token = stats.decode_seconds = time.perf_counter() - started
        stats.new_tokens = sum(len(c.token_ids) for c in completions)
        stats.finish_reason, stats.token_ids = completions[0].finish_reason, completions[0].token_ids
    return Generation(options.strategy, list(prompt_ids), completions, stats)
