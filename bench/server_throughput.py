"""Aggregate throughput of `lucid serve` with 1, 4 and 16 concurrent streaming clients, and of
llama.cpp's server (llama-cpp-python) on the same GGUF when its Python is given.

    .venv/bin/python bench/server_throughput.py [--model NAME_OR_GGUF] [--clients 1,4,16] [--max-tokens 64]
                                                [--runs 3] [--peer-python .venv-peers/bin/python]
                                                [--write bench/RESULTS.md]

Each server is started as a subprocess on a free loopback port (`lucid serve`; `python -m
llama_cpp.server --model <gguf>`), warmed up with one request, then for each number of clients
C, `--runs` rounds of C clients that start together, each streaming one greedy completion of
`--max-tokens` tokens of a different prompt from `/v1/completions`. Per round:

    aggregate tokens/s = tokens received by all clients / seconds from the first request to the last token
    time to first token = seconds from a client's request to its first text

Tokens are counted by tokenizing each client's text with the model's tokenizer (the same
vocabulary for both servers). The table shows medians over the rounds. llama-cpp-python's
server answers one request at a time (no batching); `--interrupt_requests False` keeps it from
cutting a stream short when the next request arrives. Both get all the machine's cores.
CPU timings move with other processes' load: the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old clockmaker who",
    "The history of the printing press begins in the fifteenth century, when",
    "Here is a short guide to growing tomatoes at home. First,",
    "The three most important inventions of the twentieth century were",
    "Dear Sarah, I am writing to apologise for the gardening mishap. It all started when",
    "In a distant galaxy, the crew of the starship Meridian discovered",
    "The recipe for a perfect loaf of bread is simple:",
    "Photosynthesis is the process by which plants",
]
SECTION = "## HTTP server throughput (issue #7)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], port: int, log: Path, startup_timeout: float = 300):
    """Start a server subprocess, wait until /v1/models answers, stop it (Ctrl-C) afterwards."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}; see {log}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"server did not start in {startup_timeout} s; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, float, str]:
    """One streamed completion -> (request sent at, first text at, text)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent, first, parts = time.perf_counter(), None, []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0].get("text") or ""
            if text and first is None:
                first = time.perf_counter()
            parts.append(text)
    return sent, first if first is not None else time.perf_counter(), "".join(parts)


async def one_round(url: str, clients: int, max_tokens: int, count_tokens) -> tuple[float, float]:
    """C clients at once -> (aggregate tokens/s, median time to first token)."""
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, url, PROMPTS[i % len(PROMPTS)], max_tokens)
                                         for i in range(clients)))
        seconds = time.perf_counter() - started
    tokens = sum(count_tokens(text) for _, _, text in results)
    return tokens / seconds, statistics.median(first - sent for sent, first, _ in results)


def measure(name: str, url: str, args, count_tokens) -> list[dict]:
    asyncio.run(one_round(url, 1, 8, count_tokens))  # warm-up: first-call costs, caches
    rows = []
    for clients in args.clients:
        rounds = [asyncio.run(one_round(url, clients, args.max_tokens, count_tokens)) for _ in range(args.runs)]
        rate = statistics.median(r for r, _ in rounds)
        rows.append({"server": name, "clients": clients, "tokens_per_s": rate, "per_client": rate / clients,
                     "ttft": statistics.median(t for _, t in rounds), "load": os.getloadavg()[0]})
        print(f"  {name:<12} {clients:>2} clients: {rate:6.1f} tok/s aggregate, TTFT {rows[-1]['ttft']:.2f} s "
              f"(load average {rows[-1]['load']:.1f})", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| server | clients | aggregate tok/s | tok/s per client | median TTFT s | load avg |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['per_client']:.1f} | "
              f"{r['ttft']:.2f} | {r['load']:.1f} |" for r in rows]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or add it at the end); other sections stay."""
    content = path.read_text()
    start = content.find(SECTION)
    if start < 0:
        content = content.rstrip("\n") + "\n\n" + text
    else:
        end = content.find("\n## ", start + len(SECTION))
        content = content[:start] + (text.rstrip("\n") + "\n\n" + content[end + 1:] if end >= 0 else text)
    path.write_text(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or GGUF path")
    parser.add_argument("--clients", default="1,4,16", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peer-python", default=None, help="a Python with llama-cpp-python[server] installed")
    parser.add_argument("--write", type=Path, default=None, help="write the results section into this file")
    args = parser.parse_args()

    from lucidlm.loading.catalogue import resolve
    from lucidlm.tokenizers import load_tokenizer

    gguf = resolve(args.model)
    tokenizer = load_tokenizer(str(gguf))

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special=False))

    threads = os.cpu_count() or 1
    print(f"{gguf.name}: {args.max_tokens} tokens per client, clients {args.clients}, median of {args.runs} rounds, "
          f"{threads} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="lucid-bench-"))
    servers = [("LucidLM", [sys.executable, "-m", "lucidlm.cli", "serve", "--model", str(gguf), "--model-id", "bench",
                            "--embedding-model", "none", "--max-batch", str(max(args.clients))])]
    if args.peer_python:
        servers.append(("llama.cpp", [args.peer_python, "-m", "llama_cpp.server", "--model", str(gguf),
                                      "--host", "127.0.0.1", "--model_alias", "bench", "--n_ctx", "2048",
                                      "--n_threads", str(threads), "--n_threads_batch", str(threads),
                                      "--interrupt_requests", "False"]))
    rows = []
    for name, command in servers:
        port = free_port()
        with running(command + ["--port", str(port)], port, logs / f"{name}.log") as url:
            rows += measure(name, url, args, count_tokens)
    result = table(rows)
    print("\n" + result)

    if args.write:
        command = " ".join(["bench/server_throughput.py"] + sys.argv[1:])
        peer = " and llama-cpp-python's server" if args.peer_python else ""
        text = (f"{SECTION}\n\n`.venv/bin/python {command}` — `lucid serve`{peer} on the same GGUF "
                f"({gguf.name}), {args.max_tokens} greedy tokens per streaming client, medians of {args.runs} "
                f"rounds, {datetime.date.today().isoformat()}. The machine is shared: other jobs ran during the "
                f"measurement (load average in the last column), so compare rows taken at similar load.\n\n"
                f"{result}\n")
        write_section(args.write, text)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
