"""Decode speed deep into a context: LucidLM (eager, the default) against llama.cpp, one process.

bench/peers.py decodes after a 128-token prompt, where the weights are nearly all a step reads. A
chat grows: after 1,500 tokens a SmolLM2 step also reads ~70 MB of keys and values (float32 here,
float16 in llama.cpp), and Gemma 3's sliding-window layers see only their last 512 positions. Each
engine decodes 128 greedy tokens after prompts of the given lengths (ids of docs/walkthrough.md, as
in peers.py); tokens/s from the first token to the last; medians over --runs rounds, engines
interleaved within each round, 2 threads each. Run with the peers environment (`make peers-env`):

    .venv-peers/bin/python bench/long_context.py --runs 3 [--lengths 128 1500 3000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import MODELS, llama_cpp_decode_rate, lucid_decode_rate, prompt_ids  # noqa: E402

NEW_TOKENS = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 1500, 3000])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    import lucidlm
    from llama_cpp import Llama
    from lucidlm.loading.catalogue import resolve

    rows = []
    for key in args.models:
        name = MODELS[key]
        model = lucidlm.load(name, progress=False).model
        llm = Llama(str(resolve(name)), n_ctx=max(args.lengths) + NEW_TOKENS + 8, n_batch=512, n_threads=2,
                    n_threads_batch=2, verbose=False)
        for length in args.lengths:
            ids = prompt_ids(name, length)
            rates = {"lucid": [], "llama.cpp": []}
            for _ in range(args.runs):
                rates["lucid"].append(lucid_decode_rate(model, ids, NEW_TOKENS))
                rates["llama.cpp"].append(llama_cpp_decode_rate(llm, ids, NEW_TOKENS))
            ours, theirs = (statistics.median(rates[k]) for k in ("lucid", "llama.cpp"))
            rows.append(f"| {key} | {length} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
            print(rows[-1], flush=True)
        del llm, model
    print(f"\nCommand: `python bench/long_context.py --runs {args.runs} --lengths {' '.join(map(str, args.lengths))}`, "
          f"2 threads, medians of {args.runs} interleaved rounds, torch {torch.__version__}.\n")
    print("| model | prompt tokens | LucidLM decode tok/s | llama.cpp decode tok/s | ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
