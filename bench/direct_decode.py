"""Direct decode steps (lucidlm/direct_decode.py) against the eager forward, in one process.

    .venv/bin/python bench/direct_decode.py [--models smollm2-135m-instruct gemma3-270m] [--runs 5]

For each model: a prompt, then `--tokens` greedy decode steps, alternately through the model's
own forward (`DirectDecode.eager`) and through the direct steps, `--runs` times each, on fresh
caches. Alternating in one process keeps the machine's slow drifts out of the ratio. Prints the
median ms a step and tok/s of each, their ratio, and whether the two produced the same logits at
every step (they must: tests/test_direct_decode.py holds them to it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lucidlm
from lucidlm.direct_decode import DirectDecode

PROMPT = "The capital of France is a city that"


def decode(model, prompt: torch.Tensor, tokens: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds a step (the mean over `tokens` steps) and the logits of each step."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + tokens)
    token = model(prompt, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    logits = []
    started = time.perf_counter()
    for _ in range(tokens):
        step = model(token, cache, last_only=True)
        token = step[:, -1].argmax(-1, keepdim=True)
        logits.append(step)
    return (time.perf_counter() - started) / tokens, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tokens} steps after a "
          f"{len(PROMPT.split())}-word prompt; medians of {args.runs} alternating runs")
    print("| model | eager forward ms/step (tok/s) | direct ms/step (tok/s) | direct ÷ eager | same logits |")
    print("|---|---|---|---|---|")
    for name in args.models:
        m = lucidlm.load(name, progress=False)
        direct = m.model.forward
        if not isinstance(direct, DirectDecode):
            print(f"| {name} | (no direct steps here: not packed, or no AVX-512 VNNI kernels) | | | |")
            continue
        prompt = torch.tensor([m.tokenizer.encode(PROMPT)])
        times = {"eager": [], "direct": []}
        same = True
        with torch.inference_mode():
            decode(m.model, prompt, 8)  # warm-up
            for _ in range(args.runs):
                m.model.forward = direct.eager
                seconds, reference = decode(m.model, prompt, args.tokens)
                times["eager"].append(seconds)
                m.model.forward = direct
                seconds, ours = decode(m.model, prompt, args.tokens)
                times["direct"].append(seconds)
                same = same and all(torch.equal(a, b) for a, b in zip(ours, reference))
        eager, fast = statistics.median(times["eager"]), statistics.median(times["direct"])
        print(f"| {name} | {eager * 1e3:.2f} ({1 / eager:.1f}) | {fast * 1e3:.2f} ({1 / fast:.1f}) "
              f"| {eager / fast:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
