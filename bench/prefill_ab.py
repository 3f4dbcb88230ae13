"""Prefill of LucidLM and transformers (bfloat16) on the same prompt, alternating in one process.

    make bench-peers    # (the environment with transformers), then
    .venv-peers/bin/python bench/prefill_ab.py [--models smollm2 gemma3] [--lengths 128 512] [--runs 15]

`bench/peers.py` runs each engine in a process of its own, one after another; this machine's speed
changes by a third within seconds to minutes (the same prefill at 1,650 and 2,200 tok/s in
consecutive calls, session 16), so a ratio of two such processes carries that noise. Here both
models live in one process and their passes alternate, call by call: each pass of one engine has
a pass of the other right beside it, under the same conditions. Reported: the median tok/s of
each over `--runs` passes and the ratio of the medians; also the median of the per-pair ratios.
Same token ids (the GGUF's vocabulary), one forward pass into an empty cache, logits for the last
position only (as in peers.py); one untimed pass of each length first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peers import MODELS, prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lucidlm
    from lucidlm.loading.catalogue import resolve
    from transformers import AutoModelForCausalLM

    rows = []
    for key in args.models:
        name = MODELS[key]
        ours = lucidlm.load(name, progress=False).model
        path = resolve(name)
        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16).eval()
        for n in args.lengths:
            ids = torch.tensor([prompt_ids(name, n)])
            passes = {
                "lucid": lambda: ours(ids, ours.new_cache(1, n), last_only=True),
                "hf-bf16": lambda: theirs(ids, use_cache=True, logits_to_keep=1),
            }
            seconds = {engine: [] for engine in passes}
            with torch.inference_mode():
                for run in passes.values():
                    run()  # warm-up at full length
                for _ in range(args.runs):
                    for engine, run in passes.items():
                        started = time.perf_counter()
                        run()
                        seconds[engine].append(time.perf_counter() - started)
            ours_rate = n / statistics.median(seconds["lucid"])
            theirs_rate = n / statistics.median(seconds["hf-bf16"])
            pair = statistics.median(t / o for o, t in zip(seconds["lucid"], seconds["hf-bf16"]))
            rows.append(f"| {key} | {n} | {ours_rate:.0f} | {theirs_rate:.0f} | {ours_rate / theirs_rate:.2f}x "
                        f"| {pair:.2f}x |")
            print(rows[-1], flush=True)
        del ours, theirs
    print(f"\nCommand: `python bench/prefill_ab.py --runs {args.runs} --lengths {' '.join(map(str, args.lengths))}`, "
          f"{args.threads} threads, both engines alternating in one process, torch {torch.__version__}.\n")
    print("| model | prompt tokens | LucidLM prefill tok/s | transformers bf16 tok/s | ratio of medians "
          "| median of pair ratios |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
