"""Decode-step matmul kernels, streaming a whole model's worth of weights as a decode step does.

    .venv/bin/python bench/decode_kernels.py [--runs 20]

A microbenchmark that calls one kernel on one matrix in a loop reads that matrix from cache
(SmolLM2's largest block matrix is 1 MB), and flatters every kernel: a decode step reads ~60 MB
of block weights once each, from memory. So this script builds 30 layers of SmolLM2-shaped 4-bit
matrices (q/k/v stacked 960 x 576, o 576 x 576, gate/up stacked 3072 x 576, down 576 x 1536) and
times one pass through all of them, batch-1 rows, median of --runs passes, for:

    int8-dot      our kernel (`lucidlm.kernels.cpu_decode.matmul`), x as two int8 terms
    torch int4    PyTorch's weight-only kernel (`aten._weight_int4pack_mm_for_cpu`, what
                  `models.packed.Int4Linear` calls), x in bfloat16

and the read bandwidth each reaches (weights + scales). bench/RESULTS.md has the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lucidlm.kernels import cpu_decode
from lucidlm.models.dot_linear import Int8DotLinear
from lucidlm.models.packed import Int4Linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2's (stacked) block matrices
LAYERS = 30


def one_pass_seconds(layers, inputs, runs: int) -> float:
    for _ in range(3):
        for layer in layers:
            layer(inputs[layer.in_features])
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randint(0, 16, (N, K), generator=g), torch.rand(N, K // 32, generator=g) * 0.02,
                -torch.rand(N, K // 32, generator=g) * 0.1) for _ in range(LAYERS) for N, K in SHAPES]
    kinds = {"torch int4": lambda q, s, o: Int4Linear(q, s, o)}
    if cpu_decode.available():
        kinds = {"int8-dot": Int8DotLinear.from_int4, **kinds}
    else:
        print("the int8-dot kernel does not run here (no AVX-512 VNNI or no compiler)")
    inputs = {K: torch.randn(1, K) for K in (576, 1536)}
    print(f"{LAYERS} layers of SmolLM2-shaped 4-bit matrices, batch 1, {args.threads} threads, median of {args.runs}:")
    for name, make in kinds.items():
        layers = [make(*w) for w in weights]
        nbytes = sum(b.numel() * b.element_size() for layer in layers for b in layer.buffers())
        seconds = one_pass_seconds(layers, inputs, args.runs)
        print(f"  {name:10s} {seconds * 1e3:6.2f} ms a pass  {nbytes / seconds / 1e9:5.1f} GB/s ({nbytes / 1e6:.0f} MB)")
        del layers


if __name__ == "__main__":
    main()
