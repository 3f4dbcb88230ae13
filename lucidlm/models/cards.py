"""Architecture cards: well-known models' configurations, built without their weights.

A card's model is constructed on PyTorch's `meta` device: every parameter has its real
shape but no memory and no values, so an 8x7B-parameter mixture of experts "exists" in
milliseconds on any machine. That is enough to see what an architecture is made of:

    lucid inspect-card mixtral-8x7b

prints the module tree with every weight's shape, the total and the *active* parameter
count (what one token actually multiplies: for a mixture of experts only k of the E
experts of each layer) and how many bytes the KV cache grows by per token.

Configurations are copied from each model's published config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .bert import Bert, BertConfig
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig
from .mixtral import Mixtral, MixtralConfig
from .moe import SparseMoE
from .phi3 import Phi3, Phi3Config


@dataclass(frozen=True)
class Card:
    name: str
    source: str  # where the configuration comes from
    build: Callable[[], nn.Module]  # constructs the model (call it on the meta device)


CARDS = {
    c.name: c
    for c in [
        Card("phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct", lambda: Phi3(Phi3Config(
            vocab_size=32064, d_model=3072, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=8192, context_length=4096,
            rope_base=10000.0, norm_eps=1e-5, tie_embeddings=False, sliding_window=2047))),
        Card("llama-3-8b", "meta-llama/Meta-Llama-3-8B", lambda: Llama(LlamaConfig(
            vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, context_length=8192,
            rope_base=500000.0, norm_eps=1e-5, tie_embeddings=False))),
        Card("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", lambda: Mixtral(MixtralConfig(
            vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, context_length=32768,
            n_experts=8, n_experts_per_token=2, rope_base=1e6, norm_eps=1e-5, tie_embeddings=False))),
        Card("gpt2", "openai-community/gpt2", lambda: GPT2(GPT2Config(
            vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, context_length=1024, norm_eps=1e-5))),
        # The encoder alone (embeddings + 12 layers), without the pooler and the masked-LM head.
        Card("bert-base-cased", "google-bert/bert-base-cased", lambda: Bert(BertConfig(
            vocab_size=28996, d_model=768, n_layers=12, n_heads=12, d_ff=3072, context_length=512,
            type_vocab_size=2, norm_eps=1e-12))),
    ]
}


def build_card(name: str) -> nn.Module:
    """The card's model on the meta device: real shapes, no weights allocated."""
    if name not in CARDS:
        raise InvalidArgumentError(f"unknown card '{name}' (cards: {', '.join(CARDS)})")
    with torch.device("meta"):
        return CARDS[name].build()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameter counts; tied weights count once.

    Active parameters are those one token's forward pass uses: all of them, except that in a
    mixture-of-experts layer only top_k of its E experts run, so the other E - top_k experts'
    share of that layer's expert parameters is left out.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.modules():
        if isinstance(moe, SparseMoE):
            per_expert = sum(p.numel() for p in moe.experts[0].parameters())
            inactive += (len(moe.experts) - moe.top_k) * per_expert
    return total, total - inactive


def _signature(module: nn.Module) -> tuple:
    """What makes two modules "the same" for the tree: class and every weight's name and shape."""
    return type(module).__name__, tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def module_tree(model: nn.Module) -> list[str]:
    """One line per module: name, class, its own weights' shapes; runs of identical modules in a
    ModuleList (the layers, the experts) are shown once as "N x Class"."""
    lines: list[str] = []
    owner: dict[int, str] = {}  # id(parameter) -> full name of its first appearance (tied weights)

    def visit(module: nn.Module, name: str, path: str, depth: int, count: int = 1) -> None:
        indent = "  " * depth
        label = f"{count} x {type(module).__name__}" if count > 1 else type(module).__name__
        weights = []
        for pname, p in module.named_parameters(recurse=False):
            full = f"{path}{pname}"
            if id(p) in owner:
                weights.append(f"{pname} = {owner[id(p)]} (tied)")
            else:
                owner[id(p)] = full
                weights.append(f"{pname} {tuple(p.shape)}")
        n = sum(p.numel() for p in module.parameters())
        if weights:
            detail = ", ".join(weights)
        elif n:
            detail = f"{n:,} parameters" + (" each" if count > 1 else "")
        else:
            detail = module.extra_repr()  # no weights (RoPE tables): its settings
        lines.append(f"{indent}{name}{label}  {detail}".rstrip())
        children = list(module.named_children())
        if isinstance(module, nn.ModuleList):
            i = 0
            while i < len(children):
                j = i
                while j + 1 < len(children) and _signature(children[j + 1][1]) == _signature(children[i][1]):
                    j += 1
                child_name = f"{i}-{j}" if j > i else f"{i}"
                visit(children[i][1], child_name + ": ", f"{path}{children[i][0]}.", depth + 1, j - i + 1)
                i = j + 1
            return
        for child_name, child in children:
            visit(child, child_name + ": ", f"{path}{child_name}.", depth + 1)

    visit(model, "", "", 0)
    return lines


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _billions(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe_card(name: str) -> str:
    """The report `lucid inspect-card NAME` prints."""
    model = build_card(name)
    cfg = model.config
    total, active = count_parameters(model)
    lines = [f"{name}  ({cfg.architecture}, configuration of {CARDS[name].source}; no weights loaded)", ""]
    lines += module_tree(model)
    lines += [
        "",
        f"parameters:         {total:,} ({_billions(total)}) total",
        f"active per token:   {active:,} ({_billions(active)})"
        + ("" if active == total else f" = {100 * active / total:.0f}% (top-{_top_k(model)} routing)"),
    ]
    kv32 = getattr(cfg, "kv_bytes_per_token", None)
    if kv32 is None:
        lines.append("KV cache:           none (an encoder reads the whole input at once; nothing is generated)")
    else:
        lines += [
            f"KV cache per token: {kv32:,} bytes in float32, {kv32 // 2:,} in 16-bit "
            f"(2 x {cfg.n_layers} layers x {cfg.n_kv_heads} KV heads x {cfg.head_dim} dims)",
            f"KV cache for the full context of {cfg.context_length:,} tokens: {_bytes(kv32 * cfg.context_length)} "
            f"in float32, {_bytes(kv32 // 2 * cfg.context_length)} in 16-bit",
        ]
    return "\n".join(lines)


def _top_k(model: nn.Module) -> str:
    moe = next(m for m in model.modules() if isinstance(m, SparseMoE))
    return f"{moe.top_k} of {len(moe.experts)}"
