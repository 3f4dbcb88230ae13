"""Attention patterns of a prompt, with checked layer and head numbers."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .capture import run_with_cache


def check_layer(model: nn.Module, layer: int) -> None:
    n = model.config.n_layers
    if not 0 <= layer < n:
        raise InvalidArgumentError(f"layer {layer} is out of range: the model has {n} layers (0-{n - 1})")


def check_head(model: nn.Module, head: int) -> None:
    n = model.config.n_heads
    if not 0 <= head < n:
        raise InvalidArgumentError(f"head {head} is out of range: each layer has {n} attention heads (0-{n - 1})")


@torch.inference_mode()
def attention_patterns(model: nn.Module, tokens: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """Attention weights of one sequence, tokens (1, T) -> (len(layers), H, T, T); all layers by default.

    Row q of a head's (T, T) matrix is how query position q spreads its attention over the
    key positions (it sums to 1, and is 0 right of the diagonal: causal masking).
    """
    layers = list(range(model.config.n_layers)) if layers is None else layers
    for layer in layers:
        check_layer(model, layer)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    _, cache = run_with_cache(model, tokens, names=names)
    return torch.stack([cache[name][0].float() for name in names])
