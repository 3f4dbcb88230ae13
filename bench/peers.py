"""LucidLM side by side with HF transformers and llama.cpp, on the same GGUF files, prompts and machine.

    make bench-peers          # builds .venv-peers (llama-cpp-python from source, transformers), then:
    .venv-peers/bin/python bench/peers.py --runs 3 --write bench/RESULTS.md

Every measurement runs in a fresh process (`peers.py worker ...`), so load time and peak RSS
belong to one engine alone; the engines take turns within each round (interleaved), so slow
drifts of a noisy machine hit them all alike. Reported: medians over rounds.

What each engine does, all with the same token ids (the GGUF's own vocabulary, made once by the
parent process and handed to the workers in a file, so that no worker's peak RSS holds a tokenizer
it built only for the harness) and threads:
    prefill   one forward pass over a 128- and a 512-token prompt into an empty KV cache, logits
              for the last position only (what generation needs); after one untimed pass of the
              same length, the median of 3
    decode    128 greedy tokens after a 128-token prompt, KV cache, no stop token; tokens/s from
              the first token to the last (time to first token excluded)
    load      from the GGUF file to a ready model, imports excluded
    peak RSS  the process's maximum resident set (includes the Python runtime and torch)

transformers loads the GGUF by dequantizing it (`gguf_file=`), in float32 or bfloat16; its decode
is a loop of forward passes with `past_key_values` (what `generate` does, minus its bookkeeping).
llama.cpp runs the quantized file as is through llama-cpp-python. `lucid-compiled` is LucidLM
with `compile=True` (torch.compile'd decode steps); its one-off compilation is timed apart
(`compile_s`, printed below the table), not in load or decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
ENGINES = ("lucid", "lucid-compiled", "llama.cpp", "hf-fp32", "hf-bf16")
PROMPT_LENGTHS = (128, 512)
DECODE_TOKENS = 128
PREFILL_REPEATS = 3  # timed prefills of each length per process (after one untimed), median
CORPUS = Path(__file__).resolve().parent.parent / "docs" / "walkthrough.md"


def prompt_ids(model_name: str, n: int) -> list[int]:
    """The first n token ids of a fixed English text (repeated if short), in the model's vocabulary."""
    from lucidlm.tokenizers.registry import tokenizer_from_gguf_metadata
    from lucidlm.loading.catalogue import resolve
    from lucidlm.loading.gguf import GGUFFile

    path = resolve(model_name)
    tokenizer = tokenizer_from_gguf_metadata(GGUFFile(path).metadata, str(path))
    ids = tokenizer.encode(CORPUS.read_text(encoding="utf-8"))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


# ----- one engine, one process -----

def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def lucid_decode_rate(model, ids: list[int], n: int) -> float:
    """LucidLM's greedy decode tokens/s: n tokens after `ids`, from the first token to the last."""
    from lucidlm.generate import generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    steps = generate_tokens(model, ids, make_sampler(SamplingParams()), n)
    next(steps)  # the prompt's pass and the first token
    first = time.perf_counter()
    count = 1 + sum(1 for _ in steps)
    return (count - 1) / (time.perf_counter() - first)


def llama_cpp_decode_rate(llm, ids: list[int], n: int) -> float:
    """llama.cpp's (llama-cpp-python's) greedy decode tokens/s, measured as `lucid_decode_rate`."""
    llm.reset()
    tokens = llm.generate(ids, temp=0.0, reset=True)
    next(tokens)
    first = time.perf_counter()
    count = 1
    for _ in tokens:
        count += 1
        if count == n:
            break
    return (count - 1) / (time.perf_counter() - first)


def worker(engine: str, model_name: str, threads: int, prompts_file: Path) -> dict:
    import torch

    torch.set_num_threads(threads)
    from lucidlm.loading.catalogue import resolve

    path = resolve(model_name)
    prompts = {int(n): ids for n, ids in json.loads(prompts_file.read_text()).items()}
    result = {"engine": engine, "model": model_name}

    if engine.startswith("lucid"):
        import lucidlm
        from lucidlm.generate import generate_tokens
        from lucidlm.sampling import SamplingParams, make_sampler

        compile = engine == "lucid-compiled"
        result["load_s"] = _timed(lambda: globals().__setitem__(
            "_m", lucidlm.load(model_name, progress=False, compile=compile)))
        model = globals()["_m"].model
        if compile:  # compilation happens at the first decode step: done (and timed) before the rest
            result["compile_s"] = _timed(lambda: list(generate_tokens(
                model, prompts[128][:8], make_sampler(SamplingParams()), 3)))

        def prefill(ids):
            with torch.inference_mode():
                model(torch.tensor([ids]), model.new_cache(1, len(ids)), last_only=True)

        def decode(ids, n):
            return lucid_decode_rate(model, ids, n)

    elif engine == "llama.cpp":
        from llama_cpp import Llama

        holder = {}
        result["load_s"] = _timed(lambda: holder.setdefault("llm", Llama(
            str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)))
        llm = holder["llm"]

        def prefill(ids):
            llm.reset()
            llm.eval(ids)

        def decode(ids, n):
            return llama_cpp_decode_rate(llm, ids, n)

    else:  # hf-fp32 / hf-bf16
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if engine == "hf-fp32" else torch.bfloat16
        holder = {}
        result["load_s"] = _timed(lambda: holder.setdefault("model", AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype).eval()))
        hf = holder["model"]

        def prefill(ids):
            with torch.inference_mode():
                hf(torch.tensor([ids]), use_cache=True, logits_to_keep=1)

        def decode(ids, n):
            with torch.inference_mode():
                out = hf(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
                next_id = out.logits[:, -1].argmax(-1, keepdim=True)
                first = time.perf_counter()
                for _ in range(n - 1):
                    out = hf(next_id, past_key_values=out.past_key_values, use_cache=True)
                    next_id = out.logits[:, -1].argmax(-1, keepdim=True)
                return (n - 1) / (time.perf_counter() - first)

    for n, ids in prompts.items():
        # Warm-up at full length: a process's first pass of this size takes its activations' memory
        # fresh from the system (page faults; LucidLM and transformers allocate per pass, llama.cpp
        # at load), which cost one engine or another up to a third of a 512-token prefill depending
        # on what the process did before (session 16). Then the median of 3 passes.
        prefill(ids)
        result[f"prefill_{n}"] = n / statistics.median(_timed(lambda: prefill(ids)) for _ in range(PREFILL_REPEATS))
    result["decode"] = decode(prompts[128], DECODE_TOKENS)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ----- the interleaved rounds and the table -----

def run_worker(engine: str, model: str, threads: int, prompts_file: Path) -> dict | None:
    cmd = [sys.executable, __file__, "worker", "--engine", engine, "--model", model, "--threads", str(threads),
           "--prompts", str(prompts_file)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"  {engine} on {model} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


METRICS = ("prefill_128", "prefill_512", "decode", "load_s", "peak_rss_mib")


def medians(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results) for k in METRICS + ("compile_s",) if k in results[0]}


def versions() -> str:
    import torch

    parts = [f"torch {torch.__version__}"]
    for module, label in (("transformers", "transformers"), ("llama_cpp", "llama-cpp-python")):
        try:
            parts.append(f"{label} {__import__(module).__version__}")
        except ImportError:
            parts.append(f"{label} (not installed)")
    return ", ".join(parts)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    # The instruction set PyTorch dispatches to decides its kernels' speed (its AVX-512 int4/int8 kernels
    # run several times faster than its AVX2 ones; bfloat16 matmuls are fast only with AVX-512 BF16).
    import torch

    from lucidlm.models.packed import has_avx512_bf16

    bf16 = ", AVX-512 BF16" if has_avx512_bf16() else ""
    return (f"{model}, {os.cpu_count()} cores, PyTorch kernels {torch.backends.cpu.get_cpu_capability()}{bf16}, "
            f"{platform.system()} {platform.release()}")


def table(summary: dict[tuple[str, str], dict]) -> str:
    rows = ["| model · engine | prefill 128 tok/s | prefill 512 tok/s | decode tok/s | load s | peak RSS MiB |",
            "|---|---|---|---|---|---|"]
    for (model, engine), m in summary.items():
        rows.append(f"| {model} · {engine} | {m['prefill_128']:.0f} | {m['prefill_512']:.0f} | {m['decode']:.1f} "
                    f"| {m['load_s']:.2f} | {m['peak_rss_mib']:.0f} |")
    rows += ["", "Ratios (LucidLM ÷ peer; > 1 means LucidLM is faster, or for RSS, < 1 means smaller):", "",
             "| model · LucidLM vs | prefill 128 | prefill 512 | decode | load time (peer ÷ ours) | peak RSS (ours ÷ peer) |",
             "|---|---|---|---|---|---|"]
    for (model, engine), m in summary.items():
        ours = summary.get((model, "lucid"))
        if engine.startswith("lucid") or ours is None:
            continue
        rows.append(f"| {model} · {engine} | {ours['prefill_128'] / m['prefill_128']:.2f}x "
                    f"| {ours['prefill_512'] / m['prefill_512']:.2f}x | {ours['decode'] / m['decode']:.2f}x "
                    f"| {m['load_s'] / ours['load_s']:.2f}x | {ours['peak_rss_mib'] / m['peak_rss_mib']:.2f} |")
    compiled = [(model, summary.get((model, "lucid")), m) for (model, engine), m in summary.items()
                if engine == "lucid-compiled"]
    notes = []
    for model, eager, m in compiled:
        for (peer_model, engine), peer in summary.items():
            if peer_model == model and not engine.startswith("lucid"):
                rows.append(f"| {model} · {engine} (LucidLM compiled) | {m['prefill_128'] / peer['prefill_128']:.2f}x "
                            f"| {m['prefill_512'] / peer['prefill_512']:.2f}x | {m['decode'] / peer['decode']:.2f}x "
                            f"| {peer['load_s'] / m['load_s']:.2f}x | {m['peak_rss_mib'] / peer['peak_rss_mib']:.2f} |")
        note = f"compiled decode ÷ eager: {m['decode'] / eager['decode']:.2f}x; " if eager else ""
        notes.append(f"{model}: {note}compilation (first decode step) {m['compile_s']:.1f} s median.")
    return "\n".join(rows + ([""] + notes if notes else []))


def write_section(path: Path, title: str, body: str) -> None:
    """Replace the section `## title` of a markdown file (or append it), up to its first
    subsection (`### ...`): notes written under the table stay."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    header = f"## {title}"
    start = text.find(header)
    if start < 0:
        text = text.rstrip() + f"\n\n{header}\n\n{body}\n"
    else:
        ends = [i for i in (text.find("\n## ", start + len(header)), text.find("\n### ", start + len(header))) if i >= 0]
        end = min(ends) if ends else -1
        text = text[:start] + f"{header}\n\n{body.rstrip()}\n" + (f"\n{text[end + 1:]}" if end >= 0 else "")
    path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("--engine", choices=ENGINES, required=True)
    w.add_argument("--model", required=True)
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--prompts", type=Path, required=True, help="JSON: prompt length -> token ids")
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--write", type=Path, default=None, help="markdown file to put the table in")
    args = parser.parse_args()
    if args.command == "worker":
        print(json.dumps(worker(args.engine, args.model, args.threads, args.prompts)))
        return

    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        prompt_files = {}
        for model in args.models:
            prompt_files[model] = Path(scratch) / f"{model}.json"
            prompt_files[model].write_text(json.dumps({n: prompt_ids(MODELS[model], n) for n in PROMPT_LENGTHS}))
        for round_index in range(args.runs):
            for model in args.models:
                for engine in args.engines:
                    print(f"round {round_index + 1}/{args.runs}: {engine} on {model}", file=sys.stderr, flush=True)
                    r = run_worker(engine, MODELS[model], args.threads, prompt_files[model])
                    if r is not None:
                        results.setdefault((model, engine), []).append(r)
    summary = {key: medians(rs) for key, rs in results.items()}
    command = "python bench/peers.py " + " ".join(sys.argv[1:])
    body = (f"Command: `{command}` (from `make bench-peers`), {args.threads} threads, medians of {args.runs} "
            f"interleaved rounds, each engine in its own process.  \nVersions: {versions()}.  \n"
            f"Machine: {machine()}; run {time.strftime('%Y-%m-%d %H:%M')}.\n\n{table(summary)}")
    print(body)
    if args.write:
        write_section(args.write, "Side by side with the peers (bench/peers.py)", body)


if __name__ == "__main__":
    main()
