"""BERT encoder (Devlin et al. 2018, arXiv:1810.04805), as used by sentence encoders like all-MiniLM-L6-v2.

    tokens -> word + position + token-type embeddings -> LayerNorm
           -> N x [ x = LN(x + attn(x)) ; x = LN(x + mlp(x)) ] -> hidden states (B, T, C)

Unlike the decoders in this package, attention is bidirectional (every token sees every
other real token; only padding is masked), positions are learned embeddings, and the
blocks are post-norm: LayerNorm is applied *after* each residual add. There is no LM head:
a sentence embedding is the mean of the final hidden states over real tokens, L2-normalised
(Sentence-BERT, arXiv:1908.10084).

Attribute names equal the Hugging Face checkpoint keys (`encoder.layer.0.attention.self.query`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..introspect.hook_point import HookPoint
from .layers import Embedding, scaled_dot_product_attention
from .config_checks import check_counts, check_head_split, check_positive


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    context_length: int  # max_position_embeddings
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    tie_embeddings: bool = False  # an encoder has no LM head to tie
    architecture: str = "bert"

    def __post_init__(self):
        check_counts(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "context_length", "type_vocab_size")
        check_head_split(self)
        check_positive(self, "norm_eps")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embeddings = Embedding(cfg.context_length, cfg.d_model)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.d_model)
        self.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, tokens, token_types):
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, T)
        x = self.word_embeddings(tokens) + self.position_embeddings(positions) + self.token_type_embeddings(token_types)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.query = nn.Linear(cfg.d_model, cfg.d_model)
        self.key = nn.Linear(cfg.d_model, cfg.d_model)
        self.value = nn.Linear(cfg.d_model, cfg.d_model)
        self.explicit = False

    def forward(self, x, mask, hook_pattern):
        B, T, C = x.shape

        def heads(t):  # (B, T, C) -> (B, H, T, D)
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        z, _ = scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), mask,
                                            scale=self.head_dim**-0.5,
                                            explicit=self.explicit or hook_pattern.active, weights_hook=hook_pattern)
        return z.transpose(1, 2).reshape(B, T, C)


class DenseLayerNorm(nn.Module):
    """LayerNorm(residual + dense(x)): the post-norm residual step (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dense(x))


class AttentionBlock(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        setattr(self, "self", SelfAttention(cfg))  # the checkpoint's key is literally "attention.self"
        self.output = DenseLayerNorm(cfg.d_model, cfg.d_model, cfg.norm_eps)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_ff)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig, layer_index: int):
        super().__init__()
        self.attention = AttentionBlock(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseLayerNorm(cfg.d_ff, cfg.d_model, cfg.norm_eps)
        name = f"blocks.{layer_index}."
        self.hook_resid_pre, self.hook_resid_mid = HookPoint(name + "hook_resid_pre"), HookPoint(name + "hook_resid_mid")
        self.hook_pattern = HookPoint(name + "attn.hook_pattern")
        self.hook_resid_post = HookPoint(name + "hook_resid_post")

    def forward(self, x, mask):
        x = self.hook_resid_pre(x)  # (B, T, C)
        attn = getattr(self.attention, "self")(x, mask, self.hook_pattern)
        x = self.hook_resid_mid(self.attention.output(attn, residual=x))
        return self.hook_resid_post(self.output(self.intermediate(x), residual=x))


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.n_layers))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.hook_embed = HookPoint("hook_embed")
        self.encoder = Encoder(cfg)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> final hidden states (B, T, C). valid (B, T) bool masks padding."""
        B, T = tokens.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        if token_types is None:
            token_types = torch.zeros_like(tokens)
        mask = valid[:, None, None, :]  # (B, 1, 1, T): every query sees every real key
        x = self.hook_embed(self.embeddings(tokens, token_types))
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def mean_pool(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, C) over real tokens, L2-normalised -> (B, C)."""
    weights = valid.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)
