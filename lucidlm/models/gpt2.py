"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"), top to bottom.

    tokens -> wte(tokens) + wpe(positions) -> N x [ x + attn(ln_1(x)) ; x + mlp(ln_2(x)) ] -> ln_f -> lm_head

What differs from Llama (see `llama.py`):
- positions are a learned table `wpe` (one C-vector per position, at most `context_length`)
  added to the token embedding, instead of RoPE rotating queries and keys;
- LayerNorm (mean and variance, with a bias) instead of RMSNorm, and biases on every linear layer;
- plain multi-head attention (as many key/value heads as query heads) through one fused
  projection `c_attn` producing q, k and v side by side;
- the MLP is c_proj(gelu(c_fc(x))), GELU in its tanh approximation ("gelu_new");
- the LM head is the token embedding itself (tied weights).

Attribute names are the checkpoint's without the `transformer.` prefix (`h.0.attn.c_attn.weight`).
The checkpoint stores its linear layers as `Conv1D`, weight (in, out); ours are nn.Linear,
weight (out, in): the loader transposes them once (`loading/hf_names.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..introspect.hook_point import HookPoint
from .layers import Embedding, LayerNorm, pass_positions, scaled_dot_product_attention
from .config_checks import check_counts, check_head_split, check_positive

# config.json's "activation_function" -> the function; "gelu_new" is the tanh approximation
# GPT-2 was trained with: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    d_model: int  # "n_embd"
    n_layers: int  # "n_layer"
    n_heads: int  # "n_head"
    d_ff: int  # "n_inner", default 4 * d_model
    context_length: int  # "n_positions": rows of the position table
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    tie_embeddings: bool = True
    architecture: str = "gpt2"

    def __post_init__(self):
        check_counts(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "context_length")
        check_head_split(self)
        check_positive(self, "norm_eps")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{self.activation}' (known: {', '.join(ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads  # multi-head attention: one key/value head per query head

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 bytes the KV cache grows by per token: K and V for every layer and head."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v side by side
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.explicit = False  # True: materialise attention weights (see scaled_dot_product_attention)
        name = f"blocks.{layer_index}.attn."
        self.hook_q, self.hook_k, self.hook_v = (HookPoint(name + s) for s in ("hook_q", "hook_k", "hook_v"))
        self.hook_pattern, self.hook_z = HookPoint(name + "hook_pattern"), HookPoint(name + "hook_z")

    def forward(self, x, mask, cache: KVCache | None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)  # 3 x (B, T, C)
        q = self.hook_q(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2))  # (B, H, T, D)
        k = self.hook_k(k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2))
        v = self.hook_v(v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2))
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, H, S, D)
        z, _ = scaled_dot_product_attention(q, k, v, mask, scale=self.head_dim**-0.5,
                                            explicit=self.explicit or self.hook_pattern.active,
                                            weights_hook=self.hook_pattern)
        z = self.hook_z(z)  # (B, H, T, D)
        return self.c_proj(z.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_index: int):
        super().__init__()
        name = f"blocks.{layer_index}."
        self.hook_resid_pre = HookPoint(name + "hook_resid_pre")
        self.ln_1 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_index)
        self.hook_attn_out, self.hook_resid_mid = HookPoint(name + "hook_attn_out"), HookPoint(name + "hook_resid_mid")
        self.ln_2 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.hook_mlp_out, self.hook_resid_post = HookPoint(name + "hook_mlp_out"), HookPoint(name + "hook_resid_post")

    def forward(self, x, mask, cache):
        x = self.hook_resid_pre(x)  # (B, T, C)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln_1(x), mask, cache)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln_2(x))))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.d_model)  # token embeddings
        self.wpe = Embedding(cfg.context_length, cfg.d_model)  # position embeddings
        self.hook_embed, self.hook_pos_embed = HookPoint("hook_embed"), HookPoint("hook_pos_embed")
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.hook_final_norm = HookPoint("hook_final_norm")
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    # The names the engine's family-independent code uses (logit lens, contrastive search,
    # embedding analysis) for the final norm and the token embedding; properties, so the
    # state dict keeps the checkpoint's names only.
    @property
    def norm(self) -> LayerNorm:
        return self.ln_f

    @property
    def embed_tokens(self) -> Embedding:
        return self.wte

    def new_cache(self, batch: int, max_positions: int | None = None) -> KVCache:
        cfg = self.config
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_positions or cfg.context_length, cfg.head_dim,
                       dtype=self.wte.weight.dtype, device=self.wte.weight.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                valid: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); `valid` and `cache` as in `Llama.forward`."""
        T = tokens.shape[1]
        where = pass_positions(tokens, valid, cache)  # token positions and key validity of this pass
        positions = where.positions  # (B, T)
        mask = where.mask()  # (B, 1, T, S) or None

        x = self.hook_embed(self.wte(tokens)) + self.hook_pos_embed(self.wpe(positions))  # (B, T, C)
        for block in self.h:
            x = block(x, mask, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:  # generation needs only the next token's logits: skip the LM head elsewhere
            x = x[:, -1:]
        return self.lm_head(self.hook_final_norm(self.ln_f(x))).float()  # (B, T, V)
