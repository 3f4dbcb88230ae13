"""Batched generation: many sequences decoded together, one KV cache, one forward pass per step.

`BatchGenerator` is the building block of continuous batching: sequences join between
steps, each step gives every running sequence one token, and a sequence leaves as soon as
its own stop conditions hold. Shapes: B = rows in the batch, L = cache length, V = vocab.

How rows of different lengths share one cache. All rows have the same number of cache
positions L (`cache.length`); a row with fewer real tokens is *left*-padded, and
`cache.valid` (B, L) marks padding so it is never attended to. RoPE positions come from
counting real tokens (`layers.token_positions`), so padding shifts no position, and a
row's keys are the same wherever its tokens sit in the cache.

Joining: the newcomer's prompt is prefilled alone (batch 1, no padding), then its keys and
values are copied into a new cache of length max(L, P) right-aligned, i.e. left-padded to
the batch's length; if the prompt is longer than L the batch's rows are the ones shifted
right. Copying keeps prefill free of the batch's padding and costs one copy of the cache
per join, while re-prefilling the whole batch would recompute every row. A request for n
samples is prefilled once and widened to n rows that share those keys and values.

Leaving: finished rows, and rows dropped by `remove` (a client gone, a stop string met),
go with `cache.reorder(kept_rows)`, then leading columns that are padding in every
remaining row are cut off, so a long prompt that has left does not keep the others
attending over its padding.

KVCache has no "merge" or "trim columns" yet, so `_merge_caches` and `_drop_leading_padding`
below rebuild caches through its public fields (keys, values, valid, length).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from .cache import KVCache
from .errors import InvalidArgumentError
from .generate import Step, check_fits
from .models.layers import model_device
from .penalties import LogitControls
from .sampling import Sampler, SamplingParams, make_sampler


@dataclass
class _Request:
    request_id: int
    prompt_ids: list[int]
    sampler: Sampler  # shared by the request's n rows: one random stream, n draws per step
    max_new_tokens: int
    stop_ids: set[int]
    controls: LogitControls | None
    max_time: float | None
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    request: _Request
    sample_index: int  # which of the request's n samples this row is
    generated: list[int] = field(default_factory=list)


@dataclass
class BatchEvent:
    """One new token of one sequence. finish_reason: None while running, else "stop"
    (a stop id, included as the last token), "length" (max_new_tokens) or "time" (max_time)."""

    request_id: int
    sample_index: int
    step: Step
    finish_reason: str | None


def _merge_caches(model, batch: KVCache | None, new: KVCache, capacity: int) -> KVCache:
    """One cache holding batch's rows then new's, right-aligned at length max(L_batch, L_new)."""
    parts = [c for c in (batch, new) if c is not None]
    length = max(c.length for c in parts)
    merged = model.new_cache(sum(c.batch_size for c in parts), capacity)
    row = 0
    for part in parts:
        rows, offset = slice(row, row + part.batch_size), length - part.length  # offset: left padding added
        for layer in range(len(merged.keys)):
            merged.keys[layer][rows, :, offset:length] = part.keys[layer][:, :, : part.length]  # (b, H_kv, L, D)
            merged.values[layer][rows, :, offset:length] = part.values[layer][:, :, : part.length]
        merged.valid[rows, offset:length] = part.valid[:, : part.length]
        row += part.batch_size
    merged.length = length
    return merged


def _drop_leading_padding(model, cache: KVCache, capacity: int) -> KVCache:
    """The same cache without the leading positions that are padding in every row."""
    real = cache.valid[:, : cache.length].any(dim=0)  # (L,)
    first = int(real.long().argmax()) if bool(real.any()) else cache.length
    if first == 0:
        return cache
    trimmed = model.new_cache(cache.batch_size, capacity)
    kept = cache.length - first
    for layer in range(len(cache.keys)):
        trimmed.keys[layer][:, :, :kept] = cache.keys[layer][:, :, first : cache.length]
        trimmed.values[layer][:, :, :kept] = cache.values[layer][:, :, first : cache.length]
    trimmed.valid[:, :kept] = cache.valid[:, first : cache.length]
    trimmed.length = kept
    return trimmed


class BatchGenerator:
    """Decode several sequences in one batch; `add` between steps, `step` for one token each.

        gen = BatchGenerator(model)
        a = gen.add(prompt_a, make_sampler(SamplingParams()), max_new_tokens=20, stop_ids={2})
        while gen.active:
            for event in gen.step():
                ...  # event.request_id, event.step.token_id, event.finish_reason
    """

    def __init__(self, model):
        self.model = model
        self.device = model_device(model)
        self.cache: KVCache | None = None
        self.rows: list[_Row] = []
        self.logits: torch.Tensor | None = None  # (B, V): each row's distribution for its next token
        self._ids = itertools.count()

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def _capacity(self, length: int) -> int:
        """Cache positions needed: the current length plus the most steps any row may still take."""
        steps_left = max((r.request.max_new_tokens - len(r.generated) for r in self.rows), default=0)
        return length + steps_left

    @torch.inference_mode()
    def add(self, prompt_ids: list[int], sampler: Sampler, max_new_tokens: int, stop_ids: Iterable[int] = (),
            controls: LogitControls | None = None, n: int = 1, max_time: float | None = None) -> int:
        """Prefill a prompt and join the batch with `n` rows (n samples sharing the prefill);
        returns the request id that its events carry."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"n must be an integer >= 1, got {n!r}")
        check_fits(len(prompt_ids), max_new_tokens, self.model.config.context_length)
        request = _Request(next(self._ids), list(prompt_ids), sampler, max_new_tokens, set(stop_ids), controls,
                           max_time)
        if max_new_tokens == 0:
            return request.request_id
        own_cache = self.model.new_cache(1, len(prompt_ids))
        logits = self.model(torch.tensor([prompt_ids], device=self.device), own_cache, last_only=True)[:, -1]  # (1, V)
        own_cache.reorder(torch.zeros(n, dtype=torch.long, device=self.device))  # n rows, one prefill
        self.rows += [_Row(request, i) for i in range(n)]
        length = max(own_cache.length, self.cache.length if self.cache is not None else 0)
        self.cache = _merge_caches(self.model, self.cache, own_cache, self._capacity(length))
        new_logits = logits.expand(n, -1)
        self.logits = new_logits if self.logits is None else torch.cat([self.logits, new_logits])
        return request.request_id

    def _choose(self) -> list[tuple[int, torch.Tensor]]:
        """Pick every row's next token: (token id, raw log-probs (V,)) per row, in row order."""
        chosen: list[tuple[int, torch.Tensor] | None] = [None] * len(self.rows)
        for request in {id(r.request): r.request for r in self.rows}.values():
            indices = [i for i, r in enumerate(self.rows) if r.request is request]
            # A request's rows joined together and are all still running, so they have
            # generated equally many tokens and their sequences stack into one (r, N) tensor.
            n_generated = len(self.rows[indices[0]].generated)
            sequences = torch.tensor([request.prompt_ids + self.rows[i].generated for i in indices],
                                     device=self.device)  # (r, N)
            logits = self.logits[indices]  # (r, V)
            scores = logits
            if request.controls is not None:
                scores = torch.stack([request.controls.apply(row, seq, n_generated, request.stop_ids)
                                      for row, seq in zip(logits, sequences)])
            tokens = request.sampler(scores, sequences)  # (r,)
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (r, V)
            for j, i in enumerate(indices):
                chosen[i] = (int(tokens[j]), logprobs[j])
        return chosen

    @torch.inference_mode()
    def step(self) -> list[BatchEvent]:
        """One token for every running row, in row order; finished rows leave the batch."""
        if not self.rows:
            return []
        events, kept = [], []
        now = time.perf_counter()
        for i, (row, (token_id, logprobs)) in enumerate(zip(self.rows, self._choose())):
            row.generated.append(token_id)
            request = row.request
            reason = None
            if token_id in request.stop_ids:
                reason = "stop"
            elif len(row.generated) == request.max_new_tokens:
                reason = "length"
            elif request.max_time is not None and now - request.started >= request.max_time:
                reason = "time"
            events.append(BatchEvent(request.request_id, row.sample_index, Step(token_id, logprobs), reason))
            if reason is None:
                kept.append(i)
        if len(kept) < len(self.rows):
            self._keep(kept)
        if self.rows:
            next_tokens = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)  # (B, 1)
            self.logits = self.model(next_tokens, self.cache)[:, -1]  # (B, V)
        return events

    @torch.inference_mode()
    def remove(self, request_id: int, sample_index: int | None = None) -> int:
        """Drop a request's rows (or only its sample `sample_index`) between steps, e.g. when
        its client has gone or a stop string ended it; returns how many rows were dropped."""
        def leaves(row: _Row) -> bool:
            return row.request.request_id == request_id and sample_index in (None, row.sample_index)

        kept = [i for i, r in enumerate(self.rows) if not leaves(r)]
        dropped = len(self.rows) - len(kept)
        if dropped:
            self._keep(kept)
        return dropped

    def _keep(self, kept: list[int]) -> None:
        """Keep only the rows at indices `kept` (in that order), with their logits and cache rows."""
        self.rows = [self.rows[i] for i in kept]
        if not self.rows:
            self.cache, self.logits = None, None
            return
        self.logits = self.logits[kept]
        self.cache.reorder(torch.tensor(kept, dtype=torch.long, device=self.device))
        self.cache = _drop_leading_padding(self.model, self.cache, self._capacity(self.cache.length))


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                   stop_ids: Iterable[int] = ()) -> list[list[int]]:
    """Generate for several prompts in one batch; the new token ids of each prompt, in order
    (a stop id that ended a sequence is included)."""
    generator = BatchGenerator(model)
    ids = [generator.add(p, make_sampler(params), max_new_tokens, stop_ids) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while generator.active:
        for event in generator.step():
            out[event.request_id].append(event.step.token_id)
    return [out[i] for i in ids]
