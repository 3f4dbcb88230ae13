"""ActivationCache: what `run_with_cache` captured, keyed by hook name.

Tensors keep the shapes their hooks see (`HOOK_SITES`), batch dimension included even for
a single prompt, so `cache[name][0]` is always the first (or only) sequence.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import InvalidArgumentError


class ActivationCache:
    def __init__(self, activations: dict[str, torch.Tensor], n_layers: int):
        self._activations = activations
        self.n_layers = n_layers

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._activations:
            captured = ", ".join(list(self._activations)[:4]) + (" ..." if len(self._activations) > 4 else "")
            raise InvalidArgumentError(f"'{name}' was not captured (captured: {captured or 'nothing'})")
        return self._activations[name]

    def __contains__(self, name: object) -> bool:
        return name in self._activations

    def __iter__(self) -> Iterator[str]:
        return iter(self._activations)

    def __len__(self) -> int:
        return len(self._activations)

    def keys(self):
        return self._activations.keys()

    def values(self):
        return self._activations.values()

    def items(self):
        return self._activations.items()

    def stack_layers(self, site: str) -> torch.Tensor:
        """`blocks.{i}.{site}` for every layer, stacked: (L, *shape of one layer's tensor)."""
        return torch.stack([self[f"blocks.{i}.{site}"] for i in range(self.n_layers)])

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self._activations.items())[:3])
        more = f", ... ({len(self)} in all)" if len(self) > 3 else ""
        return f"ActivationCache({shapes}{more})"
