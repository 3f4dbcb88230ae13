"""A tiny random Llama built in Hugging Face transformers (the reference), and the same
weights in LucidLM's `Llama`, for the decoding tests (search, batch, penalties): our
attribute names are HF's without the `model.` prefix.

Weights are scaled up from HF's default init (std 0.02) so that the next-token
distributions are far from uniform: searches then make real choices, not float-noise
tie-breaks. `boost` scales one token's output row so that it is often likely (a usable
EOS). The context is long enough for prompts of 60+ tokens.
"""

from __future__ import annotations

import math

import torch

from lucidlm.models.llama import Llama, LlamaConfig

SIZES = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, context_length=256,
             rope_base=10000.0, norm_eps=1e-6)


def tiny_pair(seed: int = 0, eos_id: int | None = None, boost: float = 0.0):
    """(hf_model, lucid_llama) with equal random weights; untied lm_head. The HF model has
    no EOS in its config: tests pass `eos_token_id` to `generate` explicitly."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    s = SIZES
    hf_cfg = HFLlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                           num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                           num_key_value_heads=s["n_kv_heads"], max_position_embeddings=s["context_length"],
                           rms_norm_eps=s["norm_eps"], tie_word_embeddings=False, bos_token_id=None,
                           eos_token_id=None, pad_token_id=None,
                           rope_parameters={"rope_type": "default", "rope_theta": s["rope_base"]})
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
        if eos_id is not None and boost:
            hf.lm_head.weight[eos_id] *= boost

    ours = Llama(LlamaConfig(tie_embeddings=False, **s))
    state = {name.removeprefix("model."): t.detach().clone() for name, t in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return hf, ours.eval()
