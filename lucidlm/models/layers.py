"""Primitives shared by the model families: norms, rotary embeddings, masks, attention.

Dimension letters used in shape comments throughout LucidLM:

    B  batch            T  new positions in this pass      S  all key positions (past + new)
    H  query heads      H_kv  key/value heads              D  head_dim
    C  d_model (residual width)     F  feed-forward width  V  vocabulary size
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import chunked_attention
from ..kernels import cpu_decode


def model_device(model: nn.Module) -> torch.device:
    """The device a model's weights are on (its first parameter's; norms are always parameters)."""
    return next(model.parameters()).device


def takes_cpu_kernel(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` computes on x with one of `cpu_decode`'s layer kernels (one call for a norm,
    a rotation or an activation): the packed loader set its `cpu_kernel` (AVX-512 VNNI, kernels
    built), x is float32 (their only type), and the code runs eagerly (traced by torch.compile, the
    tensor operations stay, for Inductor to fuse)."""
    return module.cpu_kernel and x.dtype == torch.float32 and not torch.compiler.is_compiling()


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight  (Zhang & Sennrich 2019, arXiv:1910.07467).

    Computed in float32 whatever the activation dtype, because the mean of squares of
    a wide vector loses precision in half types.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.cpu_kernel = False  # packed models where cpu_decode's kernels run (see loading.load)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_cpu_kernel(self, x):
            return cpu_decode.rms_norm(x, self.weight, self.eps)  # the lines below in one call
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class Embedding(nn.Module):
    """Token id -> row of a (V, C) table. Like nn.Embedding, but with no random
    initialisation: weights always come from a checkpoint, and skipping the init keeps
    model construction on the `meta` device instant."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, arXiv:2104.09864), "rotate half" layout.

    Dimension pair (i, i + D/2) of every query and key head is rotated by the angle
    position * base^(-2i/D). Rotating both q and k makes their dot product depend only
    on the distance between positions. The angles are computed (in float64, then rounded to
    float32) for the positions of each forward pass, once for all its layers: no table of
    every position is kept (Gemma 3's would take 128 MiB for its 32k context).
    """

    def __init__(self, head_dim: int, base: float, max_positions: int):
        super().__init__()
        self.head_dim, self.base, self.max_positions = head_dim, base, max_positions
        self._last_positions: torch.Tensor | None = None
        self._last_angles: tuple[torch.Tensor, torch.Tensor] | None = None
        self._device_frequencies: torch.Tensor | None = None
        self.cpu_kernel = False  # packed models where cpu_decode's kernels run (see loading.load)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}, max_positions={self.max_positions}"

    def inverse_frequencies(self) -> torch.Tensor:
        """(D/2,) float64: the angle per position of each dimension pair."""
        return rope_inv_freq(self.head_dim, self.base)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every position, each (S_max, D) float32 (for tests and plots)."""
        return self._cos_sin(torch.arange(self.max_positions, device=device))

    def _frequencies_on(self, device: torch.device) -> torch.Tensor:
        """`inverse_frequencies()` on `device`, copied there once: a CUDA graph cannot record a
        copy from host memory, and a copy per forward pass would be wasted work anyway."""
        if self._device_frequencies is None or self._device_frequencies.device != device:
            self._device_frequencies = self.inverse_frequencies().to(device)
        return self._device_frequencies

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float64)[..., None] * self._frequencies_on(positions.device)  # (..., D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (..., D): the same angle for i and i + D/2
        return angles.cos().float(), angles.sin().float()

    def angles_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and *signed* sin at `positions` (B, T), each (B, 1, T, D) in `dtype` (rounded from float32).

        Signed: the first half of sin negated, so that the rotation is
        x * cos + swap_halves(x) * signed_sin, i.e. the pair (a, b) becomes
        (a cos - b sin, b cos + a sin). Every layer of a forward pass passes the same
        positions tensor, so the last result is kept and reused.
        """
        if torch.compiler.is_compiling():  # a compiled graph computes it once anyway; the memo would
            return self._angles(positions, dtype)  # only add guards on the previous call's positions
        if positions is not self._last_positions or self._last_angles[0].dtype != dtype:
            self._last_angles = self._angles(positions, dtype)
            self._last_positions = positions
        return self._last_angles

    def _angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin(positions)  # (B, T, D)
        half = self.head_dim // 2
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos.unsqueeze(1).to(dtype), signed_sin.unsqueeze(1).to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); positions: (B, T) absolute positions -> rotated x, same shape."""
        cos, signed_sin = self.angles_at(positions, x.dtype)  # (B, 1, T, D)
        if takes_cpu_kernel(self, x):
            return cpu_decode.rotary(x, cos, signed_sin)  # the two lines below in one call
        swapped = torch.roll(x, shifts=x.shape[-1] // 2, dims=-1)  # (x[D/2:], x[:D/2])
        return x * cos + swapped * signed_sin


class PassPositions(NamedTuple):
    """Where the T new tokens of one forward pass sit among the S key slots: what RoPE and masks need.

    Made once per pass by `pass_positions` and shared by all layers.
    """
    positions: torch.Tensor  # (B, T) absolute positions: how many real tokens precede each new one
    keys_valid: torch.Tensor  # (B, S) bool: which key slots hold real tokens (not padding, already written)
    query_slots: torch.Tensor  # (T,) the key slot each new token is stored in
    fixed_shape: bool  # S is a static cache's whole capacity (`KVCache.make_static`), not the slots in use

    def mask(self, window: int | None = None) -> torch.Tensor | None:
        """(B, 1, T, S) bool attention mask (True = attend), or None when nothing needs masking."""
        return attention_mask(self.keys_valid, self.query_slots, window, may_skip=not self.fixed_shape)


def pass_positions(tokens: torch.Tensor, valid: torch.Tensor | None, cache) -> PassPositions:
    """The positions of a forward pass over tokens (B, T), left padding marked False in valid (B, T).

    With a KV cache the new tokens go after the positions it already holds (`KVCache.begin`
    records their validity and says in which slots they go); without one, slots are 0..T-1.
    """
    B, T = tokens.shape
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
    if cache is None:
        keys_valid, query_slots, fixed_shape = valid, torch.arange(T, device=tokens.device), False
    else:
        keys_valid, query_slots = cache.begin(valid)
        fixed_shape = cache.static
    return PassPositions(token_positions(keys_valid, query_slots), keys_valid, query_slots, fixed_shape)


def token_positions(valid: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Absolute positions of the tokens in `query_slots` (T,): how many real tokens precede each one.

    valid: (B, S) bool over all key slots, False for left padding. Padding slots get
    position 0 (their outputs are never used). Returns (B, T).
    """
    counts = valid.long().cumsum(dim=1) - 1  # (B, S)
    return counts[:, query_slots].clamp(min=0)


def attention_mask(valid: torch.Tensor, query_slots: torch.Tensor, window: int | None = None,
                   may_skip: bool = True) -> torch.Tensor | None:
    """Which keys each new query may attend to, as a (B, 1, T, S) bool mask (True = attend).

    valid: (B, S) bool, the key slots holding real tokens; query_slots: (T,) the slot of each
    new query. A query in slot q sees keys in slots <= q (causal), that are real tokens (not
    padding) and, with a sliding window, fewer than `window` positions back. Padding
    queries are allowed to see themselves so no softmax row is empty (an empty row would
    produce NaN). With `may_skip`, returns None when nothing needs masking (one new token,
    no padding, no window): the fused kernel then runs unmasked. Deciding that reads a tensor
    value on the host, which neither a compiled graph nor a CUDA graph can do: both pass
    through here with a mask.
    """
    S, T = valid.shape[1], query_slots.shape[0]
    if may_skip and T == 1 and window is None and not torch.compiler.is_compiling() and bool(valid.all()):
        return None
    query_index = query_slots[:, None]  # (T, 1)
    key_index = torch.arange(S, device=valid.device)[None, :]  # (1, S)
    allowed = key_index <= query_index  # (T, S)
    if window is not None:
        allowed = allowed & (key_index > query_index - window)
    allowed = allowed[None] & valid[:, None, :]  # (B, T, S)
    allowed = allowed | (key_index == query_index)[None]
    return allowed[:, None]  # (B, 1, T, S)


def window_of_keys(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, window: int | None,
                   cache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A decode step's keys, values and mask cut to the last `window` slots, where a sliding window
    hides every earlier one: the new query sits in the last slot and sees keys in slots > its own
    minus `window` (`attention_mask`), so the rest need not be read at all. (Gemma 3's local layers
    at 1,500 positions would otherwise read 3x the keys they use.) Anything else is returned as it
    is: no window, a pass of several queries, a static cache (whose query slot is not the last).
    k, v: (B, H_kv, S, D); mask (B, 1, 1, S) bool.

    The first kept slot is max(S - window, 0), written with `torch.sym_max` so that a compiled
    graph, whose S is a symbol, holds one formula for both sides of S = window instead of a guard
    (and a recompilation mid-generation when the cache outgrows the window).
    """
    if window is None or cache is None or mask is None or mask.shape[2] != 1 or cache.static:
        return k, v, mask
    S = k.shape[2]
    if not torch.compiler.is_compiling() and S <= window:
        return k, v, mask  # (eager: nothing to cut, and three views fewer)
    first = torch.sym_max(S - window, 0)
    return k.narrow(2, first, S - first), v.narrow(2, first, S - first), mask.narrow(-1, first, S - first)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                                 scale: float, explicit: bool = False,
                                 weights_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                 prefill_dtype: torch.dtype | None = None, decode_kernel: bool = False):
    """softmax(q kᵀ · scale + mask) v, with grouped-query attention.

    q: (B, H, T, D); k, v: (B, H_kv, S, D) where H is a multiple of H_kv (each key/value head
    is shared by H / H_kv query heads); mask: (B, 1, T, S) bool or None.
    Returns (out (B, H, T, D), weights (B, H, T, S) or None).

    The default path is PyTorch's fused kernel, which never materialises the (T, S)
    weights. `explicit=True` computes them step by step so they can be looked at (and
    passed through `weights_hook`, which may replace them); both paths compute the same
    function. A model that sets `prefill_dtype` (packed models on CPUs with AVX-512 BF16) runs
    long prompts through `chunked_attention` in that dtype instead: faster there, and rounded.
    A model that sets `decode_kernel` (packed models on CPUs with AVX-512 VNNI) runs decode steps
    through `cpu_decode.decode_attention` (one query: the same float32 function without the fused
    kernel's set-up cost). Those models keep k and v as float16 (their `kv_dtype`), which the kernel
    reads as it is; the other paths widen them to q's dtype first.
    """
    if not explicit and chunked_attention.applies(q, mask, prefill_dtype):
        return chunked_attention.chunked_attention(q, k, v, mask, scale, prefill_dtype), None
    if not explicit and decode_kernel and cpu_decode.attention_applies(q, k, v, mask):
        return cpu_decode.decode_attention(q, k, v, mask, scale), None
    if k.dtype != q.dtype:  # a float16 cache under float32 queries (packed models): the paths below take one dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    if not explicit:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out, None
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if weights_hook is not None:
        weights = weights_hook(weights)
    return weights @ v, weights


# Packed models (`models.fusion.fuse_projections`) stack the projections that read the same
# input into one layer: q, k, v into `qkv_proj` (rows [q | k | v]), gate and up into
# `gate_up_proj` (rows [gate | up]). A batch-1 decode step is many small matmuls, each paying
# for a kernel call and for converting its input and output to and from bfloat16; one call in
# place of three (and of two) does the same arithmetic, bit for bit, in less time (SmolLM2
# decode: 1.2x with 2 threads, 1.04x with 1). The old names stay, as views of the fused rows
# (`fusion.RowSlice`). Other models leave the fused attributes None: the separate layers compute.

def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, C) -> q (B, T, H*D), k (B, T, H_kv*D), v (B, T, H_kv*D), through `attn.qkv_proj` when set."""
    fused = attn.qkv_proj
    if fused is None:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    return fused(x).split(fused.part_sizes, dim=-1)  # one (B, T, (H + 2 H_kv) D) matmul, then views


def project_gate_up(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, C) -> gate (B, T, F), up (B, T, F), through `mlp.gate_up_proj` when set."""
    fused = mlp.gate_up_proj
    if fused is None:
        return mlp.gate_proj(x), mlp.up_proj(x)
    return fused(x).split(fused.part_sizes, dim=-1)


class SwiGLU(nn.Module):
    """Gated feed-forward: down(silu(gate(x)) * up(x))  (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # packed models: gate and up stacked (see project_gate_up)
        self.cpu_kernel = False  # packed models where cpu_decode's kernels run (see loading.load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None and takes_cpu_kernel(self, x):  # the split, silu and product in one call
            return self.down_proj(cpu_decode.gated_activation(self.gate_up_proj(x), "silu"))
        gate, up = project_gate_up(self, x)  # (B, T, F) each
        return self.down_proj(F.silu(gate) * up)


class LayerNorm(nn.Module):
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias  (Ba et al. 2016, arXiv:1607.06450).

    Like nn.LayerNorm but with no initialisation (weights always come from a checkpoint) and
    computed in float32 whatever the activation dtype, as `RMSNorm`.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), self.bias.float(), self.eps)
        return normed.to(x.dtype)


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """The RoPE frequencies base^(-2i/D) for i < D/2, (D/2,) float64: the angle per position of pair i.

    Always on the CPU, also when called while a model is being built on the `meta` device.
    """
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                           original_context_length: int) -> torch.Tensor:
    """Llama 3.1's RoPE frequency scaling ("rope_type": "llama3"), for contexts beyond training length.

    Each frequency pair has a wavelength 2π / inv_freq (in positions). Pairs whose wavelength
    is short compared with the original context (shorter than original / high_freq_factor) keep
    their frequency: they encode local order, which does not change with context length. Pairs
    whose wavelength is longer than original / low_freq_factor are slowed down by `factor`, so
    that positions beyond the original context map onto angles seen in training (position
    interpolation). In between, the frequency is blended linearly in (original / wavelength).
    See Meta's llama-models repository, `apply_scaling`, and the Llama 3 paper, arXiv:2407.21783.

    inv_freq: (D/2,) unscaled frequencies (`rope_inv_freq`) -> (D/2,) scaled, same dtype.
    """
    wavelength = 2 * torch.pi / inv_freq
    short = wavelength < original_context_length / high_freq_factor  # keep
    long = wavelength > original_context_length / low_freq_factor  # divide by factor
    # 0 at the long end of the band, 1 at the short end.
    smooth = (original_context_length / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(short, inv_freq, torch.where(long, inv_freq / factor, blended))


class FrequencyRotaryEmbedding(RotaryEmbedding):
    """`RotaryEmbedding` with given frequencies (D/2,) (a CPU tensor, e.g. from
    `llama3_scaled_inv_freq`) instead of base^(-2i/D). Same layout, same forward."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int):
        super().__init__(2 * inv_freq.numel(), base=float("nan"), max_positions=max_positions)
        self.inv_freq = inv_freq.to(torch.float64)  # a plain attribute: no parameter, not in the state dict

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, scaled frequencies, max_positions={self.max_positions}"

    def inverse_frequencies(self) -> torch.Tensor:
        return self.inv_freq
