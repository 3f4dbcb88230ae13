"""Throughput of batched generation vs one prompt after another.

    .venv/bin/python bench/batch_throughput.py [--model NAME_OR_GGUF] [--prompts 8] [--max-new-tokens 32]
                                               [--runs 3] [--device cpu|cuda]

Greedy decoding of the same prompts (different lengths) two ways:
  sequential  `generate.generate_tokens`, one prompt at a time (batch 1)
  batched     `batch.generate_batch`, all prompts in one left-padded batch and one KV cache
No stop ids, so both produce exactly prompts x max_new_tokens tokens; the table shows the
median wall time of `--runs` runs, the tokens per second, and whether both ways produced
the same token ids (they should: batching must not change greedy results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import lucidlm
from lucidlm.batch import generate_batch
from lucidlm.generate import generate_tokens
from lucidlm.sampling import SamplingParams, make_sampler

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old clockmaker who",
    "List three uses of copper:",
    "Translate to French: The weather is lovely today, and we are going for a walk in the park.",
    "Q: What is 17 times 23?\nA:",
    "The printing press, invented by Johannes Gutenberg around 1440, changed Europe because",
]


def sequential(model, prompts, max_new_tokens):
    return [[s.token_id for s in generate_tokens(model, p, make_sampler(SamplingParams()), max_new_tokens)]
            for p in prompts]


def batched(model, prompts, max_new_tokens):
    return generate_batch(model, prompts, max_new_tokens)


def timed(fn, *args, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=8, help="how many prompts (cycled from a fixed list)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    lucid = lucidlm.load(args.model, progress=False)
    device = torch.device(args.device)
    lucid.model.to(device)
    prompts = [lucid.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.prompts)]
    tokens = len(prompts) * args.max_new_tokens
    # CPU timings swing with other processes' load (shared machines): print it with the numbers.
    print(f"model {lucid.name} on {device}, torch threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f}; {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens, {args.max_new_tokens} new tokens each, median of {args.runs} runs")

    timed(batched, lucid.model, prompts[:2], 2, device=device)  # warm-up (kernels, RoPE tables)
    results = {}
    for name, fn in (("sequential", sequential), ("batched", batched)):
        runs = [timed(fn, lucid.model, prompts, args.max_new_tokens, device=device) for _ in range(args.runs)]
        results[name] = (statistics.median(t for t, _ in runs), runs[0][1])

    same = results["sequential"][1] == results["batched"][1]
    base = results["sequential"][0]
    print(f"\n| {'mode':<10} | {'seconds':>8} | {'tokens/s':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, (seconds, _) in results.items():
        print(f"| {name:<10} | {seconds:8.2f} | {tokens / seconds:9.1f} | {base / seconds:7.2f}x |")
    print(f"\nsame token ids both ways: {same}")


if __name__ == "__main__":
    main()
