"""Hook points: identities at fixed sites of the forward pass, named the TransformerLens way.

The model's own attribute names mirror the checkpoint (`layers.3.self_attn.q_proj`), so each
`HookPoint` carries its public name separately, e.g. the one at `layers.3.self_attn.hook_z` is
called `blocks.3.attn.hook_z`. `hook_points(model)` lists them all in forward order.

A listener is `fn(activation, name) -> new activation or None`: returning None only reads,
returning a tensor of the same shape replaces the activation for the rest of the pass.

`HOOK_SITES` below gives every site's shape (letters as in `lucidlm.models.layers`). The
batch dimension is always kept. Per-head tensors keep our internal heads-before-positions
layout, so `x[:, h]` selects head h in q, k, v, z and the pattern alike (TransformerLens
orders q/k/v/z as (batch, pos, head, d_head) instead). As in TransformerLens, hook_q/hook_k
are before RoPE and hook_rot_q/hook_rot_k after it. During cached decoding T counts only
the new positions and S all positions so far.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import InvalidArgumentError

# site (the name without "blocks.{i}.") -> (shape, what it is); forward order within a block.
HOOK_SITES = {
    "hook_embed": ("(B, T, C)", "token embeddings"),
    "hook_pos_embed": ("(B, T, C)", "learned position embeddings (GPT-2)"),
    "hook_resid_pre": ("(B, T, C)", "residual stream entering the block"),
    "attn.hook_q": ("(B, H, T, D)", "queries, before RoPE"),
    "attn.hook_k": ("(B, H_kv, T, D)", "keys of the new positions, before RoPE"),
    "attn.hook_v": ("(B, H_kv, T, D)", "values of the new positions"),
    "attn.hook_rot_q": ("(B, H, T, D)", "queries after RoPE"),
    "attn.hook_rot_k": ("(B, H_kv, T, D)", "keys after RoPE (what the KV cache stores, in its dtype)"),
    "attn.hook_pattern": ("(B, H, T, S)", "attention weights, softmax over key positions S"),
    "attn.hook_z": ("(B, H, T, D)", "per-head attention output, before o_proj"),
    "hook_attn_out": ("(B, T, C)", "attention output added to the residual stream (after o_proj)"),
    "hook_resid_mid": ("(B, T, C)", "residual stream between attention and MLP"),
    "moe.hook_router_probs": ("(B, T, E)", "MoE router: softmax over the E experts, before top-k"),
    "moe.hook_expert_indices": ("(B, T, k)", "MoE router: the k chosen experts, most probable first (read-only)"),
    "hook_mlp_out": ("(B, T, C)", "MLP output added to the residual stream"),
    "hook_resid_post": ("(B, T, C)", "residual stream leaving the block"),
    "hook_final_norm": ("(B, T, C)", "final norm output, the input of lm_head"),
}

Listener = Callable[[torch.Tensor, str], "torch.Tensor | None"]


class HookPoint:
    """Identity at a named site; listeners may read or replace the activation passing through.

    Deliberately not an nn.Module: hook points hold no weights, and staying out of the
    module tree keeps `print(model)` and the state dict exactly as the checkpoint's.
    """

    def __init__(self, name: str):
        self.name = name
        self.listeners: list[Listener] = []

    @property
    def active(self) -> bool:
        return bool(self.listeners)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.listeners:  # the common case: one test, no work
            return x
        for listener in self.listeners:
            replaced = listener(x, self.name)
            if replaced is not None:
                if not isinstance(replaced, torch.Tensor):
                    raise InvalidArgumentError(f"hook on '{self.name}' returned {type(replaced).__name__}; "
                                               "a hook returns None (to read) or a tensor (to replace)")
                if replaced.shape != x.shape:
                    raise InvalidArgumentError(f"hook on '{self.name}' returned shape {tuple(replaced.shape)}, "
                                               f"expected {tuple(x.shape)}")
                x = replaced
        return x

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, {len(self.listeners)} listeners)"


_SITE_ORDER = {site: i for i, site in enumerate(HOOK_SITES)}



class Observers:
    """Whoever could be watching `model` run: hook points' listeners, PyTorch's own module hooks
    (contrastive search reads the final norm's output with one) and global hooks, and attention
    layers asked for explicit weights (`explicit`). A step that runs no Python per layer (a
    compiled graph, a CUDA graph replay, `direct_decode`'s kernel calls) would skip them silently,
    so those steps run the eager forward while `any()` is true. The lists and dicts are filled and
    emptied in place, so one flat list of them is checked per step (~1,100 for SmolLM2: ~15 µs)."""

    def __init__(self, model: nn.Module):
        modules = list(model.modules())
        self.hook_points = [value for module in modules for value in vars(module).values()
                            if isinstance(value, HookPoint)]
        self.watched = ([point.listeners for point in self.hook_points]
                        + [m._forward_hooks for m in modules] + [m._forward_pre_hooks for m in modules])
        self.attentions = [module for module in modules if hasattr(module, "explicit")]

    def any(self) -> bool:
        # (the global hooks are looked up each time: a deep copy of a model must not copy the dicts)
        return (any(self.watched) or bool(nn.modules.module._global_forward_hooks)
                or bool(nn.modules.module._global_forward_pre_hooks) or any(a.explicit for a in self.attentions))


def _forward_order(name: str) -> tuple[int, int]:
    """Sites before the blocks, then block by block in HOOK_SITES order, hook_final_norm last.
    Sites a family adds (not in HOOK_SITES) keep their place relative to each other, after the known ones."""
    if not name.startswith("blocks."):
        return (1 << 30 if name == "hook_final_norm" else -1, _SITE_ORDER.get(name, len(_SITE_ORDER)))
    _, layer, site = name.split(".", 2)
    return (int(layer), _SITE_ORDER.get(site, len(_SITE_ORDER)))


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Public name -> HookPoint, in forward order, found among the attributes of the model's modules."""
    points = [v for module in model.modules() for v in vars(module).values() if isinstance(v, HookPoint)]
    return {p.name: p for p in sorted(points, key=lambda p: _forward_order(p.name))}  # stable sort


def hook_sites(model: nn.Module) -> list[str]:
    """The model's sites, with block numbers abstracted: 'hook_embed', 'blocks.{i}.attn.hook_q', ..."""
    sites = {}
    for name in hook_points(model):
        sites.setdefault(("blocks.{i}." + name.split(".", 2)[2]) if name.startswith("blocks.") else name)
    return list(sites)


def hook_names(model: nn.Module) -> list[str]:
    return list(hook_points(model))
