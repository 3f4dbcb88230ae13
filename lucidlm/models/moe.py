"""Sparse mixture of experts: a router sends each token to k of E expert MLPs.

    logits  = gate(x)                       (N, E)   one score per expert, N = B·T tokens
    probs   = softmax(logits)               (N, E)
    w, idx  = top-k of probs, renormalised  (N, k)   the k chosen experts and their weights (sum 1)
    out     = Σ_j w_j · expert_{idx_j}(x)   (N, C)

Every token still meets the full attention of every layer, but only k of the E MLPs: a
model can hold E MLPs' worth of parameters while each token costs about k MLPs' worth of
compute (Shazeer et al. 2017, arXiv:1701.06538; Mixtral, Jiang et al. 2024, arXiv:2401.04088,
E = 8, k = 2).

For introspection, after every forward pass the module keeps what its router decided:

    last_router_logits    (B, T, E) float32  gate scores before the softmax
    last_expert_indices   (B, T, k) int64    the chosen experts, most probable first
    last_expert_weights   (B, T, k) float32  their renormalised weights

(during cached decoding: for the new positions only). They are plain attributes, replaced
on the next pass, never part of the state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from ..introspect.hook_point import HookPoint


def route_top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) router probabilities (softmax over all E experts) -> (weights (N, k), expert indices (N, k)).

    The k largest probabilities are rescaled to sum to 1. (Renormalising top-k
    probabilities equals a softmax over the k chosen logits.)
    """
    top_probs, indices = probs.topk(k, dim=-1)  # (N, k), sorted by probability
    return top_probs / top_probs.sum(dim=-1, keepdim=True), indices


class SparseMoE(nn.Module):
    """A router `gate` (C -> E, no bias) and E `experts` (any modules (n, C) -> (n, C)), top-k routing."""

    def __init__(self, d_model: int, experts: list[nn.Module], top_k: int, hook_prefix: str = ""):
        super().__init__()
        self.top_k = top_k
        # Hook points (see lucidlm.introspect): the router's distribution can be read or edited
        # (e.g. force an expert); the chosen indices are reported for reading.
        self.hook_router_probs = HookPoint(hook_prefix + "moe.hook_router_probs")
        self.hook_expert_indices = HookPoint(hook_prefix + "moe.hook_expert_indices")
        self.gate = nn.Linear(d_model, len(experts), bias=False)
        self.experts = nn.ModuleList(experts)
        self.last_router_logits: torch.Tensor | None = None
        self.last_expert_indices: torch.Tensor | None = None
        self.last_expert_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        router_logits = self.gate(flat)  # (N, E)
        E = len(self.experts)
        probs = self.hook_router_probs(torch.softmax(router_logits.float(), dim=-1).view(B, T, E)).view(B * T, E)
        weights, chosen = route_top_k(probs, self.top_k)  # (N, k) each
        self.hook_expert_indices(chosen.view(B, T, self.top_k))
        out = torch.zeros_like(flat)
        # Each expert runs once, on the tokens that chose it (in any of their k slots).
        for e in chosen.unique().tolist():
            token, slot = (chosen == e).nonzero(as_tuple=True)  # (n,) each
            contribution = self.experts[e](flat[token]) * weights[token, slot, None].to(flat.dtype)  # (n, C)
            out.index_add_(0, token, contribution)
        self.last_router_logits = router_logits.float().view(B, T, E)
        self.last_expert_indices = chosen.view(B, T, self.top_k)
        self.last_expert_weights = weights.view(B, T, self.top_k)
        return out.view(B, T, C)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k} of {len(self.experts)} experts"
