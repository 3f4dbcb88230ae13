"""The logit lens: read the residual stream after every layer as if it were the last one.

Applying the final norm and the LM head to `blocks.{i}.hook_resid_post` shows which tokens
the model "has in mind" after i+1 layers (nostalgebraist, "interpreting GPT: the logit lens",
2020, https://www.lesswrong.com/posts/AcKRB8wDpdaN6v6ru). After the last layer the reading
is exactly the model's own logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .capture import run_with_cache


@dataclass
class LensReading:
    top_ids: torch.Tensor  # (L, T, k) the k most likely next tokens read after each layer, at each position
    top_probs: torch.Tensor  # (L, T, k) their probabilities


def lens_logits(model: nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """Residual stream (..., C) -> float32 logits (..., V) through the model's final norm and LM head."""
    return model.lm_head(model.norm(resid)).float()


@torch.inference_mode()
def logit_lens(model: nn.Module, tokens: torch.Tensor, k: int = 5) -> LensReading:
    """The top-k lens reading after every layer at every position of one sequence, tokens (1, T)."""
    _, cache = run_with_cache(model, tokens, names=lambda name: name.endswith("hook_resid_post"))
    ids, probs = [], []
    for i in range(model.config.n_layers):
        # One layer at a time: the full (L, T, V) tensor would be large for long prompts.
        layer_probs = lens_logits(model, cache[f"blocks.{i}.hook_resid_post"][0]).softmax(dim=-1)  # (T, V)
        top = layer_probs.topk(k, dim=-1)
        ids.append(top.indices)
        probs.append(top.values)
    return LensReading(torch.stack(ids), torch.stack(probs))
