"""Mixtral sparse mixture-of-experts decoder (Jiang et al. 2024, "Mixtral of Experts",
arXiv:2401.04088), top to bottom.

    tokens -> embed_tokens -> N x [ x + attn(norm(x)) ; x + moe(norm(x)) ] -> norm -> lm_head -> logits

Mistral's attention (`llama.Attention`: GQA, RoPE, optional sliding window) with the MLP of
every block replaced by a sparse mixture of experts (`moe.SparseMoE`): a router scores 8
SwiGLU experts for each token, the best 2 run, and their outputs are mixed by the
renormalised router probabilities. Mixtral 8x7B holds ≈46.7B parameters, of which a token
uses ≈12.9B (attention, embeddings and 2 of the 8 experts of every layer).

Attribute names follow the checkpoint keys without the `model.` prefix:
`layers.{i}.block_sparse_moe.gate.weight` (E, C) is the router,
`layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight` are each expert's gate, down and up
projections. After a forward pass, each block's `block_sparse_moe` holds the router's
decisions (`last_router_logits`, `last_expert_indices`, `last_expert_weights`; see `moe.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..introspect.hook_point import HookPoint
from .layers import Embedding, RMSNorm, RotaryEmbedding, pass_positions
from .config_checks import check_counts, check_decoder_config
from .llama import Attention
from .moe import SparseMoE


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int
    d_model: int  # "hidden_size"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int  # "intermediate_size": hidden width of each expert
    context_length: int
    n_experts: int = 8  # "num_local_experts"
    n_experts_per_token: int = 2  # "num_experts_per_tok"
    rope_base: float = 1000000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: int | None = None  # keys more than this many positions back are not attended to
    attention_bias: bool = False  # read by llama.Attention; Mixtral's projections have no biases
    head_dim: int | None = None  # defaults to d_model / n_heads
    architecture: str = "mixtral"

    def __post_init__(self):
        check_decoder_config(self)
        check_counts(self, "sliding_window", optional=True)
        check_counts(self, "n_experts", "n_experts_per_token")
        if self.n_experts_per_token > self.n_experts:
            raise ValueError(f"cannot route to {self.n_experts_per_token} of {self.n_experts} experts")

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 bytes the KV cache grows by per token: K and V for every layer and KV head."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4


class Expert(nn.Module):
    """One SwiGLU expert, in Mixtral's names: w2(silu(w1(x)) * w3(x)) (w1 gate, w3 up, w2 down)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: MixtralConfig, layer_index: int):
        super().__init__()
        name = f"blocks.{layer_index}."
        self.hook_resid_pre = HookPoint(name + "hook_resid_pre")
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.hook_attn_out, self.hook_resid_mid = HookPoint(name + "hook_attn_out"), HookPoint(name + "hook_resid_mid")
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        experts = [Expert(cfg.d_model, cfg.d_ff) for _ in range(cfg.n_experts)]
        self.block_sparse_moe = SparseMoE(cfg.d_model, experts, cfg.n_experts_per_token, hook_prefix=name)
        self.hook_mlp_out, self.hook_resid_post = HookPoint(name + "hook_mlp_out"), HookPoint(name + "hook_resid_post")

    def forward(self, x, rope, positions, mask, cache):
        x = self.hook_resid_pre(x)  # (B, T, C)
        attn_out = self.hook_attn_out(self.self_attn(self.input_layernorm(x), rope, positions, mask, cache))
        x = self.hook_resid_mid(x + attn_out)
        moe_out = self.hook_mlp_out(self.block_sparse_moe(self.post_attention_layernorm(x)))
        return self.hook_resid_post(x + moe_out)


class Mixtral(nn.Module):
    def __init__(self, cfg: MixtralConfig):
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
