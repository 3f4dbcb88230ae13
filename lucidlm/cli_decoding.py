"""Decoding flags of `lucid generate` and the `lucid compare-decoding` command.

    lucid generate "PROMPT" --strategy beam --num-beams 4 --json
    lucid generate "PROMPT" --temperature 0.8 --n 3 --logprobs 5
    lucid compare-decoding "The future of artificial intelligence"

Flags are turned into the keyword arguments of `LucidModel.generate_detailed` and checked
(`DecodingOptions`) before the model is loaded, so a bad value fails at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap

from .cli_model import add_model_args, load_model
from .errors import InvalidArgumentError

# Defaults filled in when a strategy is named but its parameters are not given.
DEFAULT_BEAMS = 4
DEFAULT_PENALTY_ALPHA, DEFAULT_CONTRASTIVE_TOP_K = 0.6, 4  # Su et al. 2022's usual setting
DEFAULT_SAMPLE_TEMPERATURE = 1.0
# `lucid compare-decoding`'s samples: the settings of seed 002's transformers example.
COMPARE_SAMPLING = dict(temperature=0.7, top_k=50, top_p=0.95)
# Options of generate_detailed that `LucidModel.stream` does not take.
DETAILED_ONLY = ("strategy", "num_beams", "length_penalty", "early_stopping", "num_return_sequences", "n", "logprobs")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=("greedy", "sample", "beam", "contrastive"), default=None,
                   help="default: beam if --num-beams > 1, contrastive if --penalty-alpha > 0, "
                        "sample if --temperature > 0, else greedy")
    p.add_argument("--num-beams", type=int, default=None, help=f"beam search width (default {DEFAULT_BEAMS} "
                   "with --strategy beam)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = sum of log-probs / length**this")
    p.add_argument("--early-stopping", choices=("true", "false", "never"), default="false",
                   help="when beam search stops (as in Hugging Face)")
    p.add_argument("--num-return-sequences", type=int, default=1, help="beam search: how many hypotheses to return")
    p.add_argument("--penalty-alpha", type=float, default=None,
                   help=f"contrastive search degeneration penalty (default {DEFAULT_PENALTY_ALPHA}, "
                        f"with --top-k {DEFAULT_CONTRASTIVE_TOP_K})")
    p.add_argument("--n", type=int, default=1, help="independent samples of the prompt (one shared prefill)")
    p.add_argument("--logprobs", type=int, default=0, metavar="K",
                   help="show each token's log-probability and the K most likely alternatives")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty, in [-2, 2]")
    p.add_argument("--logit-bias", action="append", default=None, metavar="ID=BIAS",
                   help="add BIAS, in [-100, 100] (-100 bans the token, 100 forces it), to token ID's logit (repeatable)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size")
    p.add_argument("--min-new-tokens", type=int, default=0, help="hold back stop tokens until this many tokens")
    p.add_argument("--max-time", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--json", action="store_true", help="print the result (all completions, log-probs) as JSON")


def _logit_bias(items: list[str] | None) -> dict[int, float]:
    bias = {}
    for item in items or []:
        token_id, sep, value = item.partition("=")
        try:
            bias[int(token_id)] = float(value)
        except ValueError:
            raise InvalidArgumentError(f"--logit-bias expects ID=BIAS (e.g. 42=-5), got {item!r}") from None
    return bias


def generate_kwargs(args, sampling_kwargs: dict) -> dict:
    """Keyword arguments for generate_detailed, validated (raises InvalidArgumentError)."""
    from .decoding import DecodingOptions

    num_beams = 1 if args.num_beams is None else args.num_beams
    kw = dict(sampling_kwargs, strategy=args.strategy, num_beams=num_beams,
              length_penalty=args.length_penalty, num_return_sequences=args.num_return_sequences,
              early_stopping={"true": True, "false": False}.get(args.early_stopping, args.early_stopping),
              penalty_alpha=args.penalty_alpha or 0.0, n=args.n, logprobs=args.logprobs,
              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
              logit_bias=_logit_bias(args.logit_bias), no_repeat_ngram_size=args.no_repeat_ngram_size,
              min_new_tokens=args.min_new_tokens, max_time=args.max_time)
    if args.strategy == "sample" and kw["temperature"] == 0:
        kw["temperature"] = DEFAULT_SAMPLE_TEMPERATURE
    if args.strategy == "beam" and args.num_beams is None:
        kw["num_beams"] = DEFAULT_BEAMS
    if args.strategy == "contrastive" or (args.penalty_alpha or 0) > 0:
        kw["penalty_alpha"] = DEFAULT_PENALTY_ALPHA if args.penalty_alpha is None else args.penalty_alpha
        kw["top_k"] = kw["top_k"] or DEFAULT_CONTRASTIVE_TOP_K
    DecodingOptions.from_kwargs(**kw)
    return kw


def stream_kwargs(kw: dict, as_json: bool) -> dict | None:
    """The kwargs for `LucidModel.stream` if this request can stream text, else None."""
    if as_json or kw["strategy"] == "beam" or kw["num_beams"] > 1 or kw["n"] > 1 or kw["logprobs"]:
        return None
    return {k: v for k, v in kw.items() if k not in DETAILED_ONLY}


def print_generation(generation, as_json: bool, model_name: str) -> None:
    if as_json:
        print(json.dumps({"model": model_name, **generation.to_dict()}, ensure_ascii=False))
        return
    several = len(generation.completions) > 1
    for i, completion in enumerate(generation.completions, 1):
        if several or completion.score is not None:
            score = f", score {completion.score:.4f}" if completion.score is not None else ""
            print(f"--- {i}/{len(generation.completions)} ({completion.finish_reason}{score}) ---")
        print(completion.text)
        for token in completion.tokens or []:
            alternatives = "  ".join(f"{t.token!r} {t.logprob:.3f}" for t in token.top)
            print(f"  {token.token!r:>16} {token.logprob:8.3f} | {alternatives}")
    print(f"[{generation.stats.summary()}]", file=sys.stderr)


def cmd_compare_decoding(args) -> int:
    if not args.prompt:
        raise InvalidArgumentError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    model = load_model(args)
    common = dict(max_new_tokens=args.max_new_tokens)
    rows = [("greedy", model.generate_detailed(args.prompt, **common).text),
            (f"beam ({DEFAULT_BEAMS} beams)", model.generate_detailed(args.prompt, num_beams=DEFAULT_BEAMS,
                                                                     **common).text),
            (f"contrastive (alpha {DEFAULT_PENALTY_ALPHA}, k {DEFAULT_CONTRASTIVE_TOP_K})",
             model.generate_detailed(args.prompt, penalty_alpha=DEFAULT_PENALTY_ALPHA,
                                     top_k=DEFAULT_CONTRASTIVE_TOP_K, **common).text)]
    samples = model.generate_detailed(args.prompt, n=3, seed=args.seed, **COMPARE_SAMPLING, **common)
    settings = ", ".join(f"{k} {v}" for k, v in COMPARE_SAMPLING.items())
    rows += [(f"sample {i} ({settings})", c.text) for i, c in enumerate(samples.completions, 1)]
    if args.json:
        print(json.dumps({"model": model.name, "prompt": args.prompt, "results": dict(rows)}, ensure_ascii=False))
        return 0
    label_width = max(len(label) for label, _ in rows)
    text_width = max(20, shutil.get_terminal_size().columns - label_width - 3)
    print(f"prompt: {args.prompt}")
    for label, text in rows:
        lines = textwrap.wrap(text.replace("\n", " ⏎ "), text_width) or [""]
        print(f"{label:<{label_width}} | {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<{label_width}} | {line}")
    return 0


def add_decoding_commands(sub) -> None:
    p = sub.add_parser("compare-decoding", help="greedy, beam, contrastive and three samples of one prompt, "
                                                "side by side")
    p.add_argument("prompt")
    add_model_args(p)
    p.add_argument("--max-new-tokens", "-n", type=int, default=40)
    p.add_argument("--seed", type=int, default=42, help="seed of the three samples")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_compare_decoding)
