"""`lucid inspect | trace | attention | embed-map | kv-demo`: the commands that look inside a model.

Each command is `run_*(model, args) -> int`, called by a thin `cmd_*` that checks the cheap
arguments first, then loads the model; docs/make_walkthrough.py calls the `run_*` functions
with one loaded model. Pictures go to `--out` (default ./lucid-out/) and their paths are
printed; `--json` prints one JSON object instead of text. Heavy modules (torch, matplotlib)
are imported inside the functions so `lucid --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_model import add_model_args, load_model
from .errors import InvalidArgumentError


def _emit(args, payload: dict, text: str) -> None:
    print(json.dumps(payload, ensure_ascii=False, indent=1) if args.json else text)


def _prompt_tokens(model, prompt: str) -> tuple[list[int], list[str]]:
    from .introspect.token_labels import token_text

    ids = model.token_batch(prompt)[0].tolist()
    return ids, [token_text(model.tokenizer, i) for i in ids]


def _shown(texts: list[str]) -> list[str]:
    from .introspect.token_labels import visible

    return [visible(t) for t in texts]


# ----- inspect -----

def _kv_cache_line(d: dict, cfg) -> str:
    from .viz.tables import megabytes

    if d["kv_cache_bytes_per_token"] is None:
        return "KV cache: none (an encoder reads its whole input at once; it generates nothing)"
    return (f"KV cache: {d['kv_cache_bytes_per_token']:,} bytes per token (K and V, {d['kv_cache_dtype']}, "
            f"{cfg.n_layers} layers x {cfg.n_kv_heads} KV heads x {cfg.head_dim}), "
            f"{megabytes(d['kv_cache_bytes_full_context'])} for the full context\n"
            f"decode steps: {d['decode_steps']}")


def run_inspect(model, args) -> int:
    from .introspect.architecture import describe
    from .viz.tables import megabytes, tensor_type_table

    d, cfg = describe(model), model.config
    hooks = "\n".join(f"  {name:<36} {shape}" for name, shape in d["hook_points"].items())
    text = (f"{d['name']}  ({d['path']}, {megabytes(d['file_bytes'])})\n\n{d['module_tree']}\n\n"
            "config: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in d["config"].items()) + "\n"
            f"parameters: {d['parameters']:,} (a tied LM head shares the embedding table and counts once)\n\n"
            f"{tensor_type_table(d['tensor_types'])}\n\n"
            f"context length: {d['context_length']:,} tokens\n"
            + _kv_cache_line(d, cfg) + "\n\nhook points (B batch, T positions, S key positions, C d_model, "
            f"H heads, H_kv KV heads, D head_dim):\n{hooks}")
    _emit(args, d, text)
    return 0


# ----- trace -----

def _trace_params(args):
    from .sampling import SamplingParams

    if args.steps < 1:
        raise InvalidArgumentError(f"--steps must be >= 1, got {args.steps}")
    if args.top_k < 1:
        raise InvalidArgumentError(f"--top-k (candidates shown) must be >= 1, got {args.top_k}")
    return SamplingParams(temperature=args.temperature, top_k=args.sample_top_k, top_p=args.top_p,
                          min_p=args.min_p, seed=args.seed)


def run_trace(model, args) -> int:
    from .introspect.trace import trace_generation
    from .viz.tables import trace_table

    model._require_decoder()
    params = _trace_params(args)
    ids, texts = _prompt_tokens(model, args.prompt)
    steps = trace_generation(model.model, model.tokenizer, ids, params, args.steps, args.top_k, model.stop_ids)
    completion = model.tokenizer.decode([s.chosen.token_id for s in steps])
    payload = {"prompt": args.prompt, "prompt_tokens": [{"id": i, "text": t} for i, t in zip(ids, texts)],
               "sampling": {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                            "min_p": params.min_p, "seed": params.seed},
               "steps": [s.to_json() for s in steps], "completion": completion}
    how = "greedy (temperature 0)" if params.greedy else "sampling; drawn = probability after temperature/top-k/top-p/min-p"
    text = (f"prompt: {args.prompt!r} ({len(ids)} tokens: {' | '.join(_shown(texts))})\n"
            f"{how}; prob = the model's own probability\n\n"
            f"{trace_table(steps, sampling=not params.greedy)}\n\ncompletion: {completion!r}")
    if args.lens:
        text += "\n\n" + _lens(model, args, ids, texts, payload)
    _emit(args, payload, text)
    return 0


def _lens(model, args, ids: list[int], texts: list[str], payload: dict) -> str:
    """Logit lens over the prompt: a table (last or every position), a heatmap, and JSON in `payload`."""
    from .introspect.lens import logit_lens
    from .introspect.token_labels import token_text, visible
    from .viz.heatmaps import lens_heatmap
    from .viz.tables import lens_grid, lens_table

    reading = logit_lens(model.model, model.token_batch(ids))  # top_ids, top_probs: (L, T, k)
    top1 = [[visible(token_text(model.tokenizer, int(i))) for i in row] for row in reading.top_ids[:, :, 0]]
    image = lens_heatmap(reading.top_probs[:, :, 0], top1, _shown(texts),
                         f"Logit lens: top next token after each layer\n{args.prompt!r}", Path(args.out) / "lens.png")
    last = len(ids) - 1
    positions = range(len(ids)) if args.all_positions else [last]
    payload["lens"] = {"image": str(image), "positions": [
        {"position": p, "token": texts[p], "layers": [
            [{"id": int(i), "text": token_text(model.tokenizer, int(i)), "prob": float(q)}
             for i, q in zip(reading.top_ids[layer, p], reading.top_probs[layer, p])]
            for layer in range(model.config.n_layers)]} for p in positions]}
    if args.all_positions:
        table = "logit lens, top token after each layer at every position:\n" + lens_grid(
            reading.top_ids, model.tokenizer, _shown(texts))
    else:
        table = (f"logit lens at the last position ({visible(texts[last])}), predicting the next token:\n"
                 + lens_table(reading.top_ids, reading.top_probs, model.tokenizer, last))
    return f"{table}\n\nwrote {image}"


# ----- attention -----

MAX_ATTENTION_TOKENS = 1024  # SmolLM2: 30 layers x 9 heads x 1024² float32 weights = 1.1 GB


def run_attention(model, args) -> int:
    from .introspect.attention import attention_patterns, check_head, check_layer
    from .viz.attention_page import attention_page
    from .viz.heatmaps import attention_grid, attention_heatmap

    check_layer(model.model, args.layer)
    if args.head is not None:
        check_head(model.model, args.head)
    ids, texts = _prompt_tokens(model, args.prompt)
    if len(ids) > MAX_ATTENTION_TOKENS:  # every layer's (H, T, T) weights are kept, for the page
        raise InvalidArgumentError(f"the prompt has {len(ids)} tokens; attention maps are drawn for at most "
                                   f"{MAX_ATTENTION_TOKENS} (each layer keeps H x T x T weights)")
    patterns = attention_patterns(model.model, model.token_batch(ids))  # (L, H, T, T)
    layer, labels, out = patterns[args.layer], _shown(texts), Path(args.out)
    where = f"layer {args.layer}"
    if args.head is not None:
        shown = layer[args.head]
        image = attention_heatmap(shown, labels, f"Attention, {where}, head {args.head}\n{args.prompt!r}",
                                  out / f"attention-L{args.layer}-H{args.head}.png")
    elif args.mean:
        shown = layer.mean(dim=0)
        image = attention_heatmap(shown, labels, f"Attention, {where}, mean of {layer.shape[0]} heads\n{args.prompt!r}",
                                  out / f"attention-L{args.layer}-mean.png")
    else:
        shown = layer
        image = attention_grid(layer, labels, f"Attention, {where}, every head: {args.prompt!r}",
                               out / f"attention-L{args.layer}-heads.png")
    page = attention_page(patterns, texts, f"Attention: {args.prompt}", out / "attention.html", layer=args.layer,
                          head=args.head if args.head is not None else "mean")
    payload = {"prompt": args.prompt, "tokens": texts, "layer": args.layer,
               "head": args.head if args.head is not None else ("mean" if args.mean else "all"),
               "pattern": shown.round(decimals=5).tolist(),  # (T, T), or (H, T, T) for every head
               "image": str(image), "page": str(page)}
    _emit(args, payload, f"wrote {image}\nwrote {page}")
    return 0


# ----- embed-map -----

def run_embed_map(model, args) -> int:
    from .introspect.embeddings import word_vectors
    from .introspect.projection import pca_2d, tsne_2d
    from .viz.embedding_map import embedding_map

    if model.is_encoder:  # (the map reads a decoder's token embedding table and final states)
        raise InvalidArgumentError(f"{model.name} is an encoder: embed-map places a decoder's token embeddings; "
                                   "for this model's sentence vectors use `lucid embed`")
    vectors = word_vectors(model.model, model.tokenizer, args.words, contextual=args.contextual)  # (N, C)
    kind = "last-layer states" if args.contextual else "input embeddings"
    if args.method == "pca":
        coords, explained = pca_2d(vectors)
        axes = tuple(f"PC{i + 1} ({100 * float(explained[i]):.0f}% of variance)" for i in range(2))
    else:
        coords, explained = tsne_2d(vectors), None
        axes = ("t-SNE dimension 1", "t-SNE dimension 2")
    name = f"embed-map-{'contextual' if args.contextual else 'input'}-{args.method}.png"
    method = {"pca": "PCA", "tsne": "t-SNE"}[args.method]
    image = embedding_map(coords, args.words, f"{model.name}: {kind} of {len(args.words)} words, {method}",
                          axes, Path(args.out) / name)
    payload = {"words": args.words, "contextual": args.contextual, "method": args.method,
               "coords": coords.tolist(), "explained_variance": None if explained is None else explained.tolist(),
               "image": str(image)}
    _emit(args, payload, f"wrote {image}")
    return 0


# ----- kv-demo -----

def run_kv_demo(model, args) -> int:
    from .introspect.kv_demo import KV_DEMO_PROMPT, kv_cache_demo

    r = kv_cache_demo(model, args.prompt or KV_DEMO_PROMPT, args.max_new_tokens)
    text = (f"prompt: {r['prompt']!r} ({r['prompt_tokens']} tokens), {r['new_tokens']} new tokens, greedy\n"
            f"with the KV cache:    {r['seconds_with_cache']:7.2f} s\n"
            f"without (recompute):  {r['seconds_without_cache']:7.2f} s\n"
            f"speed-up: {r['speedup']:.1f}x; same tokens: {'yes' if r['identical'] else 'NO'} "
            f"(torch on {r['torch_threads']} CPU threads)\n"
            f"token ids with cache:    {r['token_ids_with_cache']}\n"
            f"token ids without cache: {r['token_ids_without_cache']}\n"
            f"text: {r['text']!r}")
    _emit(args, r, text)
    return 0


# ----- argument parsing -----

def _checked_load(args):
    """Argument checks that need no model, then the (slow) load."""
    if getattr(args, "prompt", None) == "":
        raise InvalidArgumentError("the prompt is empty")
    if hasattr(args, "steps"):
        _trace_params(args)
    if getattr(args, "layer", 0) < 0 or (getattr(args, "head", None) or 0) < 0:
        raise InvalidArgumentError("layer and head numbers count from 0")
    if hasattr(args, "words"):
        from .introspect.embeddings import check_words
        check_words(args.words)
    if getattr(args, "max_new_tokens", 1) < 1:
        raise InvalidArgumentError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return load_model(args)


def _command(run):
    def command(args) -> int:
        return run(_checked_load(args), args)
    return command


def _inspect_command(args) -> int:
    """`lucid inspect CARD` describes a built-in architecture card; without one, a loaded model."""
    if args.card is not None:
        from .models.cards import describe_card

        print(describe_card(args.card))
        return 0
    return run_inspect(_checked_load(args), args)


def add_introspection_commands(sub) -> None:
    """Register the subcommands on the `lucid` parser's subparsers."""
    def add(name: str, run, help: str, prompt: bool = False, out: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        if prompt:
            p.add_argument("prompt")
        add_model_args(p)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        if out:
            p.add_argument("--out", default="lucid-out", help="directory for pictures (default: ./lucid-out/)")
        p.set_defaults(func=_command(run), run=run)
        return p

    p = add("inspect", run_inspect, "module tree, config, parameters, bytes by tensor type, KV-cache cost")
    p.add_argument("card", nargs="?", default=None,
                   help="an architecture card (e.g. phi-3-mini-4k-instruct, mixtral-8x7b): inspect it without weights")
    p.set_defaults(func=_inspect_command)

    p = add("trace", run_trace, "generate step by step: each token's probability and the top candidates",
            prompt=True, out=True)
    p.add_argument("--steps", "-n", type=int, default=8, help="tokens to generate (default 8)")
    p.add_argument("--top-k", type=int, default=5, help="candidates shown per step (default 5)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--sample-top-k", type=int, default=0, help="top-k sampling filter (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lens", action="store_true", help="also read the residual stream after every layer (logit lens)")
    p.add_argument("--all-positions", action="store_true", help="lens table at every prompt position, not just the last")

    p = add("attention", run_attention, "attention-pattern heatmap (PNG) and interactive page (HTML)",
            prompt=True, out=True)
    p.add_argument("--layer", "-l", type=int, required=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--head", type=int, default=None, help="one head (default: a grid of every head)")
    group.add_argument("--mean", action="store_true", help="the mean over the layer's heads")

    p = add("embed-map", run_embed_map, "2-D map of words' embeddings (PNG)", out=True)
    p.add_argument("words", nargs="*", help="words to place on the map")
    p.add_argument("--contextual", action="store_true", help="last-layer states instead of input embeddings")
    p.add_argument("--method", choices=["pca", "tsne"], default="pca")

    p = add("kv-demo", run_kv_demo, "greedy generation with and without the KV cache: timings and proof")
    p.add_argument("--prompt", default=None, help="default: the seeds' email prompt")
    p.add_argument("--max-new-tokens", "-n", type=int, default=48)
