"""The LM head of a packed model: integer dot products for every token, exact ones for the best.

A decode step multiplies the final hidden state (C values) by the whole output matrix (V rows:
SmolLM2 49,152 x 576, Gemma 3 262,144 x 640), the largest matmul of the step. The int8
weight-only kernel of `Int8Linear` converts every weight to bfloat16 before multiplying and
manages ~8 G weights/s on a 2-core AVX2 CPU: SmolLM2's head takes 3.3 ms, Gemma's ~20 ms of a
~41 ms step. FBGEMM's dynamically quantized linear (`quantized::linear_dynamic`) quantizes the
activations as well, to 7 bits with one scale per call, and multiplies integers: ~2x
faster. Alone it is too coarse: the final hidden states have outlier channels (|h| up to 34
where the mean is 1.1), so one scale resolves the rest poorly and the KL divergence from the
float32 model grows 7x (bench/RESULTS.md, "LM head: int8 activations").

Only the tokens that can be chosen need precise logits, so `Int8Head` works in two stages:

    1. approximate logits of all V tokens from FBGEMM (each row first scaled to max |x| = 1,
       so the rows of a batch share the 7-bit range evenly: a linear map, undone after);
    2. the RESCORED largest of them recomputed exactly: those rows of the int8 matrix,
       decoded to float32, times the float32 hidden state, written over the approximations.

Most of the probability mass lies on the rescored tokens, which come out more exact than the
weight-only kernel's (no bfloat16 rounding of x or of the logits); the tail keeps the
approximation's errors, and its mass is not negligible: on a 1,000-token technical text Gemma 3
puts 2.7 % of it (up to 26 %) beyond its top 512. So RESCORED is 2048. Gemma 3 decoding that text,
its final hidden states through each head, KL from float32: weight-only kernel 0.00443; two
stages, best 512 exact 0.00502, best 2048 0.00448 (bench/head_ab.py --kl). Time a row on a
2-core AVX2 CPU: 20 ms weight-only, ~14-16 ms in two stages (FBGEMM ~10-12 ms of it).

Many rows (a prefill asking for every position's logits) keep `Int8Linear`'s dense float32
path. Where FBGEMM is missing (non-x86 builds of PyTorch), the head is a plain `Int8Linear`.

The price is memory: FBGEMM keeps its own copy of the int8 matrix beside `q` (which the
rescoring, the dense path and `.weight` read), and pads its rows to a multiple of 512 values:
2 bytes a weight for C = 576 or 640 (SmolLM2 +52 MiB, Gemma 3 +256 MiB). So the loader makes
the head an `Int8Head` only where the head holds more weights than all the blocks together,
which is where it is a large part of a decode step: Gemma 3 270M (168 M of 268 M weights; its
decode 1.10x faster eager, 1.14x compiled), not SmolLM2 135M (28 M of 135 M; decode unchanged
within the noise, 44.5 -> 46.0 compiled), see bench/RESULTS.md. All of this on a CPU where
PyTorch runs its AVX2 kernels: its AVX-512 build of the weight-only kernel is ~10x faster, and
beats the two stages there (Gemma 3 decode 70.9 vs 63.9 tok/s), so AVX-512 CPUs keep it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
import warnings
import weakref

import torch

from .packed import Int4Linear, Int8Linear

RESCORED = 2048  # candidates recomputed exactly per row (KL vs count: bench/head_ab.py --kl, RESULTS.md)

# FBGEMM's packed matrices, by key. They are TorchScript objects, which torch.compile cannot
# take as arguments of a traced call, so the operator below takes the key (an int) instead.
_PREPACKED: dict[int, list[torch.ScriptObject]] = {}
PREPACK_ROWS = 32768  # rows per FBGEMM matrix: prepacking one holds a few temporary copies of it
_keys = itertools.count()


@torch.library.custom_op("lucidlm::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32 through FBGEMM: x quantized to 7 bits per call (one
    scale and zero point for the whole call), integer dot products with the int8 matrix."""
    return _fbgemm(x, key)


def _fbgemm(x: torch.Tensor, key: int) -> torch.Tensor:
    # Each slice of rows quantizes x itself, to the same scale (x's own range): one matrix's logits.
    # reduce_range=True: 7-bit x, so AVX2's pairwise int16 adds cannot overflow.
    return torch.cat([torch.ops.quantized.linear_dynamic(x, part, True) for part in _PREPACKED[key]], -1)


@int8_dynamic_linear.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def _prepack(q: torch.Tensor, scale: torch.Tensor) -> int | None:
    """FBGEMM's copy of W = scale[:, None] * q, registered under a new key; None where this
    PyTorch has no FBGEMM (its x86 quantized engine)."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return None
    parts = []
    try:
        with warnings.catch_warnings():  # quantized tensors are deprecated as a user-facing type; the kernel is what we use
            warnings.simplefilter("ignore")
            for start in range(0, len(q), PREPACK_ROWS):  # in slices: loading peaks at one slice's temporaries
                rows = slice(start, start + PREPACK_ROWS)
                part = q[rows].contiguous()
                zero = torch.zeros(len(part), dtype=torch.long)
                weight = torch._make_per_channel_quantized_tensor(part, scale[rows].double(), zero, 0)
                parts.append(torch.ops.quantized.linear_prepack(weight, None))
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    key = next(_keys)
    _PREPACKED[key] = parts
    return key


class Int8Head(Int8Linear):
    """An LM head: `Int8Linear` whose few-row products run in two stages (module docstring)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__(q, scale)
        self.prepacked_key = _prepack(self.q, self.scale)
        if self.prepacked_key is not None:  # free FBGEMM's copy with the module
            weakref.finalize(self, _PREPACKED.pop, self.prepacked_key, None)

    @classmethod
    def from_linear(cls, layer: Int8Linear) -> "Int8Head":
        return cls(layer.q, layer.scale)

    def extra_repr(self) -> str:
        how = f"integer dot products, top {RESCORED} recomputed" if self.prepacked_key is not None else "weight-only kernel"
        return f"{super().extra_repr()}, {how}"

    def kernel_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) float32: approximate logits, the RESCORED largest per row exact."""
        if self.prepacked_key is None:
            return super().kernel_matmul(x)
        x = x.float()
        peak = x.abs().amax(-1, keepdim=True).clamp(min=1e-30)  # (M, 1)
        # Eager calls FBGEMM itself: the custom op's first eager call imports torch.compile's
        # machinery (sympy and ~800 modules, +73 MiB resident), which only compiling needs.
        if torch.compiler.is_compiling():
            logits = int8_dynamic_linear(x / peak, self.prepacked_key, self.out_features)
        else:
            logits = _fbgemm(x / peak, self.prepacked_key)
        logits = logits * peak  # (M, N)
        best = logits.topk(min(RESCORED, self.out_features), dim=-1).indices  # (M, R)
        rows = self.q[best].float()  # (M, R, K)
        exact = torch.matmul(rows, x.unsqueeze(-1)).squeeze(-1) * self.scale[best].float()  # (M, R)
        return logits.scatter_(-1, best, exact)


# PyTorch CPU builds whose int8 weight-only kernel is already faster than the two stages: its
# AVX-512 build reads SmolLM2's head (28 M weights) in 0.37 ms, ~10x its AVX2 build, and Gemma 3
# decodes 70.9 tok/s with it vs 63.9 with the two stages (bench/head_ab.py, RESULTS.md).
WEIGHT_ONLY_IS_FASTER_ON = frozenset({"AVX512"})


def use_int8_head_where_it_pays(model: torch.nn.Module, release_memory: Callable[[], None] | None = None) -> None:
    """Make a packed model's int8 LM head an `Int8Head` if it holds more weights than all the
    blocks' packed matrices together (module docstring: where the speed is worth the memory),
    unless PyTorch runs its weight-only kernel's fast build on this CPU (`WEIGHT_ONLY_IS_FASTER_ON`).
    `release_memory` runs first where it does, so FBGEMM's copy does not pile onto freed memory."""
    head = getattr(model, "lm_head", None)
    if type(head) is not Int8Linear or torch.backends.cpu.get_cpu_capability() in WEIGHT_ONLY_IS_FASTER_ON:
        return
    blocks = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, (Int4Linear, Int8Linear)) and m is not head)
    if head.in_features * head.out_features > blocks:
        if release_memory is not None:
            release_memory()
        model.lm_head = Int8Head.from_linear(head)
