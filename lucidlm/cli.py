"""The `lucid` command: thin argument parsing over the Python API.

Every user error (bad file, bad parameter) is a `LucidError`: we print its one-line
message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .cli_decoding import add_decoding_args, add_decoding_commands, generate_kwargs, print_generation, stream_kwargs
from .cli_introspect import add_introspection_commands
from .cli_model import add_model_args, load_model
from .errors import LucidError


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="guess up to K tokens per step by copying from the context, checked in one pass "
                        "(faster where the output repeats the prompt; same output distribution; default 0: off)")


def _sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=args.stop, use_cache=not args.no_cache, prompt_lookup=args.prompt_lookup)


def _load(args):
    from .decoding import DecodingOptions

    # Check the cheap things before the slow load, so a typo fails at once.
    if hasattr(args, "temperature"):
        DecodingOptions.from_kwargs(**_sampling_kwargs(args))
    if getattr(args, "prompt", None) == "":
        raise LucidError("the prompt is empty")
    return load_model(args)


def cmd_generate(args) -> int:
    kwargs = generate_kwargs(args, _sampling_kwargs(args))  # checked before the slow load
    model = _load(args)
    streamed = stream_kwargs(kwargs, args.json)
    if streamed is None:  # several completions, log-probs or JSON: print the finished result
        print_generation(model.generate_detailed(args.prompt, **kwargs), args.json, model.name)
        return 0
    for piece in model.stream(args.prompt, **streamed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(flush=True)  # end the text before the stats line (stderr is unbuffered)
    print(f"[{model.last_stats.summary()}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    model = _load(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chatting with", model.name, "- /exit or Ctrl-D to quit, Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in model.stream_chat(messages, **_sampling_kwargs(args)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        print(flush=True)
        print(f"[{model.last_stats.summary()}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_models(args) -> int:
    from .loading.catalogue import CATALOGUE, DEFAULT_MODEL

    for name, entry in CATALOGUE.items():
        path = entry.locate()
        status = f"installed: {path}" if path else f"not installed: {entry.install_command}"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}\n  {entry.description}\n  {status}")
    return 0


def cmd_inspect_card(args) -> int:
    from .models.cards import CARDS, describe_card

    if args.name is None:
        for name, card in CARDS.items():
            print(f"{name}  ({card.source})")
        return 0
    print(describe_card(args.name))
    return 0


def cmd_tokenize(args) -> int:
    import json
    import os
    import shutil

    from .tokenizers import TOKENIZER_NAMES, load_tokenizer
    from .tokenizers.display import format_tokenization, tokenization_record

    sources = args.tokenizer or ["smollm2"]
    for source in sources:  # a typo fails at once, before anything slow is loaded
        if source not in TOKENIZER_NAMES and not os.path.exists(os.path.expanduser(source)):
            raise LucidError(f"unknown tokenizer '{source}': use a GGUF, tokenizer.json or .tiktoken path, "
                             f"or one of {', '.join(TOKENIZER_NAMES)}")
    results = []
    for source in sources:
        tokenizer = load_tokenizer(source)
        results.append((source, tokenizer, tokenizer.encode(args.text, add_special=not args.no_special)))
    if args.json:
        print(json.dumps({"text": args.text, "results": [tokenization_record(*r) for r in results]},
                         ensure_ascii=False))
        return 0
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    width = shutil.get_terminal_size().columns
    print("\n\n".join(format_tokenization(*r, colour=colour, width=width) for r in results))
    return 0


def cmd_embed(args) -> int:
    import json

    if not args.texts:
        raise LucidError("give at least one text to embed")
    embeddings = load_model(args).embed(args.texts)
    similarity = (embeddings @ embeddings.T).tolist()  # unit vectors: dot product = cosine
    if args.json:
        print(json.dumps({"texts": args.texts, "cosine_similarity": similarity}, ensure_ascii=False))
        return 0
    labels = [t if len(t) <= 40 else t[:37] + "..." for t in args.texts]
    width = max(len(label) for label in labels)
    print(f"cosine similarity of {len(labels)} sentence embeddings ({embeddings.shape[1]} dimensions)")
    print(" " * (width + 2) + " ".join(f"{i:>6}" for i in range(len(labels))))
    for i, (label, row) in enumerate(zip(labels, similarity)):
        print(f"{label:<{width}} {i}" + " ".join(f"{v:6.3f}" for v in row))
    return 0


def cmd_bench(args) -> int:
    import json

    from .benchmark import run_benchmark

    result = run_benchmark(args.model, runs=args.runs, decode_tokens=args.decode_tokens, dtype=args.dtype,
                           device=args.device, compile=args.compile)
    print(json.dumps(result.to_dict()) if args.json else result.table())
    return 0


def cmd_serve(args) -> int:
    import os

    import uvicorn

    from .loading.catalogue import CATALOGUE, DEFAULT_MODEL
    from .server import create_app

    api_key = args.api_key or os.environ.get("LUCID_API_KEY")  # the variable keeps the key out of `ps`
    # by name, so that the API calls it by its catalogue name ("" is left to the loader to refuse)
    model = load_model(args, DEFAULT_MODEL if args.model is None else args.model)
    if args.compile:  # compile before the first request, not during it
        from .compile import warm_up

        warm_up(model.model)
    embedder_name = args.embedding_model
    if embedder_name == "auto":  # MiniLM when its package is installed
        embedder_name = "minilm-l6-v2" if CATALOGUE["minilm-l6-v2"].locate() else "none"
    embedder = None if embedder_name == "none" else load_model(args, embedder_name, compile=False)
    app = create_app(model, embedding_model=embedder, api_key=api_key, max_queue=args.max_queue,
                     max_batch=args.max_batch, max_body_bytes=args.max_body_bytes,
                     default_max_tokens=args.default_max_tokens, model_id=args.model_id)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"lucid: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


def _port(text: str) -> int:
    port = int(text) if text.strip().isdigit() else -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return port


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lucid", description="Run and look inside transformer language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a completion of a prompt")
    p.add_argument("prompt")
    add_model_args(p)
    _add_sampling_args(p)
    add_decoding_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat using the model's chat template")
    add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("models", help="list the model catalogue and what is installed")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect-card", help="module tree, parameter counts and KV-cache size of a built-in "
                                            "architecture card (no weights needed)")
    p.add_argument("name", nargs="?", default=None, help="card name; omit to list the cards")
    p.set_defaults(func=cmd_inspect_card)

    p = sub.add_parser("tokenize", help="show how one or more tokenizers cut a text into tokens")
    p.add_argument("text")
    p.add_argument("--tokenizer", action="append", default=None, metavar="NAME_OR_PATH",
                   help="smollm2 (default), gemma3, minilm/bert, cl100k/gpt4, or a GGUF, tokenizer.json "
                        "or .tiktoken path; repeat to compare")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-special", action="store_true", help="do not add BOS/[CLS]/[SEP]")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("embed", help="sentence embeddings of texts and their cosine-similarity matrix")
    p.add_argument("texts", nargs="*")
    add_model_args(p, default="minilm-l6-v2", help="an encoder model (default: minilm-l6-v2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("bench", help="load time, prefill and decode speed, time to first token, peak memory")
    add_model_args(p)
    p.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching, and the explorer page")
    add_model_args(p)
    p.add_argument("--embedding-model", default="auto", metavar="NAME",
                   help="encoder for /v1/embeddings (default: minilm-l6-v2 when installed; 'none' for none)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set LUCID_API_KEY)")
    p.add_argument("--model-id", default=None, help="the model's name in the API (default: its file or catalogue name)")
    p.add_argument("--max-batch", type=_positive_int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="requests waiting for the batch; more get 429 (default 64)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=1_000_000, help="larger bodies get 413")
    p.add_argument("--default-max-tokens", type=_positive_int, default=256,
                   help="token limit of requests that give no max_tokens (default 256)")
    p.set_defaults(func=cmd_serve)

    add_introspection_commands(sub)
    add_decoding_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LucidError as e:
        print(f"lucid: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # an output folder that cannot be made, a file that cannot be written
        print(f"lucid: error: {e.strerror or e}: {e.filename}" if e.filename else f"lucid: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
