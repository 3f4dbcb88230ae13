"""How a Gemma 3 GGUF file maps onto `models.gemma3.Gemma3`.

llama.cpp's converter stores every Gemma RMSNorm weight as (1 + w), because its norm kernel
multiplies by the weight directly; our GemmaRMSNorm multiplies by (1 + w) like the original
checkpoint, so we subtract 1 again here. Gemma's RoPE rotates (x_i, x_{i+D/2}) pairs in
both implementations, so q/k rows are not permuted (unlike Llama files).
"""

from __future__ import annotations

import torch

from ..models.gemma3 import Gemma3Config
from .gguf_llama import metadata_reader, optional_int


def gemma3_config(meta: dict, arch: str = "gemma3") -> Gemma3Config:
    key = metadata_reader(meta, arch)
    n_heads = int(key("attention.head_count"))
    head_dim = optional_int(key("attention.key_length", None))  # None: the config derives d_model / n_heads
    return Gemma3Config(
        vocab_size=len(meta.get("tokenizer.ggml.tokens", [])) or int(key("vocab_size")),
        d_model=int(key("embedding_length")),
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(key("feed_forward_length")),
        context_length=int(key("context_length")),
        sliding_window=int(key("attention.sliding_window")),
        rope_base=float(key("rope.freq_base", 1_000_000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        query_pre_attn_scalar=None,  # = head_dim (Gemma3Config's default), derived or read
    )


GEMMA3_TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_feedforward_layernorm.weight",
}


def gemma3_fix_up(name: str, tensor: torch.Tensor, cfg: Gemma3Config) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return tensor - 1.0
    return tensor
