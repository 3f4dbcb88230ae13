"""Which matrix-multiply kernel is fastest for a linear layer of SmolLM2, by number of rows M?

M = 1 is a decode step, M = 512 a prefill. Compares float32 and bfloat16 dense F.linear with
the weight-only quantized kernels used by lucidlm.models.packed (int4 groups of 32, int8 per
row), and the packed layers' own dense path (unpack the weight into float32, then a float32
matmul: `dense_matmul`, which pays the unpacking on every call). Prints a table of medians in
microseconds; the crossover between `int4` and `int4 dense` sets packed.DENSE_FROM_ROWS.

    .venv/bin/python bench/kernels.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lucidlm.models.packed import Int4Linear, Int8Linear


def time_us(fn, repeats: int, inner: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(samples)


@torch.inference_mode()  # as in generation (the dense path reuses its buffer there)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = {"q_proj 576x576": (576, 576), "gate 1536x576": (1536, 576), "down 576x1536": (576, 1536),
              "lm_head 49152x576": (49152, 576)}
    print(f"torch {torch.__version__}, {args.threads} threads; median µs per call")
    print(f"{'layer':<20}{'M':>5}{'fp32':>10}{'bf16':>10}{'int4':>10}{'int4 dense':>12}{'int8':>10}{'int8 dense':>12}")
    for label, (N, K) in shapes.items():
        w = torch.randn(N, K) * 0.02
        wb = w.bfloat16()
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
        scale, offset = torch.rand(N, K // 32) * 0.01, torch.randn(N, K // 32) * 0.01
        int4 = Int4Linear(q, scale, offset)
        int8 = Int8Linear.quantize(w)
        for M in (1, 4, 16, 32, 64, 128, 512):
            if N > 10000 and M > 64:
                continue
            x = torch.randn(M, K)
            xb = x.bfloat16()
            inner = max(1, 2000 // (M * max(1, N // 576)))
            row = [time_us(lambda: F.linear(x, w), args.repeats, inner),
                   time_us(lambda: F.linear(xb, wb), args.repeats, inner),
                   time_us(lambda: int4.kernel_matmul(x), args.repeats, inner),
                   time_us(lambda: int4.dense_matmul(x), args.repeats, inner),
                   time_us(lambda: int8.kernel_matmul(x), args.repeats, inner),
                   time_us(lambda: int8.dense_matmul(x), args.repeats, inner)]
            widths = (10, 10, 10, 12, 10, 12)
            print(f"{label:<20}{M:>5}" + "".join(f"{t:>{w}.0f}" for t, w in zip(row, widths)))


if __name__ == "__main__":
    main()
