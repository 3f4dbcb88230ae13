"""Llama-family decoder (Llama 2/3, SmolLM, Mistral-style dense models), top to bottom.

    tokens -> embed_tokens -> N x [ x + attn(norm(x)) ; x + mlp(norm(x)) ] -> norm -> lm_head -> logits

Each block is pre-norm (RMSNorm before attention and before the MLP, the residual stream
itself never normalised), attention uses RoPE and grouped-query heads, the MLP is SwiGLU.
The same file serves two close relatives through config fields, since their weights carry
Llama's names: Mistral (`sliding_window`: each query sees only the last W positions;
arXiv:2310.06825) and Qwen2 (`attention_bias`: q/k/v projections with biases; arXiv:2407.10671).
Attribute names follow the Hugging Face checkpoint keys without the `model.` prefix
(`layers.0.self_attn.q_proj.weight`, ...), so loading is a checked copy by name.

`hook_*` attributes are identity `HookPoint`s where `lucidlm.introspect` reads or edits
activations; they carry TransformerLens names (`blocks.{i}.attn.hook_z`, ...) and shapes
listed in `lucidlm.introspect.hook_point.HOOK_SITES`. Idle, they cost nothing, and the
fused attention kernel runs unless someone listens to a layer's `hook_pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..cache import KVCache
from ..introspect.hook_point import HookPoint
from .config_checks import check_counts, check_decoder_config, check_positive
from .layers import (Embedding, FrequencyRotaryEmbedding, RMSNorm, RotaryEmbedding, SwiGLU, llama3_scaled_inv_freq,
                     pass_positions, project_qkv, rope_inv_freq, scaled_dot_product_attention,
                     window_of_keys)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int  # residual stream width ("hidden_size")
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads; n_heads / n_kv_heads query heads share each (GQA)
    d_ff: int  # SwiGLU hidden width ("intermediate_size")
    context_length: int
    rope_base: float = 10000.0
    # Llama 3.1 frequency scaling: (factor, low_freq_factor, high_freq_factor, original context)
    rope_scaling: tuple[float, float, float, int] | None = None
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2), never on o_proj
    sliding_window: int | None = None  # keys more than this many positions back are not attended to (Mistral)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int | None = None  # defaults to d_model / n_heads
    architecture: str = "llama"

    def __post_init__(self):
        check_decoder_config(self)
        check_counts(self, "sliding_window", optional=True)
        if self.rope_scaling is not None:
            factor, low, high, original = self.rope_scaling
            check_positive(factor=factor, low_freq_factor=low, high_freq_factor=high)
            check_counts(self, original_context_length=original)
            if low >= high:  # the band blended between them would divide by high - low <= 0
                raise ValueError(f"RoPE low_freq_factor {low} is not below high_freq_factor {high}")

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 bytes the KV cache grows by per token: K and V for every layer and KV head."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # Packed models: q, k, v stacked into one layer, rows [q | k | v] (`models.fusion.fuse_projections`;
        # q_proj, k_proj, v_proj then view its rows). None: the three layers compute.
        self.qkv_proj: nn.Module | None = None
        self.window = cfg.sliding_window  # keys at most this many slots back (Mistral), or None
        self.explicit = False  # True: materialise attention weights (see scaled_dot_product_attention)
        self.prefill_dtype: torch.dtype | None = None  # set for packed models (see loading.load)
        self.decode_kernel = False  # decode steps through cpu_decode's attention (packed models, see loading.load)
        name = f"blocks.{layer_index}.attn."
        self.hook_q, self.hook_k, self.hook_v = (HookPoint(name + s) for s in ("hook_q", "hook_k", "hook_v"))
        self.hook_rot_q, self.hook_rot_k = HookPoint(name + "hook_rot_q"), HookPoint(name + "hook_rot_k")
        self.hook_pattern, self.hook_z = HookPoint(name + "hook_pattern"), HookPoint(name + "hook_z")

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"

    def forward(self, x, rope: RotaryEmbedding, positions, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x)  # (B, T, H*D), (B, T, H_kv*D), (B, T, H_kv*D)
        q = self.hook_q(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2))  # (B, H, T, D)
        k = self.hook_k(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2))  # (B, H_kv, T, D)
        v = self.hook_v(v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2))
        q, k = self.hook_rot_q(rope(q, positions)), self.hook_rot_k(rope(k, positions))
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, H_kv, S, D)
        # The weights exist only on the explicit path: take it when asked to, or when a
        # listener wants to see (or edit) this layer's pattern (over every key slot).
        explicit = self.explicit or self.hook_pattern.active
        if not explicit:
            k, v, mask = window_of_keys(k, v, mask, self.window, cache)
        z, _ = scaled_dot_product_attention(q, k, v, mask, scale=self.head_dim**-0.5, explicit=explicit,
                                            weights_hook=self.hook_pattern, prefill_dtype=self.prefill_dtype,
                                            decode_kernel=self.decode_kernel)
        z = self.hook_z(z)  # (B, H, T, D)
        out = z.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_index: int):
        super().__init__()
        name = f"blocks.{layer_index}."
        self.hook_resid_pre = HookPoint(name + "hook_resid_pre")
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.hook_attn_out, self.hook_resid_mid = HookPoint(name + "hook_attn_out"), HookPoint(name + "hook_resid_mid")
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)
        self.hook_mlp_out, self.hook_resid_post = HookPoint(name + "hook_mlp_out"), HookPoint(name + "hook_resid_post")

    def forward(self, x, rope, positions, mask, cache):
        x = self.hook_resid_pre(x)  # (B, T, C)
        attn_out = self.hook_attn_out(self.self_attn(self.input_layernorm(x), rope, positions, mask, cache))
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x)))
        return self.hook_resid_post(x + mlp_out)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
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
        if cfg.rope_scaling is None:
            self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_base, cfg.context_length)
        else:
            inv_freq = llama3_scaled_inv_freq(rope_inv_freq(cfg.head_dim, cfg.rope_base), *cfg.rope_scaling)
            self.rope = FrequencyRotaryEmbedding(inv_freq, cfg.context_length)

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
        """tokens (B, T) -> logits (B, T, V).

        valid (B, T) bool marks real tokens (False for left padding); with a cache the new
        tokens are appended after the `cache.length` positions already stored.
        last_only: return logits for the last position only, (B, 1, V): all that generation
        needs, and the LM head is the largest matmul of a prefill (T x C x V).
        """
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
