"""Where a packed model's prompt should leave the int8-dot kernel for the dense path, by prompt length.

    .venv/bin/python bench/prefill_rows.py [--models smollm2-135m-instruct gemma3-270m]
                                           [--lengths 8 16 24 32 48 64 96] [--runs 5]

`Int8DotLinear` multiplies fewer than `dot_linear.DENSE_FROM_ROWS` rows with the kernel (its time
grows with the rows) and more by decoding its weight and running a dense matmul (a fixed cost
to decode, then cheap rows). For each prompt length T this times a prefill (a fresh cache, logits
of the last position only) with every layer on the kernel and with layers of T rows or more on
the dense path (the LM head's single row stays on the kernel, as in generation), alternating
in one process, and prints the medians in ms. Where the dense column wins is where
DENSE_FROM_ROWS belongs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lucidlm
from lucidlm.models import dot_linear


def prefill_ms(model, tokens: torch.Tensor) -> float:
    started = time.perf_counter()
    model(tokens, model.new_cache(1, tokens.shape[1]), last_only=True)
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[8, 16, 24, 32, 48, 64, 96])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, DENSE_FROM_ROWS = "
          f"{dot_linear.DENSE_FROM_ROWS}; medians of {args.runs} alternating runs")
    print("| model | prompt tokens | kernel ms | dense ms | kernel ÷ dense |")
    print("|---|---|---|---|---|")
    default = dot_linear.DENSE_FROM_ROWS
    for name in args.models:
        model = lucidlm.load(name, progress=False).model
        vocab = model.config.vocab_size
        try:
            with torch.inference_mode():
                for T in args.lengths:
                    tokens = torch.randint(100, vocab - 1, (1, T), generator=torch.Generator().manual_seed(T))
                    times = {"kernel": [], "dense": []}
                    for _ in range(args.runs + 1):  # (the first of each: a warm-up)
                        for path, rows in (("kernel", 1 << 30), ("dense", T)):
                            dot_linear.DENSE_FROM_ROWS = rows
                            times[path].append(prefill_ms(model, tokens))
                    kernel, dense = (statistics.median(times[p][1:]) for p in ("kernel", "dense"))
                    print(f"| {name} | {T} | {kernel:.1f} | {dense:.1f} | {kernel / dense:.2f} |", flush=True)
        finally:
            dot_linear.DENSE_FROM_ROWS = default


if __name__ == "__main__":
    main()
