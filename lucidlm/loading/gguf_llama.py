"""How a Llama-family GGUF file maps onto `models.llama.Llama`: config keys, tensor names, fix-ups.

llama.cpp's converter renames Hugging Face tensors (`model.layers.0.self_attn.q_proj.weight`
-> `blk.0.attn_q.weight`) and permutes the rows of the query and key projections so that
its RoPE kernel can rotate *adjacent* pairs (x0, x1), (x2, x3), ... of each head. Our RoPE
(like Hugging Face's) rotates the pairs (x_i, x_{i+D/2}), so we undo that permutation here,
once, at load time; after it the weights equal the original checkpoint's.
"""

from __future__ import annotations

import torch

from ..errors import ModelFileError
from ..models.llama import LlamaConfig


REQUIRED = object()  # `metadata_reader`'s default for keys that must be present


def metadata_reader(meta: dict, arch: str):
    """key(name, default=REQUIRED): the value of `{arch}.{name}`, `default` where it is absent.

    Values are returned as read: the config checks their ranges (0 heads, a NaN RoPE base)
    once, and `load_gguf` reports what it refuses as a ModelFileError naming the file."""

    def key(name, default=REQUIRED):
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is REQUIRED:
            raise ModelFileError(f"GGUF metadata lacks required key '{full}'")
        return default

    return key


def optional_int(value) -> int | None:
    return None if value is None else int(value)


def llama_config(meta: dict, arch: str = "llama") -> LlamaConfig:
    """Build the config from the `{arch}.*` metadata keys."""
    key = metadata_reader(meta, arch)
    n_heads = int(key("attention.head_count"))
    vocab_size = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab_size:
        raise ModelFileError("GGUF metadata gives no vocabulary size")
    return LlamaConfig(
        vocab_size=int(vocab_size),
        d_model=int(key("embedding_length")),
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        d_ff=int(key("feed_forward_length")),
        context_length=int(key("context_length")),
        rope_base=float(key("rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        head_dim=optional_int(key("attention.key_length", None)),  # None: the config derives d_model / n_heads
        architecture=arch,
    )


# GGUF name -> our (Hugging Face) name; "{i}" is the layer index.
LLAMA_TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}


def expand_layer_names(table: dict[str, str], n_layers: int) -> dict[str, str]:
    """A name table with "{i}" patterns -> every GGUF tensor name -> our parameter name."""
    names = {}
    for gguf_name, our_name in table.items():
        if "{i}" in gguf_name:
            for i in range(n_layers):
                names[gguf_name.format(i=i)] = our_name.format(i=i)
        else:
            names[gguf_name] = our_name
    return names


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. weight: (n_heads * D, C).

    The converter reshaped each head's D rows as (2, D/2) and transposed to (D/2, 2),
    interleaving the two halves; we reshape as (D/2, 2) and transpose back.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, in_features)
            .transpose(1, 2)
            .reshape(out_features, in_features))


def llama_fix_up(name: str, tensor: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    if name.endswith("self_attn.q_proj.weight"):
        return unpermute_rope_rows(tensor, cfg.n_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return unpermute_rope_rows(tensor, cfg.n_kv_heads)
    return tensor
