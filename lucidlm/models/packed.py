"""Linear layers whose weights stay compressed in memory: the fast path for quantized files.

The float32 path dequantizes every GGUF tensor once at load time; exact, but each decode
step then reads 4 bytes per weight, and a batch-1 decode step is bound by how fast the
weights stream from memory (135 M weights * 4 bytes / 31 GB/s ≈ 17 ms for SmolLM2). These
modules keep the weights small and multiply with PyTorch's weight-only quantized kernels,
which unpack the weights inside the matrix multiply. (On CPUs with AVX-512 VNNI the loader uses
`models.dot_linear.Int8DotLinear` instead, with our own integer-dot kernel: faster, and closer
to the float32 model.)

    Int4Linear   4-bit values in groups of 32 with a scale and an offset per group:
                 w = scale * q + offset,  q in 0..15.  Q4_0, Q4_1 and Q4_K weights are
                 of this form, so the 4-bit values are kept exactly; the kernel holds the
                 scales in bfloat16 (the file's float16 scales to within 2^-8 relative).
                 Kernel: aten._weight_int4pack_mm_for_cpu (needs N % 16 == 0; the loader
                 falls back to Int8Linear otherwise).
    Int8Linear   8-bit values with one scale per output row: w = scale[row] * q,  q in
                 -127..127. Used for Q5_0/Q6_K/Q8_0 matrices and the LM head (a tied Q8_0
                 one re-quantized per row: a small loss, measured by bench/quality.py).
                 Kernel: torch._weight_int8pack_mm. A head larger than all the blocks (Gemma 3's)
                 is an `Int8Head` (models/packed_head.py): FBGEMM's integer kernel instead,
                 its best candidates recomputed exactly.
    Q8Embedding  the Q8_0 embedding table as stored (int8, a scale per 32), left in the
                 memory-mapped file: exact lookups, and only the rows looked up are read.

`models.fusion.fuse_projections` then stacks the projections that read the same input (q, k, v;
gate, up) into one Int4Linear or Int8Linear each, for fewer, larger kernel calls; the old names
stay, as `RowSlice` views of the fused rows.

Activations enter these kernels in bfloat16 (the CPU kernels require it: given float32 they
run a reference loop ~10x slower) and their results come out rounded to bfloat16 (8 significant
bits: logits of 16-32 are resolved to 0.125, except an `Int8Head`'s best, recomputed in float32),
then continue in the caller's dtype: the model's
activations, residual stream and KV cache stay float32 (on CPUs without AVX-512 BF16,
bfloat16 elementwise work and matmuls are slower than float32). Many rows at once (a
prefill) take the dense path instead, a matmul on the decoded weights: float32 throughout (no
rounding of x or of the result, so a prompt's logits come out closer to the exact ones than a
decode step's), or, on CPUs with AVX-512 BF16, x and the decoded weights rounded to bfloat16
and multiplied with float32 accumulation (`DENSE_DTYPE`: 3-4x faster matmuls there, about the
decode kernels' rounding; the weights are decoded straight into bfloat16, each computed in
float32 and rounded once). Such models also opt in to `models.chunked_attention` for long
prompts (`prefill_dtype`, set by the loader). `bench/quality.py` measures the total effect; use
dtype="float32" where exact log-probabilities matter. (The dense path itself: `models.dense_path`.) Both modules look like nn.Linear from outside: `in_features`,
`out_features`, `forward(x)`, and a `weight` property that rebuilds the float32 matrix on
demand for introspection (the logit lens, embedding maps), not for computing.
"""

from __future__ import annotations

import torch
from torch import nn

from . import dense_path
from .dense_path import DENSE_DTYPE, DENSE_FROM_ROWS, has_avx512_bf16  # noqa: F401 (also read from here)
from .dot_linear import Int8DotLinear
from .int4_layout import int4pack, packed_layout

GROUP = 32  # values sharing one scale and offset (the ggml block size)


class Int4Linear(nn.Module):
    """y = x Wᵀ (+ b) with W (N, K) stored as 4-bit groups: W[n, g*32:(g+1)*32] = scale[n,g]*q + offset[n,g].

    One copy of the 4-bit values, 0.5 bytes per weight: `packed`, in the tiled layout the
    int4 kernel reads (fast for a few rows: decode). For many rows (prefill) the same bytes
    are unpacked to a float32 matrix, a slice of rows at a time into a reused buffer, for a
    dense matmul (2-3x faster than the int4 kernel there). Until `pack()` (the loader stacks
    layers first) the values wait in `nibbles`, two per byte in row order.

    The kernel's layout (PyTorch 2.13's `_convert_weight_to_int4pack_for_cpu`) depends on the
    instruction set PyTorch dispatches to: rows in blocks of R (64 with AVX-512, 32 otherwise),
    each block K * R/2 bytes, byte [block, k, j] holding W[R block + j, k] in its low nibble
    and W[R block + R/2 + j, k] in its high one (without AVX2, rows 2j and 2j + 1 instead); a
    last, smaller block of r rows (N % R: 16, 32 or 48) is K * r/2 bytes, byte [k, j] holding
    rows 2j (low) and 2j + 1 (high). `int4_layout.packed_layout()` finds which by packing a probe once.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None = None,
                 pack: bool = True):
        """q: (N, K) integers 0..15; scale, offset: (N, K/32) float. pack=False leaves the
        kernel's copy to `pack()` (the loader stacks layers first, and packs each result once)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        if not self.fits(q.shape):
            raise ValueError(f"Int4Linear needs out_features % 16 == 0 and in_features % {GROUP} == 0, got {tuple(q.shape)}")
        self.register_buffer("nibbles", _row_nibbles(q.to(torch.uint8)))
        # The kernel's dequantization is (q - 8) * scale + zero, so zero = offset + 8 * scale,
        # laid out (K/32, N, 2) as the kernel expects. (bfloat16 scales round the file's
        # float16 ones by up to 2^-8 relative; bench/quality.py measures the effect.)
        zero = offset.float() + 8 * scale.float()
        self.register_buffer("scales_and_zeros", torch.stack([scale.float(), zero], dim=-1).transpose(0, 1)
                             .contiguous().bfloat16())
        self.register_buffer("packed", None)
        self.register_buffer("bias", None if bias is None else bias.float())
        if pack:
            self.pack()

    def pack(self) -> None:
        """Build the kernel's tiled copy of the 4-bit values (if not built yet) and drop the
        row-order one."""
        if self.packed is None:
            packed_layout()  # fails loudly here, before any garbage could be decoded
            self.packed, self.nibbles = int4pack(self.values()), None

    @staticmethod
    def fits(shape: tuple[int, int]) -> bool:
        """Whether the int4 kernel takes an (N, K) weight: N a multiple of 16, K of 32."""
        return shape[0] % 16 == 0 and shape[1] % GROUP == 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"

    @classmethod
    def concat(cls, parts: list["Int4Linear"]) -> "Int4Linear":
        """One layer whose weight is the parts' weights stacked by rows, [W_0; W_1; ...]: its
        output is the parts' outputs side by side, bit for bit (each output column depends on
        its own row of 4-bit values, scales and zeros only). The parts must share in_features."""
        K = parts[0].in_features
        if any(p.in_features != K for p in parts):
            raise ValueError(f"cannot stack layers of different in_features: {[p.in_features for p in parts]}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.out_features, fused.in_features = sum(p.out_features for p in parts), K
        fused.register_buffer("nibbles", torch.cat([p.nibbles if p.packed is None else _row_nibbles(p.values())
                                                    for p in parts]))  # (N, K/2)
        fused.register_buffer("scales_and_zeros", torch.cat([p.scales_and_zeros for p in parts], dim=1))  # (K/32, N, 2)
        # The kernel's tiles span rows (and a last block of 16 is laid out apart), so the
        # parts' packed copies do not stack: `pack()` builds the fused one (the loader stacks
        # unpacked parts, and packs once).
        fused.register_buffer("packed", None)
        biases = [p.bias for p in parts]
        fused.register_buffer("bias", None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(p.out_features) if b is None else b for p, b in zip(parts, biases)]))
        return fused

    def values(self) -> torch.Tensor:
        """The 4-bit values q (0..15), (N, K) uint8."""
        if self.packed is None:
            return torch.stack([self.nibbles & 0x0F, self.nibbles >> 4], dim=-1).view(self.out_features, self.in_features)
        codes = self._codes_t(0, self.out_features, torch.empty(self.in_features, self.out_features, dtype=torch.int8))
        return (codes.t() + 8).to(torch.uint8).contiguous()

    def _codes_t(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """q - 8 (-8..7) of rows [start, stop) from `packed`, written transposed into `out`
        (K, stop - start) (float32 or int8). start is a multiple of the layout's block rows, stop
        too or N."""
        return packed_layout().codes_t(self.packed.view(torch.uint8), self.out_features, start, stop, out)

    def _weight_t(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of W transposed, written into `out` (K * rows values, or a (K, rows)
        view; float32, or bfloat16 for the dense path): (q - 8) * scale + zero with the kernel's
        bfloat16 scales and zeros, the numbers it computes with."""
        self.pack()
        wt = self._codes_t(start, stop, out.view(self.in_features, stop - start))
        scale, zero = (t.to(out.dtype).contiguous() for t in self.scales_and_zeros[:, start:stop].unbind(-1))  # (K/32, rows)
        groups = wt.view(self.in_features // GROUP, GROUP, stop - start)
        # One pass, in place. In bfloat16 too the product and sum are computed in float32 and
        # rounded once: the float32 result rounded, bit for bit (q - 8 and the scales have few
        # enough bits that (q - 8) * scale is exact). Contiguous scales: broadcasting strided
        # ones is ~10x slower.
        return torch.addcmul(zero.unsqueeze(1), groups, scale.unsqueeze(1), out=groups).view_as(wt)

    @property
    def weight(self) -> torch.Tensor:
        """W as a float32 (N, K) matrix, as the kernel computes with it: (q - 8) * scale + zero
        with the kernel's bfloat16 scales and zeros (the file's values to within 2^-8 relative)."""
        return self.weight_rows(0, self.out_features)

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `weight`, decoding only the kernel's blocks of rows that hold them."""
        block = packed_layout().block_rows
        first, last = start // block * block, min(-(-stop // block) * block, self.out_features)
        wt = self._weight_t(first, last, torch.empty(self.in_features * (last - first)))
        return wt.t()[start - first:stop - first].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        self.pack()  # no-op once packed (the loader packs every layer before returning)
        y = self.dense_matmul(x2) if x2.shape[0] >= DENSE_FROM_ROWS else self.kernel_matmul(x2)  # (M, N)
        if self.bias is not None:
            y = y.float() + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def kernel_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) bfloat16 through the int4 kernel (no bias): the fast way for a few rows."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_and_zeros)

    def dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) float32: the product `kernel_matmul` computes (the same weights: its
        bfloat16 scales), as DENSE_DTYPE matmuls on the unpacked weight, faster for many rows. In
        float32 neither x nor the result is rounded to bfloat16: the more exact of the two."""
        return dense_path.dense_matmul(x, self.out_features, lambda i, j, out: self._weight_t(i, j, out.t()).t(),
                             align=packed_layout().block_rows, transposed=True)


def _row_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) bytes, element 2j in the low nibble, 2j + 1 in the high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _int8_rows(shape: tuple[int, int], decode_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of an (N, K) matrix whose float32 rows `decode_rows(slice)` gives.

    Works in slices of rows, so that a large table (Gemma's is 262k x 640) never needs
    full-size float temporaries.
    """
    q, scale = torch.empty(shape, dtype=torch.int8), torch.empty(shape[0], dtype=torch.bfloat16)
    step = max(1, 2**19 // shape[1])  # 2 MiB of float32 per slice: stays in cache
    for start in range(0, shape[0], step):
        rows = slice(start, start + step)
        w = decode_rows(rows)
        # The kernel reads bfloat16 scales: round the scale first, then the values with it,
        # so each value is off by at most half a step of the scale actually used.
        row_scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).bfloat16()
        scale[rows] = row_scale
        q[rows] = (w / row_scale.float()[:, None]).round_().clamp_(-127, 127)  # w / s is new: in place is safe
    return q, scale


class Int8Linear(nn.Module):
    """y = x Wᵀ with W (N, K) = scale[:, None] * q, q int8. Many-row inputs (prefill) take a
    dense float32 matmul on the decoded weight, as in `Int4Linear`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.bfloat16().contiguous())  # (N,)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Linear":
        """Round a float (N, K) matrix to int8 with one symmetric scale per row (max |w| -> 127)."""
        return cls(*_int8_rows(weight.shape, lambda rows: weight[rows].float()))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"

    @classmethod
    def concat(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """One layer whose weight is the parts' weights stacked by rows (see `Int4Linear.concat`)."""
        if len({p.in_features for p in parts}) != 1:
            raise ValueError(f"cannot stack layers of different in_features: {[p.in_features for p in parts]}")
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    @property
    def weight(self) -> torch.Tensor:
        """W as a float32 (N, K) matrix, as the kernel computes with it (bfloat16 row scales)."""
        return self.weight_rows(0, self.out_features)

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `weight`."""
        return self._weight_rows_into(start, stop, torch.empty((stop - start) * self.in_features))

    def kernel_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) bfloat16 through the int8 kernel."""
        if torch.compiler.is_compiling():  # an opaque call in a compiled graph (see int8_weight_only_mm)
            return int8_weight_only_mm(x.to(torch.bfloat16), self.q, self.scale)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale)

    def dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """As `kernel_matmul`, as DENSE_DTYPE matmuls on the decoded weight, float32 out (see `Int4Linear.dense_matmul`)."""
        return dense_path.dense_matmul(x, self.out_features, self._weight_rows_into, align=1, transposed=False)

    def _weight_rows_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of `weight` written into `out` ((rows * K,) or (rows, K); float32 or
        bfloat16: q * scale is exact in float32, so a bfloat16 one is that product rounded once)."""
        rows = out.view(stop - start, self.in_features).copy_(self.q[start:stop])
        return rows.mul_(self.scale[start:stop].to(out.dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y = self.dense_matmul(x2) if x2.shape[0] >= DENSE_FROM_ROWS else self.kernel_matmul(x2)  # (M, N)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


@torch.library.custom_op("lucidlm::int8_weight_only_mm", mutates_args=())
def int8_weight_only_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch._weight_int8pack_mm, as an operator Inductor calls as it is. Compiled decode steps
    (`lucidlm.compile`) let Inductor choose between PyTorch's weight-only kernels and its own C++
    templates; for int8 it gains nothing (its template matched PyTorch's kernel within 2 % on
    every Gemma 3 and SmolLM2 shape) and keeps a reformatted copy of the weight: +280 MiB resident
    for Gemma 3's 262144 x 640 head (bench/RESULTS.md)."""
    return torch._weight_int8pack_mm(x, q, scale)


@int8_weight_only_mm.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[0])


class Q8Embedding(nn.Module):
    """An embedding table kept in its Q8_0 form, the file's own bytes: blocks of 32 int8 values
    after a float16 scale, 34 bytes, C/32 blocks a row. Lookups decode only the rows asked for
    (exactly: value = scale * q).

    The loader passes a memory-mapped view of the GGUF file (`GGUFFile.map_tensor`), so the table
    is not in memory at all: the OS reads the few pages a lookup touches (Gemma 3's table is
    170 MiB, of which a prompt reads a few hundred rows). The tied LM head, which reads every row
    each step, is a separate `Int8Linear` (the int8 kernel takes one scale per row).
    """

    BLOCK_BYTES = 2 + GROUP  # float16 scale, then 32 int8 values

    def __init__(self, blocks: torch.Tensor, shape: tuple[int, int]):
        """blocks: the table's Q8_0 bytes, uint8, (V * C/32 * 34,) or (V, C/32 * 34); shape: (V, C)."""
        super().__init__()
        self.num_embeddings, self.dim = shape
        if self.dim % GROUP or blocks.numel() != self.num_embeddings * self.dim // GROUP * self.BLOCK_BYTES:
            raise ValueError(f"{blocks.numel()} bytes are not a Q8_0 table of shape {tuple(shape)}")
        self.register_buffer("blocks", blocks.view(self.num_embeddings, -1))  # (V, C/32 * 34) uint8
        self.out_dtype = torch.float32

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}, Q8_0 (int8, a scale per {GROUP})"

    @property
    def weight(self) -> torch.Tensor:
        return self._decode(self.blocks).float()

    def _decode(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., C/32 * 34) uint8 rows -> (..., C) in out_dtype."""
        blocks = rows.view(*rows.shape[:-1], self.dim // GROUP, self.BLOCK_BYTES)
        scale = blocks[..., :2].contiguous().view(torch.float16).float()  # (..., C/32, 1); GGUF is little-endian
        values = blocks[..., 2:].view(torch.int8).float() * scale  # (..., C/32, 32)
        return values.view(*rows.shape[:-1], self.dim).to(self.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._decode(self.blocks[ids])  # (..., C)

    def as_int8_linear(self) -> Int8Linear:
        """The table re-quantized with one scale per row, for the int8 matmul kernel: a tied LM head."""
        return Int8Linear(*_int8_rows((self.num_embeddings, self.dim), lambda rows: self._decode(self.blocks[rows]).float()))


PACKED_MODULES = (Int4Linear, Int8Linear, Int8DotLinear, Q8Embedding)
