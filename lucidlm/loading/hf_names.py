"""How each Hugging Face model family maps onto a LucidLM model: config keys, tensor names, fix-ups.

Our attribute names are the checkpoint's keys without the wrapper prefix (`model.` for the
Llama-style families, `transformer.` for GPT-2; older GPT-2 checkpoints have none), so the
name table of a family is just that prefix, plus the keys that are saved but are not weights
(GPT-2's causal-mask buffers, old checkpoints' RoPE `inv_freq`) and the tensors stored in a
different layout (GPT-2's `Conv1D` weights are (in, out); our nn.Linear wants (out, in)).

A config builder reads `config.json` into the family's frozen config dataclass. Keys we do
not use are ignored; a config asking for something we do not implement (a RoPE scaling
type, partial rotary dimensions, per-layer sliding windows, biases a family never has)
raises `UnsupportedError` instead of loading a model that would compute something else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ModelFileError, UnsupportedError
from ..models.bert import Bert, BertConfig
from ..models.gpt2 import GPT2, GPT2Config
from ..models.llama import Llama, LlamaConfig
from ..models.mixtral import Mixtral, MixtralConfig
from ..models.phi3 import Phi3, Phi3Config
from ..models.qwen3 import Qwen3, Qwen3Config


@dataclass(frozen=True)
class HFFamily:
    model_class: type
    make_config: Callable[[dict], Any]  # config.json -> our config
    prefix: str = "model."  # stripped from checkpoint keys when present
    ignored: str | None = None  # regex of checkpoint keys that are saved buffers, not weights
    transposed: str | None = None  # regex of our names whose checkpoint tensor is stored (in, out)

    def our_name(self, key: str) -> str | None:
        """Checkpoint key -> our parameter name, or None for a key that is not a weight."""
        if self.ignored and re.search(self.ignored, key):
            return None
        return key.removeprefix(self.prefix)

    def is_transposed(self, our_name: str) -> bool:
        return bool(self.transposed and re.search(self.transposed, our_name))


class ConfigReader:
    """config.json values with clear errors for missing required keys."""

    def __init__(self, config: dict, family: str):
        self.config, self.family = config, family

    def __call__(self, *keys: str, default: Any = ModelFileError) -> Any:
        """The first of `keys` present (and not null); `default` if none is, else an error."""
        for key in keys:
            if self.config.get(key) is not None:
                return self.config[key]
        if default is ModelFileError:
            raise ModelFileError(f"config.json of this {self.family} model lacks '{keys[0]}'")
        return default

    def rope_base(self, default: float) -> float:
        # transformers >= 5 writes {"rope_parameters": {"rope_theta": ...}}; older files "rope_theta".
        params = self.config.get("rope_parameters") or {}
        return float(params.get("rope_theta") or self.config.get("rope_theta") or default)

    def rope_scaling(self) -> dict | None:
        """The RoPE scaling parameters, None for plain RoPE."""
        params = self.config.get("rope_scaling") or self.config.get("rope_parameters") or {}
        kind = params.get("rope_type") or params.get("type") or "default"
        return None if kind == "default" else {**params, "rope_type": kind}

    def require_plain_rope(self) -> None:
        scaling = self.rope_scaling()
        if scaling is not None:
            raise UnsupportedError(f"{self.family}: RoPE scaling '{scaling['rope_type']}' is not supported "
                                   "(supported: plain RoPE)")
        params = self.config.get("rope_parameters") or {}
        partial = params.get("partial_rotary_factor", self.config.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise UnsupportedError(f"{self.family}: partial rotary embeddings (partial_rotary_factor {partial}) "
                                   "are not supported")

    def require_false(self, *keys: str) -> None:
        for key in keys:
            if self.config.get(key):
                raise UnsupportedError(f"{self.family}: config sets '{key}', which LucidLM does not implement")

    def sliding_window(self) -> int | None:
        if "use_sliding_window" in self.config and not self.config["use_sliding_window"]:
            return None
        window = self.config.get("sliding_window")
        return int(window) if window else None

    def decoder_sizes(self) -> dict:
        """The sizes every Llama-style config.json names the same way."""
        n_heads = int(self("num_attention_heads"))
        return dict(vocab_size=int(self("vocab_size")), d_model=int(self("hidden_size")),
                    n_layers=int(self("num_hidden_layers")), n_heads=n_heads,
                    n_kv_heads=int(self("num_key_value_heads", default=n_heads)),
                    d_ff=int(self("intermediate_size")), context_length=int(self("max_position_embeddings")),
                    head_dim=self("head_dim", default=None))


def llama_config(config: dict) -> LlamaConfig:
    read = ConfigReader(config, "llama")
    scaling = read.rope_scaling()
    rope_scaling = None
    if scaling is not None and scaling["rope_type"] == "llama3":  # Llama 3.1+: see layers.llama3_scaled_inv_freq
        rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                        float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    else:
        read.require_plain_rope()
    read.require_false("attention_bias", "mlp_bias")
    return LlamaConfig(**read.decoder_sizes(), rope_base=read.rope_base(10000.0),
                       norm_eps=float(read("rms_norm_eps", default=1e-6)),
                       tie_embeddings=bool(read("tie_word_embeddings", default=False)), rope_scaling=rope_scaling)


def mistral_config(config: dict) -> LlamaConfig:
    """Mistral is Llama's weights with an optional sliding window."""
    read = ConfigReader(config, "mistral")
    read.require_plain_rope()
    return LlamaConfig(**read.decoder_sizes(), rope_base=read.rope_base(10000.0),
                       norm_eps=float(read("rms_norm_eps", default=1e-6)),
                       tie_embeddings=bool(read("tie_word_embeddings", default=False)),
                       sliding_window=read.sliding_window(), architecture="mistral")


def mixtral_config(config: dict) -> MixtralConfig:
    read = ConfigReader(config, "mixtral")
    read.require_plain_rope()
    return MixtralConfig(**read.decoder_sizes(), rope_base=read.rope_base(1e6),
                         norm_eps=float(read("rms_norm_eps", default=1e-5)),
                         tie_embeddings=bool(read("tie_word_embeddings", default=False)),
                         sliding_window=read.sliding_window(),
                         n_experts=int(read("num_local_experts", default=8)),
                         n_experts_per_token=int(read("num_experts_per_tok", default=2)))


def qwen_sizes(read: ConfigReader) -> dict:
    read.require_plain_rope()
    if read.sliding_window() is not None or "sliding_attention" in (read.config.get("layer_types") or ()):
        raise UnsupportedError(f"{read.family}: per-layer sliding-window attention (use_sliding_window) "
                               "is not supported")
    return dict(**read.decoder_sizes(), rope_base=read.rope_base(1e6),
                norm_eps=float(read("rms_norm_eps", default=1e-6)),
                tie_embeddings=bool(read("tie_word_embeddings", default=False)))


def qwen2_config(config: dict) -> LlamaConfig:
    """Qwen2 is Llama's weights plus biases on the q/k/v projections."""
    return LlamaConfig(**qwen_sizes(ConfigReader(config, "qwen2")), attention_bias=True, architecture="qwen2")


def qwen3_config(config: dict) -> Qwen3Config:
    read = ConfigReader(config, "qwen3")
    return Qwen3Config(**qwen_sizes(read), attention_bias=bool(read("attention_bias", default=False)))


def phi3_config(config: dict) -> Phi3Config:
    read = ConfigReader(config, "phi3")
    # Phi-3's long-context variants (128k) use "longrope" scaling: refused by require_plain_rope.
    read.require_plain_rope()
    return Phi3Config(**read.decoder_sizes(), rope_base=read.rope_base(10000.0),
                      norm_eps=float(read("rms_norm_eps", default=1e-5)),
                      tie_embeddings=bool(read("tie_word_embeddings", default=False)),
                      sliding_window=read.sliding_window())


def gpt2_config(config: dict) -> GPT2Config:
    read = ConfigReader(config, "gpt2")
    read.require_false("scale_attn_by_inverse_layer_idx", "add_cross_attention")
    if not read("scale_attn_weights", default=True):
        raise UnsupportedError("gpt2: unscaled attention (scale_attn_weights false) is not supported")
    d_model = int(read("n_embd", "hidden_size"))
    activation = read("activation_function", default="gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu"):
        raise UnsupportedError(f"gpt2: activation '{activation}' is not supported")
    return GPT2Config(vocab_size=int(read("vocab_size")), d_model=d_model,
                      n_layers=int(read("n_layer", "num_hidden_layers")),
                      n_heads=int(read("n_head", "num_attention_heads")),
                      d_ff=int(read("n_inner", default=4 * d_model)),
                      context_length=int(read("n_positions", "max_position_embeddings")),
                      norm_eps=float(read("layer_norm_epsilon", default=1e-5)), activation=activation,
                      tie_embeddings=bool(read("tie_word_embeddings", default=True)))


def bert_config(config: dict) -> BertConfig:
    read = ConfigReader(config, "bert")
    if read("position_embedding_type", default="absolute") != "absolute":
        raise UnsupportedError("bert: only absolute position embeddings are supported")
    if read("hidden_act", default="gelu") != "gelu":
        raise UnsupportedError(f"bert: activation '{read('hidden_act')}' is not supported (supported: gelu)")
    return BertConfig(vocab_size=int(read("vocab_size")), d_model=int(read("hidden_size")),
                      n_layers=int(read("num_hidden_layers")), n_heads=int(read("num_attention_heads")),
                      d_ff=int(read("intermediate_size")), context_length=int(read("max_position_embeddings")),
                      type_vocab_size=int(read("type_vocab_size", default=2)),
                      norm_eps=float(read("layer_norm_eps", default=1e-12)))


# config.json "model_type" -> family. Checkpoints whose config lacks model_type are matched
# through their "architectures" entry (ARCHITECTURE_ALIASES).
HF_FAMILIES = {
    "llama": HFFamily(Llama, llama_config, ignored=r"rotary_emb\.inv_freq$"),
    "mistral": HFFamily(Llama, mistral_config, ignored=r"rotary_emb\.inv_freq$"),
    "mixtral": HFFamily(Mixtral, mixtral_config, ignored=r"rotary_emb\.inv_freq$"),
    "qwen2": HFFamily(Llama, qwen2_config, ignored=r"rotary_emb\.inv_freq$"),
    "qwen3": HFFamily(Qwen3, qwen3_config),
    "phi3": HFFamily(Phi3, phi3_config),
    # The causal mask GPT-2 checkpoints may carry as `attn.bias` / `attn.masked_bias` is
    # not a weight (the attention layer's real bias is `attn.c_attn.bias`).
    "gpt2": HFFamily(GPT2, gpt2_config, prefix="transformer.", ignored=r"\.attn\.(masked_)?bias$",
                     transposed=r"\.(c_attn|c_proj|c_fc)\.weight$"),
    # Encoder checkpoints: saved position ids are a buffer; the pooler and pre-training heads
    # (`pooler.`, `cls.`) are not used for sentence embeddings.
    "bert": HFFamily(Bert, bert_config, prefix="bert.", ignored=r"(position_ids$|^(bert\.)?pooler\.|^cls\.)"),
}

ARCHITECTURE_ALIASES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GPT2LMHeadModel": "gpt2",
    "BertModel": "bert",
}
