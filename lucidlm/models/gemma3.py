"""Gemma 3 decoder (text part), top to bottom.

    tokens -> embed_tokens * sqrt(C) -> N x block -> norm -> lm_head (tied) -> logits

What differs from Llama (see `llama.py`):
- every RMSNorm scales by (1 + w) instead of w (the checkpoint stores w around 0);
- each block normalises both the input *and the output* of attention and of the MLP
  ("sandwich" norms: input_layernorm, post_attention_layernorm, pre_feedforward_layernorm,
  post_feedforward_layernorm), and the residual stream adds the normalised outputs;
- queries and keys get their own RMSNorm over head_dim before RoPE (QK-norm);
- layers alternate: 5 local layers with sliding-window attention (each query sees the last
  `sliding_window` positions) and RoPE base 10,000, then 1 global layer with full causal
  attention and RoPE base `rope_base` (1,000,000). Local layers keep the cost of long
  contexts down; the global ones carry information across the whole context;
- the MLP is GeGLU: down(gelu_tanh(gate(x)) * up(x));
- attention scores are scaled by query_pre_attn_scalar^-0.5 (= head_dim^-0.5 for 270M).
Paper: "Gemma 3 Technical Report", arXiv:2503.19786.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..introspect.hook_point import HookPoint
from ..kernels import cpu_decode
from .layers import (Embedding, RotaryEmbedding, pass_positions, project_gate_up, project_qkv,
                     scaled_dot_product_attention, takes_cpu_kernel, window_of_keys)
from .config_checks import check_counts, check_decoder_config, check_positive


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    context_length: int
    sliding_window: int
    sliding_window_pattern: int = 6  # every 6th layer is global
    rope_base: float = 1_000_000.0  # global layers
    rope_local_base: float = 10_000.0  # sliding-window layers
    norm_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None  # defaults to head_dim
    tie_embeddings: bool = True
    architecture: str = "gemma3"

    def __post_init__(self):
        check_decoder_config(self)
        check_counts(self, "sliding_window", "sliding_window_pattern")
        check_positive(self, "rope_local_base")
        check_positive(self, "query_pre_attn_scalar", optional=True)

    def is_global(self, layer_index: int) -> bool:
        return (layer_index + 1) % self.sliding_window_pattern == 0

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4


class GemmaRMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * (1 + w), in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.cpu_kernel = False  # packed models where cpu_decode's kernels run (see loading.load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_cpu_kernel(self, x):
            return cpu_decode.rms_norm(x, self.weight, self.eps, weight_offset=1.0)  # the lines below in one call
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.is_global = cfg.is_global(layer_index)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.qkv_proj: nn.Module | None = None  # packed models: q, k, v stacked (see layers.project_qkv)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.window = None if self.is_global else cfg.sliding_window  # local layers: the last W slots
        self.explicit = False
        self.prefill_dtype: torch.dtype | None = None  # set for packed models (see loading.load)
        self.decode_kernel = False  # decode steps through cpu_decode's attention (packed models, see loading.load)
        name = f"blocks.{layer_index}.attn."
        self.hook_q, self.hook_k, self.hook_v = (HookPoint(name + s) for s in ("hook_q", "hook_k", "hook_v"))
        self.hook_rot_q, self.hook_rot_k = HookPoint(name + "hook_rot_q"), HookPoint(name + "hook_rot_k")
        self.hook_pattern, self.hook_z = HookPoint(name + "hook_pattern"), HookPoint(name + "hook_z")

    def forward(self, x, rope: RotaryEmbedding, positions, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x)  # (B, T, H*D), (B, T, H_kv*D), (B, T, H_kv*D)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.hook_v(v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2))
        q, k = self.hook_q(self.q_norm(q)), self.hook_k(self.k_norm(k))  # QK-norm over D
        q, k = self.hook_rot_q(rope(q, positions)), self.hook_rot_k(rope(k, positions))
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, H_kv, S, D)
        explicit = self.explicit or self.hook_pattern.active  # (the pattern is over every key slot)
        if not explicit:
            k, v, mask = window_of_keys(k, v, mask, self.window, cache)
        z, _ = scaled_dot_product_attention(q, k, v, mask, scale=self.scale, explicit=explicit,
                                            weights_hook=self.hook_pattern, prefill_dtype=self.prefill_dtype,
                                            decode_kernel=self.decode_kernel)
        z = self.hook_z(z)  # (B, H, T, D)
        return self.o_proj(z.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GeGLU(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))  (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.gate_up_proj: nn.Module | None = None  # packed models: gate and up stacked (see layers.project_gate_up)
        self.cpu_kernel = False  # packed models where cpu_decode's kernels run (see loading.load)

    def forward(self, x):
        if self.gate_up_proj is not None and takes_cpu_kernel(self, x):  # the split, gelu and product in one call
            return self.down_proj(cpu_decode.gated_activation(self.gate_up_proj(x), "gelu_tanh"))
        gate, up = project_gate_up(self, x)  # (B, T, F) each
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_index: int):
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GeGLU(cfg.d_model, cfg.d_ff)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        name = f"blocks.{layer_index}."
        self.hook_resid_pre = HookPoint(name + "hook_resid_pre")
        self.hook_attn_out, self.hook_resid_mid = HookPoint(name + "hook_attn_out"), HookPoint(name + "hook_resid_mid")
        self.hook_mlp_out, self.hook_resid_post = HookPoint(name + "hook_mlp_out"), HookPoint(name + "hook_resid_post")

    def forward(self, x, rope, positions, mask, cache):
        x = self.hook_resid_pre(x)  # (B, T, C)
        attn_out = self.self_attn(self.input_layernorm(x), rope, positions, mask, cache)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.post_attention_layernorm(attn_out)))
        mlp_out = self.mlp(self.pre_feedforward_layernorm(x))
        return self.hook_resid_post(x + self.hook_mlp_out(self.post_feedforward_layernorm(mlp_out)))


class Gemma3(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint("hook_embed")
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        self.hook_final_norm = HookPoint("hook_final_norm")
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope_global = RotaryEmbedding(cfg.head_dim, cfg.rope_base, cfg.context_length)
        self.rope_local = RotaryEmbedding(cfg.head_dim, cfg.rope_local_base, cfg.context_length)

    # dtype of the activations and the KV cache; the loader sets bfloat16 for bfloat16 weights
    # (`loading.load`). A class attribute, so models built directly stay float32.
    compute_dtype: torch.dtype = torch.float32
    # The KV cache's dtype where it differs: packed models store keys and values as float16 where
    # the decode attention kernel reads them (`cpu_decode.decode_attention`), so that a step at a
    # long context reads half the bytes (SmolLM2 at 3,000 positions: 69 MB of 138, besides ~95 MB of weights).
    kv_dtype: torch.dtype | None = None

    def new_cache(self, batch: int, max_positions: int | None = None) -> KVCache:
        cfg = self.config
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_positions or cfg.context_length, cfg.head_dim,
                       dtype=self.kv_dtype or self.compute_dtype, device=self.norm.weight.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                valid: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); `valid` and `cache` as in `Llama.forward`."""
        cfg = self.config
        T = tokens.shape[1]
        where = pass_positions(tokens, valid, cache)  # token positions and key validity of this pass
        positions = where.positions  # (B, T)
        global_mask = where.mask()  # (B, 1, T, S) or None
        local_mask = where.mask(window=cfg.sliding_window)  # sliding window: only the last W positions

        # The embedding is scaled by sqrt(C) (rounded to the weights' dtype, as in training).
        x = self.embed_tokens(tokens) * torch.tensor(cfg.d_model**0.5, dtype=self.compute_dtype)
        x = self.hook_embed(x)  # (B, T, C)
        for block in self.layers:
            if block.self_attn.is_global:
                x = block(x, self.rope_global, positions, global_mask, cache)
            else:
                x = block(x, self.rope_local, positions, local_mask, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:  # generation needs only the next token's logits: skip the LM head elsewhere
            x = x[:, -1:]
        return self.lm_head(self.hook_final_norm(self.norm(x))).float()
