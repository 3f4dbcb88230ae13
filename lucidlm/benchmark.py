"""`lucid bench`: how fast one model runs here — load, prefill, time to first token, decode, memory.

Each timing is the median of `runs` repetitions (machines are noisy: ±15-20 % between
processes is common on a small CPU). Prompts are fixed random token ids, so the numbers do
not depend on a tokenizer; decode never stops early (no stop tokens). The side-by-side
comparison with other engines lives in `bench/`, not here.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .errors import InvalidArgumentError
from .generate import generate_tokens
from .models.layers import model_device
from .sampling import SamplingParams, make_sampler


@dataclass
class BenchResult:
    model: str
    threads: int
    runs: int
    load_seconds: float
    prefill_tokens_per_second: dict[int, float]  # prompt length -> tok/s
    time_to_first_token: float  # seconds, for the longest prompt that fits
    decode_tokens_per_second: float  # greedy, batch 1, KV cache
    decode_tokens: int
    peak_rss_mib: float
    compile_seconds: float | None = None  # with compile=True: the first decode step, compilation included

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{self.model}: {self.threads} threads, median of {self.runs} runs",
                 f"  load                    {self.load_seconds:8.2f} s"]
        for length, rate in self.prefill_tokens_per_second.items():
            lines.append(f"  prefill {length:>4} tokens      {rate:8.1f} tok/s")
        lines += [f"  time to first token     {self.time_to_first_token * 1000:8.1f} ms",
                  f"  decode ({self.decode_tokens} tokens)      {self.decode_tokens_per_second:8.1f} tok/s",
                  f"  peak RSS                {self.peak_rss_mib:8.1f} MiB"]
        if self.compile_seconds is not None:
            lines.insert(1, f"  compile (first step)    {self.compile_seconds:8.2f} s")
        return "\n".join(lines)


def _prompt(length: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def _synchronize() -> None:
    """GPU work is asynchronous: wait for it before reading the clock."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_benchmark(model_name: str | None = None, runs: int = 3, prompt_lengths=(128, 512),
                  decode_tokens: int = 64, dtype: str = "auto", device: str = "cpu",
                  compile: bool = False) -> BenchResult:
    from .api import load

    if runs < 1 or decode_tokens < 2:
        raise InvalidArgumentError("bench needs runs >= 1 and at least 2 decode tokens")
    started = time.perf_counter()
    m = load(model_name, progress=False, dtype=dtype, device=device, compile=compile)
    load_seconds = time.perf_counter() - started
    m._require_decoder()
    cfg = m.config
    lengths = [n for n in prompt_lengths if n + decode_tokens <= cfg.context_length]
    if not lengths:
        raise InvalidArgumentError(f"no prompt length fits the context of {cfg.context_length} tokens")

    prefill, first_token = {}, []
    with torch.inference_mode():
        for length in lengths:
            tokens = torch.tensor([_prompt(length, cfg.vocab_size)], device=model_device(m.model))
            m.model(tokens, m.model.new_cache(1, length), last_only=True)  # warm-up
            seconds = []
            for _ in range(runs):
                cache = m.model.new_cache(1, length)
                start = time.perf_counter()
                m.model(tokens, cache, last_only=True)  # prompt processed, first token's logits
                _synchronize()
                seconds.append(time.perf_counter() - start)
            prefill[length] = length / statistics.median(seconds)

    compile_seconds = None
    if compile:  # compilation happens at the first decode step: time it apart from the decode rates
        start = time.perf_counter()
        for _ in generate_tokens(m.model, _prompt(8, cfg.vocab_size), make_sampler(SamplingParams()), 3, stop_ids=()):
            pass
        compile_seconds = time.perf_counter() - start
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        steps = generate_tokens(m.model, _prompt(lengths[-1], cfg.vocab_size), make_sampler(SamplingParams()),
                                decode_tokens, stop_ids=())
        next(steps)
        first = time.perf_counter()
        count = 1 + sum(1 for _ in steps)
        rates.append((count - 1) / (time.perf_counter() - first))
        first_token.append(first - start)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return BenchResult(m.name, torch.get_num_threads(), runs, load_seconds, prefill,
                       statistics.median(first_token), statistics.median(rates), decode_tokens, peak_rss_mib,
                       compile_seconds)
