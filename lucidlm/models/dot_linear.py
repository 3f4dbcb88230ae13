"""A packed linear layer for the int8-dot kernel (`lucidlm.kernels.cpu_decode.matmul`): where the CPU has
AVX-512 VNNI, packed models keep their 4-, 5- and 8-bit matrices in this form instead of
`packed.Int4Linear` / `packed.Int8Linear`.

    Int8DotLinear  W (N, K) in groups of 32 values with a scale and an offset each:
                   W[n, g*32:(g+1)*32] = scale[n,g] * q + offset[n,g], q unsigned, 4, 5 or 8 bits.
                   4-bit: the file's Q4_0/Q4_1/Q4_K values, exactly, with their scales as
                   float16 (Q4_0/Q4_1's are float16 in the file; Q4_K's products of a float16
                   and a 6-bit integer are rounded to float16, 2^-11 relative).
                   5-bit: the file's Q5_0/Q5_1 values, exactly (Q5_0's offset -16 d is exact
                   in float16).
                   8-bit: a Q8_0 matrix exactly (the tied LM head: q + 128, offset
                   -128 * scale, not stored),
                   or any other matrix (Q6_K ...) rounded to int8 with a scale per 32 values.

Few rows (decode steps, prompt lookup's checks, batches, short prompts) go through the kernel,
which rounds x to two int8 terms (a scale per 32 values: ~1e-5 of each group's maximum) and
returns float32. Many rows (from `DENSE_FROM_ROWS`: a prefill) decode the weight and run a
dense matmul, as the other packed layers do (in bfloat16 on CPUs with AVX-512 BF16). Like them
it looks like nn.Linear from outside (`in_features`, `out_features`, `weight`, `bias`,
`weight_rows`).

The bytes of a row are contiguous (the kernel reads whole chunks of 64 values of one row), so
stacking layers by rows (`concat`, used by `fusion.fuse_projections`) is concatenation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import cpu_decode
from . import dense_path

GROUP = 32  # values sharing a scale and an offset (the ggml block size)

# Rows from which a call decodes the weight and runs a dense matmul instead of the kernel. The
# kernel's time grows with the rows (~0.5 ms a token of a SmolLM2 prompt, from 8 rows on with 16
# weight rows' outputs across its lanes); the dense path pays ~25 ms to decode the model's weights,
# then ~0.3-0.4 ms a token. `python bench/prefill_rows.py` (2 threads, AVX-512 BF16; kernel / dense
# ms): SmolLM2 prompts of 64 tokens 34 / 36, 128: 68 / 78, 160: 84 / 92, 192: 99 / 104;
# Gemma 3 64: 37 / 47, 128: 63 / 67, 160: 77 / 79, 192: 90 / 88. Where the two are close, the
# kernel's arithmetic is the more exact (bfloat16 dense matmuls: next-token KL ~2e-3 from float32,
# the kernel's ~1e-7). (The int4 kernels of `packed` cross over earlier: dense_path.)
DENSE_FROM_ROWS = 160


class Int8DotLinear(nn.Module):
    """y = x Wᵀ (+ b), W stored as `bits`-bit unsigned values with a float16 scale and offset per 32
    (module docstring). `weights`: (N, K * bits/8) uint8 in the kernel's layout; `scales`: float16 per
    chunk of 64 values: 4- and 5-bit (N, K/64 * 4) (scale A, scale B, offset A, offset B), 8-bit
    (N, K/64 * 2) (scale A, scale B: the offsets are -128 * scale)."""

    def __init__(self, weights: torch.Tensor, scales: torch.Tensor, bits: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits = bits
        self.out_features, self.in_features = weights.shape[0], weights.shape[1] * 8 // bits
        if not self.fits((self.out_features, self.in_features)) or bits not in (4, 5, 8):
            raise ValueError(f"Int8DotLinear needs in_features % 64 == 0 and 4, 5 or 8 bits, got "
                             f"{(self.out_features, self.in_features)}, {bits} bits")
        self.register_buffer("weights", weights.to(torch.uint8).contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.float())

    @staticmethod
    def fits(shape: tuple[int, int]) -> bool:
        """Whether an (N, K) matrix fits the layout: K a multiple of 64 (whole chunks)."""
        return len(shape) == 2 and shape[1] % cpu_decode.CHUNK == 0

    @classmethod
    def from_int4(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                  bias: torch.Tensor | None = None) -> "Int8DotLinear":
        """From 4-bit values q (N, K) 0..15 and a scale and offset per group (N, K/32), as
        `loading.quants.affine_4bit` gives them."""
        N, K = q.shape
        chunks = q.to(torch.uint8).view(N, K // 64, 2, 32)
        weights = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(N, K // 2)  # value b low, 32 + b high
        return cls(weights, _chunk_scales(scale, offset), 4, bias)

    @classmethod
    def from_int5(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                  bias: torch.Tensor | None = None) -> "Int8DotLinear":
        """From 5-bit values q (N, K) 0..31 and a scale and offset per group (N, K/32), as
        `loading.quants.affine_5bit` gives them: per chunk of 64 values, the 4-bit chunk of their
        low four bits, then their fifth bits as 8 bytes (bit j of the little-endian word: value j)."""
        N, K = q.shape
        q = q.to(torch.uint8).view(N, K // 64, 64)
        low = (q & 15).view(N, K // 64, 2, 32)
        nibbles = low[:, :, 0] | (low[:, :, 1] << 4)  # (N, K/64, 32)
        fifth = (q >> 4).view(N, K // 64, 8, 8) << torch.arange(8, dtype=torch.uint8)  # bit i of byte b: value 8b + i
        weights = torch.cat([nibbles, fifth.sum(-1, dtype=torch.uint8)], dim=-1).reshape(N, K // 64 * 40)
        return cls(weights, _chunk_scales(scale, offset), 5, bias)

    @classmethod
    def from_q8_0(cls, blocks: torch.Tensor, shape: tuple[int, int]) -> "Int8DotLinear":
        """A Q8_0 matrix as the file stores it (blocks of a float16 scale and 32 int8 values, 34
        bytes; `blocks` uint8, N * K/32 * 34 of them, e.g. a memory-mapped view), exactly: q + 128
        with offset -128 * scale. Read a slice of rows at a time (no large temporaries)."""
        N, K = shape
        blocks = blocks.reshape(N, K // GROUP, 2 + GROUP)
        weights = torch.empty(N, K, dtype=torch.uint8)
        scale = torch.empty(N, K // GROUP, dtype=torch.float16)
        step = max(1, 2**20 // K)
        for start in range(0, N, step):
            rows = blocks[start:start + step]
            scale[start:start + step] = rows[..., :2].contiguous().view(torch.float16).squeeze(-1)  # little-endian
            weights[start:start + step] = (rows[..., 2:].view(torch.int8).to(torch.int16) + 128).view(-1, K)
        return cls(weights, _chunk_scales(scale), 8)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8DotLinear":
        """Round a float (N, K) matrix to int8 with one symmetric scale per 32 values (max |w| -> 127),
        a slice of rows at a time (no full-size float temporaries for a large table)."""
        N, K = weight.shape
        weights = torch.empty(N, K, dtype=torch.uint8)
        scale = torch.empty(N, K // GROUP, dtype=torch.float16)
        step = max(1, 2**19 // K)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            w = weight[rows].float().view(-1, K // GROUP, GROUP)
            # round the scale to float16 first, then the values with the scale actually used
            s = (w.abs().amax(-1) / 127).to(torch.float16)
            inverse = torch.where(s > 0, 1 / s.float(), torch.zeros((), dtype=torch.float32))
            weights[rows] = ((w * inverse[..., None]).round_().clamp_(-127, 127) + 128).to(torch.uint8).view(-1, K)
            scale[rows] = s
        return cls(weights, _chunk_scales(scale), 8)

    @classmethod
    def concat(cls, parts: list["Int8DotLinear"]) -> "Int8DotLinear":
        """One layer whose weight is the parts' stacked by rows (their outputs side by side, bit
        for bit: each output depends on its own row only). Same in_features and bits required."""
        if len({(p.in_features, p.bits) for p in parts}) != 1:
            raise ValueError(f"cannot stack layers of different in_features or bits: "
                             f"{[(p.in_features, p.bits) for p in parts]}")
        biases = [p.bias for p in parts]
        bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(p.out_features) if b is None else b for p, b in zip(parts, biases)])
        return cls(torch.cat([p.weights for p in parts]), torch.cat([p.scales for p in parts]), parts[0].bits, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.bits}-bit groups of {GROUP}, int8-dot kernel")

    @property
    def weight(self) -> torch.Tensor:
        """W as a float32 (N, K) matrix: the values the kernel multiplies, decoded."""
        return self.weight_rows(0, self.out_features)

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `weight`."""
        return self._rows_into(start, stop, torch.empty(stop - start, self.in_features))

    def _rows_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of W decoded into `out` ((rows, K) or rows * K values, contiguous;
        float32 or bfloat16): scale * q + offset computed in float32, rounded once (C++ kernel)."""
        rows = out.view(stop - start, self.in_features)
        return cpu_decode.dequantize(self.weights[start:stop], self.scales[start:stop], self.bits, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < DENSE_FROM_ROWS * self.in_features:  # a few rows: the kernel
            # (x as it comes, (..., K): a decode step makes ~120 of these calls, and each reshape or
            # conversion around them would cost ~1 us)
            y = cpu_decode.matmul(x, self.weights, self.scales, self.bits)  # (..., N) float32
        else:
            x2 = x.reshape(-1, self.in_features)  # (M, K)
            y = dense_path.dense_matmul(x2, self.out_features, self._rows_into, align=1, transposed=False)
            y = y.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)


def _chunk_scales(scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group scale and offset (N, K/32) -> the layout's float16 numbers: per chunk of two groups
    A, B: scale A, scale B, offset A, offset B ((N, K/64 * 4), 4- and 5-bit); without offsets (8-bit values, whose
    offset is always -128 * scale) scale A, scale B ((N, K/64 * 2))."""
    if offset is None:
        return scale.to(torch.float16).contiguous()
    N, groups = scale.shape
    pairs = torch.stack([scale.reshape(N, groups // 2, 2), offset.reshape(N, groups // 2, 2)], dim=2)
    return pairs.to(torch.float16).reshape(N, groups * 2)
