"""A tiny random Llama in Hugging Face transformers and the same weights in LucidLM's `Llama`.

Our attribute names are HF's without the `model.` prefix, so the weights copy over by name.
The HF side uses eager attention, the only implementation that returns attention weights.
"""

from __future__ import annotations

import math

import torch

from lucidlm.models.llama import Llama, LlamaConfig

TINY = dict(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128, context_length=64,
            rope_base=10000.0, norm_eps=1e-6)


def tiny_llama_pair(seed: int = 0):
    """(HF LlamaForCausalLM, our Llama) with equal random weights, both in eval mode."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    s = TINY
    hf_config = HFLlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                              num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                              num_key_value_heads=s["n_kv_heads"], max_position_embeddings=s["context_length"],
                              rms_norm_eps=s["norm_eps"], tie_word_embeddings=False,
                              rope_parameters={"rope_type": "default", "rope_theta": s["rope_base"]},
                              attn_implementation="eager")
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # weights big enough that attention patterns are far from uniform
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(2 * torch.randn_like(p) / math.sqrt(p.shape[1]))
    ours = Llama(LlamaConfig(tie_embeddings=False, **s)).eval()
    state = {name.removeprefix("model."): p.detach().clone() for name, p in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return hf, ours


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """HF's logits at every position of `ids`, (T, V), on the CPU: the reference for each decode step."""
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def decode_logits(model, prompt: list[int], continuation: list[int], device: str = "cpu") -> torch.Tensor:
    """Our logits after the prompt and after each token of `continuation`, fed one at a time,
    (len + 1, V) on the CPU."""
    with torch.inference_mode():
        cache = model.new_cache(1, len(prompt) + len(continuation) + 1)
        out = [model(torch.tensor([prompt], device=device), cache, last_only=True)[0, -1]]
        for token in continuation:
            out.append(model(torch.tensor([[token]], device=device), cache)[0, -1])
    return torch.stack(out).cpu()
