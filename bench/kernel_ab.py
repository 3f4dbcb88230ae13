"""The int8-dot matmul kernel of the working tree against the one of an earlier commit, in one process.

    .venv/bin/python bench/kernel_ab.py --rev HEAD~1 [--rows 1 4 8 16 32] [--runs 7] [--models smollm2-135m-instruct]

Builds `lucidlm/kernels/cpu_decode.cpp` as it was at `--rev` under another operator namespace
(`lucidlm_ab`), next to the working tree's kernels, then:

1. `int8_dot_matmul` on SmolLM2's five matrix shapes (q/k/v stacked, o, gate/up stacked, down; 4-bit,
   and an 8-bit down) for x of each number of rows, alternating old and new, and prints µs per
   row and the speedup. The matrices (~3 MB) sit in the caches: this times the arithmetic.
2. Decode steps of each model (direct steps, `bench/direct_decode.py`'s loop: 128 greedy tokens,
   `--batch` sequences together) with the old and the new matmul alternating, both called through
   `torch.ops` (so a step is ~0.1 ms slower than with the direct binding); the rest of the step is
   the same code.

Both must agree to float32 rounding (checked); alternating in one process keeps the machine's
drifts out of the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

import lucidlm
from lucidlm import direct_decode
from lucidlm.kernels import cpu_decode

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(960, 576, 4), (576, 576, 4), (3072, 576, 4), (576, 1536, 4), (576, 1536, 8)]  # (N, K, bits)


def git(*command: str) -> str:
    return subprocess.run(["git", *command], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def build_old(rev: str):
    """The `int8_dot_matmul` operator of cpu_decode.cpp at `rev`, registered as lucidlm_ab's."""
    folder = Path(tempfile.mkdtemp(prefix="kernel_ab_"))
    headers = [name for name in git("ls-tree", "--name-only", f"{rev}:lucidlm/kernels").split() if name.endswith(".h")]
    for name in ["cpu_decode.cpp", *headers]:  # (the headers it includes, as they were)
        text = git("show", f"{rev}:lucidlm/kernels/{name}")
        (folder / name).write_text(text.replace("TORCH_LIBRARY(lucidlm_kernels", "TORCH_LIBRARY(lucidlm_ab")
                                   .replace("TORCH_LIBRARY_IMPL(lucidlm_kernels", "TORCH_LIBRARY_IMPL(lucidlm_ab"))
    load(name=f"lucidlm_ab_{git('rev-parse', '--short', rev).strip()}", sources=[str(folder / "cpu_decode.cpp")],
         extra_cflags=cpu_decode.FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
    return torch.ops.lucidlm_ab.int8_dot_matmul


def matrices():
    g = torch.Generator().manual_seed(0)
    for N, K, bits in SHAPES:
        weights = torch.randint(0, 256, (N, K * bits // 8), dtype=torch.uint8, generator=g)
        scales = (torch.rand(N * K // 64 * (2 if bits == 8 else 4), generator=g) * 0.01).half()
        yield weights, scales, bits, K


def time_matmuls(op, xs, mats, repeats: int = 20) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        for x, (weights, scales, bits, _) in zip(xs, mats):
            op(x, weights, scales, bits)
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the git revision whose kernel to compare with")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=["smollm2-135m-instruct"])
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together in the decode steps")
    args = parser.parse_args()
    if not cpu_decode.available():
        sys.exit("the int8-dot kernels do not run here (AVX-512 VNNI and a C++ compiler needed)")
    old, new = build_old(args.rev), torch.ops.lucidlm_kernels.int8_dot_matmul
    mats = list(matrices())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rev} (old) against the working "
          f"tree (new); medians of {args.runs} alternating runs")
    print("| rows of x | old µs/row | new µs/row | old ÷ new |")
    print("|---|---|---|---|")
    for M in args.rows:
        xs = [torch.randn(M, K) for *_, K in mats]
        for x, (weights, scales, bits, _) in zip(xs, mats):
            torch.testing.assert_close(new(x, weights, scales, bits), old(x, weights, scales, bits),
                                       rtol=1e-5, atol=1e-4)
        times = {"old": [], "new": []}
        for _ in range(args.runs):
            times["old"].append(time_matmuls(old, xs, mats))
            times["new"].append(time_matmuls(new, xs, mats))
        o, n = statistics.median(times["old"]) / M, statistics.median(times["new"]) / M
        print(f"| {M} | {o:.1f} | {n:.1f} | {o / n:.2f} |", flush=True)

    sys.path.insert(0, str(ROOT / "bench"))
    from direct_decode import PROMPT, decode

    for name in args.models:
        m = lucidlm.load(name, progress=False)
        if not isinstance(m.model.forward, direct_decode.DirectDecode):
            print(f"{name}: no direct steps here")
            continue
        bound = direct_decode.kernels
        # the direct bindings, with the matmul of each side called the same way (through torch.ops:
        # the old one has no direct binding, and the dispatcher costs ~1 µs more a call)
        functions = {name: getattr(bound, name) for name in dir(bound) if not name.startswith("_")}
        sides = {"old": types.SimpleNamespace(**{**functions, "int8_dot_matmul": old}),
                 "new": types.SimpleNamespace(**{**functions, "int8_dot_matmul": new})}
        prompt = torch.tensor([m.tokenizer.encode(PROMPT)]).repeat(args.batch, 1)
        times = {"old": [], "new": []}
        try:
            with torch.inference_mode():
                decode(m.model, prompt, 8)
                for _ in range(args.runs):
                    for label, kernels in sides.items():
                        direct_decode.kernels = kernels
                        times[label].append(decode(m.model, prompt, 128)[0] * 1e3)
        finally:
            direct_decode.kernels = bound
        o, n = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"{name} decode, {args.batch} sequences: old {o:.3f} ms/step, new {n:.3f} ms/step, "
              f"old ÷ new {o / n:.3f}")


if __name__ == "__main__":
    main()
