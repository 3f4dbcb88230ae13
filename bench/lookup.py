"""Prompt-lookup decoding, LucidLM against llama.cpp and transformers doing the same, one run.

Each engine decodes greedily, once plainly and once checking up to K looked-up guesses per
forward pass (LucidLM `prompt_lookup=K`, eager and with `compile=True`, llama-cpp-python `LlamaPromptLookupDecoding
(num_pred_tokens=K)`, transformers `generate(prompt_lookup_num_tokens=K)`), on two tasks:

    quote         a request whose answer copies its prompt (fix the spelling of a paragraph; a chat
                  turn, or plain text for a base model), up to 128 new tokens, ending at the
                  model's end-of-turn token
    continuation  the decode task of bench/peers.py: 128 tokens after 128 of docs/walkthrough.md
                  (small models fall into loops there, which lookup guesses well: an easy case)

Decode tokens/s = (new tokens - 1) / time from the first token to the last; medians over
--runs rounds, engines and modes interleaved within each round. All engines in one process,
2 threads each. Run with the peers environment (`make peers-env`):

    .venv-peers/bin/python bench/lookup.py --runs 3 [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import MODELS, prompt_ids  # noqa: E402

K = 2  # guesses per pass: on a CPU a pass over 2-3 positions costs about what one over 1 does (see prompt_lookup.py)
NEW_TOKENS = 128
PARAGRAPH = ("Fix the spelling mistakes in this paragraph and return it: The printing pres was invented by Johannes "
             "Gutenberg around 1440. It alowed books to be produced quikly and cheaply, and it spread acros Europe "
             "within a few decades. Before that, books were copied by hand, which took monthes of work.")


def quote_prompt(lucid) -> list[int]:
    """The quote task's ids: a chat turn, or for a base model (Gemma 3 270M) the request as text."""
    if lucid.tokenizer.chat_template:
        return lucid.tokenizer.encode(lucid.apply_chat_template([{"role": "user", "content": PARAGRAPH}]))
    return lucid.tokenizer.encode(PARAGRAPH + "\n\nThe corrected paragraph:\n")


def lucid_engine(name, compile=False):
    import lucidlm
    from lucidlm.generate import generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    lucid = lucidlm.load(name, progress=False, compile=compile)

    def decode(ids, lookup):
        sampler = make_sampler(SamplingParams())
        steps = generate_tokens(lucid.model, ids, sampler, NEW_TOKENS, lucid.stop_ids, prompt_lookup=K if lookup else 0)
        return _timed_steps(steps)
    return lucid, decode


def llama_cpp_engine(path, threads, stop_ids):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    plain = Llama(str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    lookup = Llama(str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False,
                   draft_model=LlamaPromptLookupDecoding(num_pred_tokens=K))

    def decode(ids, use_lookup):
        llm = lookup if use_lookup else plain
        llm.reset()
        tokens = llm.generate(ids, temp=0.0, reset=True)

        def steps():
            for count, token in enumerate(tokens, 1):
                yield token
                if token in stop_ids or count == NEW_TOKENS:
                    return
        return _timed_steps(steps())
    return decode


def hf_engine(path, threads, stop_ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    def decode(ids, use_lookup):
        extra = {"prompt_lookup_num_tokens": K} if use_lookup else {}
        args = dict(attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                    eos_token_id=sorted(stop_ids), pad_token_id=sorted(stop_ids)[0], **extra)
        with torch.inference_mode():
            started = time.perf_counter()
            hf.generate(torch.tensor([ids]), max_new_tokens=1, **args)
            first = time.perf_counter() - started  # prefill and the first token
            started = time.perf_counter()
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, **args)
            total = time.perf_counter() - started
        n = out.shape[1] - len(ids)
        return (n - 1) / max(total - first, 1e-9), n
    return decode


def _timed_steps(steps):
    """(tokens/s after the first, new tokens) of an iterator of generated tokens."""
    next(steps)
    first = time.perf_counter()
    count = 1 + sum(1 for _ in steps)
    return (count - 1) / (time.perf_counter() - first), count


def measure(model_key: str, runs: int, threads: int) -> list[dict]:
    from lucidlm.loading.catalogue import resolve

    name = MODELS[model_key]
    path = resolve(name)
    torch.set_num_threads(threads)
    lucid, lucid_decode = lucid_engine(name)
    stop_ids = set(lucid.stop_ids)
    tasks = {"quote": quote_prompt(lucid), "continuation": prompt_ids(name, 128)}
    engines = {"lucid": lucid_decode, "lucid-compiled": lucid_engine(name, compile=True)[1],
               "llama.cpp": llama_cpp_engine(path, threads, stop_ids), "hf-fp32": hf_engine(path, threads, stop_ids)}
    speeds: dict[tuple, list[float]] = {}
    counts: dict[tuple, int] = {}
    for engine, decode in engines.items():  # warm-up; compiles both of lucid-compiled's graphs (not timed)
        decode(tasks["quote"], True)
    for round_ in range(runs):
        for task, ids in tasks.items():
            for engine, decode in engines.items():
                for lookup in (False, True):
                    tok_s, n = decode(ids, lookup)
                    speeds.setdefault((task, engine, lookup), []).append(tok_s)
                    counts[(task, engine, lookup)] = n
                    print(f"round {round_ + 1} {model_key} {task:12} {engine:9} lookup={lookup!s:5} "
                          f"{tok_s:6.1f} tok/s ({n} tokens)", file=sys.stderr, flush=True)
    return [{"model": model_key, "task": task, "engine": engine, "lookup": lookup,
             "tok_s": statistics.median(values), "tokens": counts[(task, engine, lookup)]}
            for (task, engine, lookup), values in speeds.items()]


def table(rows: list[dict]) -> str:
    lines = [f"| model · task | engine | decode tok/s plain | with lookup (K={K}) | speed-up | new tokens |",
             "|---|---|---|---|---|---|"]
    by_key = {(r["model"], r["task"], r["engine"], r["lookup"]): r for r in rows}
    for (model, task, engine, lookup), r in by_key.items():
        if lookup:
            continue
        with_lookup = by_key[(model, task, engine, True)]
        lines.append(f"| {model} · {task} | {engine} | {r['tok_s']:.1f} | {with_lookup['tok_s']:.1f} | "
                     f"{with_lookup['tok_s'] / r['tok_s']:.2f}x | {r['tokens']} / {with_lookup['tokens']} |")
    for model in dict.fromkeys(r["model"] for r in rows):
        for task in ("quote", "continuation"):
            ours = max(by_key[(model, task, engine, True)]["tok_s"] for engine in ("lucid", "lucid-compiled"))
            llama_best = max(by_key[(model, task, "llama.cpp", lookup)]["tok_s"] for lookup in (False, True))
            lines.append(f"\n{model} · {task}, LucidLM (faster of eager and compiled) with lookup ÷ llama.cpp with lookup: "
                         f"{ours / by_key[(model, task, 'llama.cpp', True)]['tok_s']:.2f}x, "
                         f"÷ llama.cpp's faster mode: {ours / llama_best:.2f}x; "
                         f"÷ transformers fp32 with lookup: {ours / by_key[(model, task, 'hf-fp32', True)]['tok_s']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--write", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    rows = [row for model in args.models for row in measure(model, args.runs, args.threads)]
    import llama_cpp
    import transformers

    header = (f"`{' '.join(['python', 'bench/lookup.py'] + sys.argv[1:])}` ({time.strftime('%Y-%m-%d %H:%M')}, "
              f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
              f"llama-cpp-python {llama_cpp.__version__}, transformers {transformers.__version__}; "
              f"medians of {args.runs} rounds)")
    text = header + "\n\n" + table(rows)
    print(text)
    if args.write:
        with args.write.open("a", encoding="utf-8") as f:
            f.write("\n\n## Prompt-lookup decoding (bench/lookup.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
