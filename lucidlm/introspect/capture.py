"""Running a model with listeners on its hook points: capture activations, or edit them.

    logits, cache = run_with_cache(model, tokens, names=["blocks.0.attn.hook_pattern"])
    logits = run_with_hooks(model, tokens, {"blocks.2.attn.hook_z": zero_head_1})

`model` is a `lucidlm.models` module (tokens (B, T) -> logits (B, T, V)); the text-level
versions are `LucidModel.run_with_cache` / `run_with_hooks`. Listeners are always removed
when the pass ends, also when it fails.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .activation_cache import ActivationCache
from .hook_point import Listener, hook_points, hook_sites

def _unknown_name_error(model: nn.Module, name: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"unknown hook point '{name}': this model has blocks 0-{model.config.n_layers - 1} "
                                f"and the sites {', '.join(hook_sites(model))}")


def select_hook_names(model: nn.Module, names: str | Iterable[str] | Callable[[str], bool] | None = None) -> list[str]:
    """Resolve `names` (None: all; a name; a list of names; a predicate on names) to a list, in forward order."""
    available = hook_points(model)
    if names is None:
        return list(available)
    if callable(names):
        return [n for n in available if names(n)]
    if not isinstance(names, (str, list, tuple, set)):
        raise InvalidArgumentError(f"names must be None, a hook name, a list of names or a predicate, got {names!r}")
    wanted = [names] if isinstance(names, str) else list(names)
    for name in wanted:
        if name not in available:
            raise _unknown_name_error(model, name)
    return [n for n in available if n in set(wanted)]


@contextmanager
def hooks_attached(model: nn.Module, hooks: dict[str, Listener]) -> Iterator[None]:
    """Add listeners for the duration of a `with` block (any forward pass: prefill, cached decode...)."""
    available = hook_points(model)
    if not isinstance(hooks, Mapping):
        raise InvalidArgumentError(f"hooks must map hook names to functions, got {type(hooks).__name__}")
    for name, listener in hooks.items():
        if name not in available:
            raise _unknown_name_error(model, name)
        if not callable(listener):
            raise InvalidArgumentError(f"the hook for '{name}' is not callable: {listener!r}")
    attached = []
    try:
        for name, listener in hooks.items():
            available[name].listeners.append(listener)
            attached.append((available[name], listener))
        yield
    finally:
        for point, listener in attached:
            point.listeners.remove(listener)


@torch.inference_mode()
def run_with_hooks(model: nn.Module, tokens: torch.Tensor, hooks: dict[str, Listener],
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (B, T) -> logits (B, T, V), with each `hooks[name](activation, name)` called at its site."""
    with hooks_attached(model, hooks):
        return model(tokens, valid=valid)


@torch.inference_mode()
def run_with_cache(model: nn.Module, tokens: torch.Tensor, names=None,
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, ActivationCache]:
    """tokens (B, T) -> (logits (B, T, V), ActivationCache of the selected hook points).

    Capturing any `hook_pattern` makes that layer take the explicit attention path.
    """
    captured: dict[str, torch.Tensor] = {}

    def store(activation: torch.Tensor, name: str) -> None:
        captured[name] = activation.detach()

    logits = run_with_hooks(model, tokens, {name: store for name in select_hook_names(model, names)}, valid)
    ordered = {name: captured[name] for name in hook_points(model) if name in captured}
    return logits, ActivationCache(ordered, model.config.n_layers)


def as_token_batch(ids) -> torch.Tensor:
    """A list of ids -> (1, T) tensor; a (T,) or (B, T) tensor -> (B, T) long."""
    tokens = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise InvalidArgumentError(f"expected token ids of shape (T,) or (B, T) with T >= 1, got {tuple(tokens.shape)}")
    return tokens.long()
