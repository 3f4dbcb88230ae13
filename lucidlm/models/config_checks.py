"""Checks of a model configuration's values, shared by every family's config dataclass.

A config is checked once, when it is made, so that a bad value in a file (0 heads, a NaN RoPE
base) is a ValueError naming the field, which the loaders report as a ModelFileError naming the
file, instead of a ZeroDivisionError, a tensor of negative size, or a model that runs and
produces nothing.
"""

from __future__ import annotations

import math
import numbers


def check_counts(cfg=None, *fields: str, optional: bool = False, **values) -> None:
    """Fields of `cfg` (or keyword values) are positive integers (None too, where `optional`)."""
    for name, value in [*((f, getattr(cfg, f)) for f in fields), *values.items()]:
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive(cfg=None, *fields: str, optional: bool = False, **values) -> None:
    """Fields of `cfg` (or keyword values) are finite numbers > 0 (None too, where `optional`)."""
    for name, value in [*((f, getattr(cfg, f)) for f in fields), *values.items()]:
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def check_head_split(cfg) -> None:
    """d_model splits evenly over the heads (where head_dim is d_model / n_heads)."""
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model {cfg.d_model} is not a multiple of {cfg.n_heads} heads")


def check_decoder_config(cfg) -> None:
    """The checks every RoPE decoder with grouped-query attention needs (Llama, Mistral, Qwen,
    Phi-3, Mixtral, Gemma 3); sets head_dim to d_model / n_heads where it is None."""
    check_counts(cfg, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "context_length")
    if cfg.head_dim is None:
        check_head_split(cfg)
        object.__setattr__(cfg, "head_dim", cfg.d_model // cfg.n_heads)
    check_counts(cfg, "head_dim")
    if cfg.head_dim % 2:
        raise ValueError(f"head_dim {cfg.head_dim} is odd: RoPE rotates pairs of dimensions")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"{cfg.n_heads} query heads cannot be grouped over {cfg.n_kv_heads} KV heads")
    check_positive(cfg, "rope_base", "norm_eps")
