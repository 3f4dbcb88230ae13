"""Does an idle hook point cost anything? Forward-pass time of SmolLM2 with no listeners, with a
read-only listener on every residual stream, and with attention patterns captured (which
switches those layers from the fused kernel to the explicit softmax path).

    .venv/bin/python bench/hooks_overhead.py [--runs 7] [--tokens 128]

Prints the median time of each case and its ratio to the no-hook case.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lucidlm
from lucidlm.introspect import hooks_attached


def median_forward_seconds(model, tokens, runs: int) -> float:
    times = []
    with torch.inference_mode():
        model(tokens)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    m = lucidlm.load(progress=False)
    tokens = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    n_layers = m.config.n_layers
    read_only = {f"blocks.{i}.hook_resid_post": (lambda x, name: None) for i in range(n_layers)}
    patterns = {f"blocks.{i}.attn.hook_pattern": (lambda x, name: None) for i in range(n_layers)}

    baseline = median_forward_seconds(m.model, tokens, args.runs)
    rows = [("no listeners (fused attention)", baseline)]
    with hooks_attached(m.model, read_only):
        rows.append((f"read-only listener on {n_layers} residual streams", median_forward_seconds(m.model, tokens, args.runs)))
    with hooks_attached(m.model, patterns):
        rows.append((f"attention patterns of {n_layers} layers (explicit path)", median_forward_seconds(m.model, tokens, args.runs)))
    rows.append(("no listeners again", median_forward_seconds(m.model, tokens, args.runs)))

    print(f"SmolLM2-135M forward pass, {args.tokens} tokens, median of {args.runs}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':<50} {'ms':>8} {'ratio':>7}")
    for label, seconds in rows:
        print(f"{label:<50} {seconds * 1000:8.1f} {seconds / baseline:7.2f}")


if __name__ == "__main__":
    main()
