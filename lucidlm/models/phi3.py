"""Phi-3 decoder (Abdin et al. 2024, "Phi-3 Technical Report", arXiv:2404.14219), top to bottom.

    tokens -> embed_tokens -> N x [ x + attn(norm(x)) ; x + mlp(norm(x)) ] -> norm -> lm_head -> logits

The computation is Llama's (pre-norm RMSNorm blocks, RoPE, SwiGLU MLP); what differs is how
the weights are stored:
- q, k and v come from one fused projection `qkv_proj`, rows [q (H·D) | k (H_kv·D) | v (H_kv·D)];
- the MLP's gate and up projections are one fused `gate_up_proj`, rows [gate (F) | up (F)];
- Phi-3-mini-4k ships with `sliding_window` 2047 in its config: each query attends to at most
  the last 2047 positions (itself included).
Attribute names follow the checkpoint keys without the `model.` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..introspect.hook_point import HookPoint
from .layers import Embedding, RMSNorm, RotaryEmbedding, pass_positions, scaled_dot_product_attention
from .config_checks import check_counts, check_decoder_config


@dataclass(frozen=True)
class Phi3Config:
    vocab_size: int
    d_model: int  # "hidden_size"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int  # "intermediate_size": width of each of gate and up
    context_length: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: int | None = None  # keys more than this many positions back are not attended to
    head_dim: int | None = None  # defaults to d_model / n_heads
    architecture: str = "phi3"

    def __post_init__(self):
        check_decoder_config(self)
        check_counts(self, "sliding_window", optional=True)

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 bytes the KV cache grows by per token: K and V for every layer and KV head."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4


class Attention(nn.Module):
    def __init__(self, cfg: Phi3Config, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.explicit = False  # True: materialise attention weights (see scaled_dot_product_attention)
        name = f"blocks.{layer_index}.attn."
        self.hook_q, self.hook_k, self.hook_v = (HookPoint(name + s) for s in ("hook_q", "hook_k", "hook_v"))
        self.hook_rot_q, self.hook_rot_k = HookPoint(name + "hook_rot_q"), HookPoint(name + "hook_rot_k")
        self.hook_pattern, self.hook_z = HookPoint(name + "hook_pattern"), HookPoint(name + "hook_z")

    def forward(self, x, rope: RotaryEmbedding, positions, mask, cache: KVCache | None):
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, H_kv * D, H_kv * D], dim=-1)
        q = self.hook_q(q.view(B, T, H, D).transpose(1, 2))  # (B, H, T, D)
        k = self.hook_k(k.view(B, T, H_kv, D).transpose(1, 2))  # (B, H_kv, T, D)
        v = self.hook_v(v.view(B, T, H_kv, D).transpose(1, 2))
        q, k = self.hook_rot_q(rope(q, positions)), self.hook_rot_k(rope(k, positions))
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, H_kv, S, D)
        z, _ = scaled_dot_product_attention(q, k, v, mask, scale=D**-0.5,
                                            explicit=self.explicit or self.hook_pattern.active,
                                            weights_hook=self.hook_pattern)
        z = self.hook_z(z)  # (B, H, T, D)
        return self.o_proj(z.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    """SwiGLU with fused gate and up projections: down(silu(gate) * up), [gate | up] = gate_up_proj(x)."""

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x (B, T, F)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: Phi3Config, layer_index: int):
        super().__init__()
        name = f"blocks.{layer_index}."
        self.hook_resid_pre = HookPoint(name + "hook_resid_pre")
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.hook_attn_out, self.hook_resid_mid = HookPoint(name + "hook_attn_out"), HookPoint(name + "hook_resid_mid")
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.hook_mlp_out, self.hook_resid_post = HookPoint(name + "hook_mlp_out"), HookPoint(name + "hook_resid_post")

    def forward(self, x, rope, positions, mask, cache):
        x = self.hook_resid_pre(x)  # (B, T, C)
        attn_out = self.hook_attn_out(self.self_attn(self.input_layernorm(x), rope, positions, mask, cache))
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x)))
        return self.hook_resid_post(x + mlp_out)


class Phi3(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint("hook_embed")
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hook_final_norm = HookPoint("hook_final_norm")
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_base, cfg.context_length)

    def new_cache(self, batch: int, max_positions: int | None = None) -> KVCache:
        cfg = self.config
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_positions or cfg.context_length, cfg.head_dim,
                       dtype=self.embed_tokens.weight.dtype, device=self.embed_tokens.weight.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                valid: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); `valid` and `cache` as in `Llama.forward`."""
        T = tokens.shape[1]
        where = pass_positions(tokens, valid, cache)  # token positions and key validity of this pass
        positions = where.positions  # (B, T)
        mask = where.mask(window=self.config.sliding_window)  # (B, 1, T, S) or None

        x = self.hook_embed(self.embed_tokens(tokens))  # (B, T, C)
        for block in self.layers:
            x = block(x, self.rope, positions, mask, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:  # generation needs only the next token's logits: skip the LM head elsewhere
            x = x[:, -1:]
        return self.lm_head(self.hook_final_norm(self.norm(x))).float()  # (B, T, V)
