"""The autoregressive loop: prefill the prompt once, then one token per step.

`generate_tokens` is the single generator every front end consumes (Python API, CLI,
tracing, benchmarks): it yields one `Step` per new token, as soon as it is chosen. It
knows nothing about text; `TextStream` turns the steps into text pieces, handles stop
strings and measures time to first token and decode speed.

    prompt ids --prefill--> logits of the last position --sample--> token 1
    token 1    --decode---> logits                      --sample--> token 2   ...

With `use_cache=False` every step re-runs the model over the whole sequence so far: the
same result, quadratic cost (the seeds' with/without-cache experiment).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from .compile import seconds_compiling
from .errors import ContextOverflowError, InvalidArgumentError
from .models.layers import model_device
from .penalties import LogitControls
from .prompt_lookup import NgramIndex
from .sampling import Sampler


class Step:
    """One new token and the distribution it was chosen from.

    token_id  the token
    logprobs  (V,) log-softmax of the model's raw logits at this step. Give it, or give `logits`
              and it is computed when first read: a log-softmax over the whole vocabulary costs
              ~0.1 ms for Gemma 3's 262,144 tokens, ~1.5 % of a compiled decode step, and plain
              text generation never reads it.
    drafted   a guess confirmed by a prompt-lookup pass (`lucidlm.prompt_lookup`): no pass of its own
    """

    __slots__ = ("token_id", "drafted", "_logits", "_logprobs")

    def __init__(self, token_id: int, logprobs: torch.Tensor | None = None, drafted: bool = False, *,
                 logits: torch.Tensor | None = None):
        if (logprobs is None) == (logits is None):
            raise ValueError("Step needs logprobs or logits (one of them)")
        self.token_id, self.drafted = token_id, drafted
        self._logits, self._logprobs = logits, logprobs

    @property
    def logprobs(self) -> torch.Tensor:
        if self._logprobs is None:
            self._logprobs = torch.log_softmax(self._logits.float(), dim=-1)
            self._logits = None
        return self._logprobs

    def __repr__(self) -> str:
        return f"Step(token_id={self.token_id}, drafted={self.drafted})"


def check_fits(prompt_len: int, max_new_tokens: int, context_length: int) -> None:
    if prompt_len == 0:
        raise InvalidArgumentError("the prompt is empty")
    if max_new_tokens < 0:
        raise InvalidArgumentError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len + max_new_tokens > context_length:
        raise ContextOverflowError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context length of {context_length} tokens"
        )


@torch.inference_mode()
def generate_tokens(model, prompt_ids: list[int], sampler: Sampler, max_new_tokens: int,
                    stop_ids: Iterable[int] = (), use_cache: bool = True, controls: LogitControls | None = None,
                    max_time: float | None = None, prompt_lookup: int = 0) -> Iterator[Step]:
    """Yield up to `max_new_tokens` steps; stops after yielding a token in `stop_ids`.

    `controls` (penalties, logit bias, n-gram ban, min_new_tokens) adjust the logits before
    the sampler sees them; `max_time` (seconds, prefill included) stops generation once the
    time is spent, after at least one token. Step.logprobs stay the model's raw distribution.
    `prompt_lookup` = K > 0: each pass after the prefill also feeds up to K guessed next tokens
    and the rows of those positions are drawn from in turn while the draws confirm the guesses
    (`lucidlm.prompt_lookup`; same output distribution; a confirmed guess's Step has drafted=True).
    """
    check_fits(len(prompt_ids), max_new_tokens, model.config.context_length)
    if prompt_lookup and not use_cache:
        raise InvalidArgumentError("prompt_lookup needs the KV cache")
    started = time.perf_counter()
    stop_ids = set(stop_ids)
    device = model_device(model)
    sequence = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens) if use_cache else None
    if max_new_tokens == 0:
        return
    guesses = NgramIndex(prompt_ids) if prompt_lookup else None
    logits = model(sequence, cache, last_only=True)  # prefill: (1, 1, V)
    draft: list[int] = []  # the guesses fed after the chosen token in the pass that made `logits`
    produced = 0
    while True:
        # Row j of logits: the next-token distribution after the last token fed and draft[:j].
        for j in range(logits.shape[1]):
            row = logits[:, j]  # (1, V)
            scores = row if controls is None else controls.apply(row, sequence[0], produced, stop_ids)
            next_id = sampler(scores, sequence)  # (1,)
            token_id = int(next_id[0])
            guessed = j < len(draft) and token_id == draft[j]
            produced += 1
            yield Step(token_id, drafted=guessed, logits=row[0])  # (log-probs computed if read)
            if token_id in stop_ids or produced == max_new_tokens:
                return
            if max_time is not None and time.perf_counter() - started >= max_time:
                return
            sequence = torch.cat([sequence, next_id.view(1, 1)], dim=1)
            if guesses is not None:
                guesses.extend([token_id])
            if not guessed:  # later rows were computed after a wrong guess (or there are none)
                break
        if cache is None:
            logits = model(sequence, last_only=True)  # recompute everything
            continue
        if draft:  # keep the cache entries of the confirmed guesses, draft[:j], drop the rest
            cache.truncate(cache.length - len(draft) + j)
        if guesses is not None:  # no use guessing past the last token to produce: it needs no pass
            draft = guesses.draft(min(prompt_lookup, max_new_tokens - produced - 1))
        pass_ids = next_id.view(1, 1)  # (1, 1): decode one position ...
        if draft:  # ... or (1, 1 + k) with the guesses
            pass_ids = torch.cat([pass_ids, torch.tensor([draft], dtype=torch.long, device=device)], dim=1)
        logits = model(pass_ids, cache)  # (1, 1 + k, V)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds from start (tokenization included) to the first token
    decode_seconds: float = 0.0  # from the first token to the last
    compile_seconds: float = 0.0  # of decode_seconds, spent compiling the decode step (`--compile`'s first step)
    drafted_tokens: int = 0  # of new_tokens, guesses confirmed by prompt lookup (`lucidlm.prompt_lookup`)
    finish_reason: str = "length"  # "stop" (EOS or stop string) or "length"
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, per second of decode (the first one is paid by prefill),
        one-off compilation excluded."""
        seconds = self.decode_seconds - self.compile_seconds
        return (self.new_tokens - 1) / seconds if self.new_tokens > 1 and seconds > 0 else 0.0

    def summary(self) -> str:
        compiling = f" (after {self.compile_seconds:.1f} s compiling)" if self.compile_seconds else ""
        drafted = f", {self.drafted_tokens} of them from prompt lookup" if self.drafted_tokens else ""
        return (f"{self.prompt_tokens} prompt tokens, time to first token {self.time_to_first_token * 1000:.0f} ms, "
                f"{self.new_tokens} new tokens at {self.decode_tokens_per_second:.1f} tok/s{compiling}{drafted}")


def longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string:
    that much text must be held back, since the next token may complete the stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextStream:
    """Consume `generate_tokens`, yielding text pieces; fills `stats` as it goes.

    Stop ids end generation without their text; stop strings end it with the text cut
    just before the stop string. Text that might be the start of a stop string is held
    back until it is clear that it is not.
    """

    def __init__(self, steps: Iterator[Step], decoder, stop_ids: Iterable[int], stop_strings: list[str],
                 stats: GenerationStats, started: float):
        self.steps, self.decoder, self.stop_ids = steps, decoder, set(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.stats, self.started = stats, started
        self.compiled_before = seconds_compiling()

    def __iter__(self) -> Iterator[str]:
        pending = ""
        first_token_at = None
        for step in self.steps:
            now = time.perf_counter()
            if first_token_at is None:
                first_token_at = now
                self.stats.time_to_first_token = now - self.started
            self.stats.decode_seconds = now - first_token_at
            self.stats.compile_seconds = seconds_compiling() - self.compiled_before
            self.stats.new_tokens += 1
            self.stats.drafted_tokens += step.drafted
            if step.token_id in self.stop_ids:
                self.stats.finish_reason = "stop"
                break
            self.stats.token_ids.append(step.token_id)
            pending += self.decoder.push(step.token_id)
            cut = min((i for i in (pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
            if cut >= 0:
                self.stats.finish_reason = "stop"
                if pending[:cut]:
                    yield pending[:cut]
                self.steps.close()
                return
            hold = longest_stop_prefix(pending, self.stop_strings)
            if len(pending) > hold:
                yield pending[: len(pending) - hold]
                pending = pending[len(pending) - hold:]
        pending += self.decoder.flush()
        if pending:
            yield pending
