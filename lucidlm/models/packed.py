"""Linear layers whose weights stay compressed in memory: the fast path for quantized files.

The float32 path dequantizes every GGUF tensor once at load time; exact, but each decode
step then reads 4 bytes per weight, and a batch-1 decode step is bound by how fast the
weights stream from memory (135 M weights * 4 bytes / 31 GB/s ≈ 17 ms for SmolLM2). These
modules keep the weights small and multiply with PyTorch's weight-only quantized kernels,
which unpack the weights inside the matrix multiply:

    Int4Linear   4-bit values in groups of 32 with a scale and an offset per group:
                 w = scale * q + offset,  q in 0..15.  Q4_0, Q4_1 and Q4_K weights are
                 of this form, so the 4-bit values are kept exactly; the kernel holds the
                 scales in bfloat16 (the file's float16 scales to within 2^-8 relative).
                 Kernel: aten._weight_int4pack_mm_for_cpu (needs N % 16 == 0; the loader
                 falls back to Int8Linear otherwise).
    Int8Linear   8-bit values with one scale per output row: w = scale[row] * q,  q in
                 -127..127. Used for a Q8_0 LM head (tied to the embedding), re-quantized
                 per row: a small loss, measured by bench/quality.py.
                 Kernel: torch._weight_int8pack_mm.
    Q8Embedding  the Q8_0 embedding table as stored (int8, a scale per 32): exact lookups.

Activations enter these kernels in bfloat16 (the CPU kernels require it) and their results
come out rounded to bfloat16 (8 significant bits: logits of 16-32 are resolved to 0.125),
then continue in the caller's dtype: the model's activations, residual stream and KV cache
stay float32 (on CPUs without AVX-512 BF16, such as ours, bfloat16 elementwise work and
matmuls are slower than float32). `bench/quality.py` measures the total effect; use
dtype="float32" where exact log-probabilities matter. Both modules look like nn.Linear from outside: `in_features`,
`out_features`, `forward(x)`, and a `weight` property that rebuilds the float32 matrix on
demand for introspection (the logit lens, embedding maps), not for computing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # values sharing one scale and offset (the ggml block size)

# The int4 kernel packs pairs of 4-bit values in a layout tiled for its inner loop; 2 is the
# number of 16-wide K tiles per pack, the value PyTorch's own int4 CPU path uses.
_INNER_K_TILES = 2

# With many rows (prefill) unpacking the weight to float32 and running a dense matmul beats
# the int4 kernel, whose unpacking work is repeated for every block of rows (and bfloat16
# dense matmuls are slow on this CPU build). bench/kernels.py, 2 threads: at M=1 int4 ≈
# float32 from cache and 4x less memory traffic; at M=16 about equal; at M=512 float32 is 3x faster.
DENSE_FROM_ROWS = 32


class Int4Linear(nn.Module):
    """y = x Wᵀ (+ b) with W (N, K) stored as 4-bit groups: W[n, g*32:(g+1)*32] = scale[n,g]*q + offset[n,g].

    Two copies of the 4-bit values, 0.5 bytes per weight each: `packed`, in the tiled layout
    the int4 kernel reads (fast for a few rows: decode), and `nibbles`, two values per byte
    in row order, which unpack to a float32 matrix in a few vectorised ops (for many rows:
    prefill, where a dense float32 matmul is 2-3x faster than the int4 kernel here).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None = None):
        """q: (N, K) integers 0..15; scale, offset: (N, K/32) float."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        if not self.fits(q.shape):
            raise ValueError(f"Int4Linear needs out_features % 16 == 0 and in_features % {GROUP} == 0, got {tuple(q.shape)}")
        q = q.to(torch.uint8)
        self.register_buffer("nibbles", q[:, 0::2] | (q[:, 1::2] << 4))  # (N, K/2): element 2j low, 2j+1 high
        # The kernel's dequantization is (q - 8) * scale + zero, so zero = offset + 8 * scale,
        # laid out (K/32, N, 2) as the kernel expects. (bfloat16 scales round the file's
        # float16 ones by up to 2^-8 relative; bench/quality.py measures the effect.)
        zero = offset.float() + 8 * scale.float()
        self.register_buffer("scales_and_zeros", torch.stack([scale.float(), zero], dim=-1).transpose(0, 1)
                             .contiguous().bfloat16())
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), _INNER_K_TILES))
        self.register_buffer("bias", None if bias is None else bias.float())

    @staticmethod
    def fits(shape: tuple[int, int]) -> bool:
        """Whether the int4 kernel takes an (N, K) weight: N a multiple of 16, K of 32."""
        return shape[0] % 16 == 0 and shape[1] % GROUP == 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"

    @property
    def weight(self) -> torch.Tensor:
        """W as a float32 (N, K) matrix, as the kernel computes with it: (q - 8) * scale + zero
        with the kernel's bfloat16 scales and zeros (the file's values to within 2^-8 relative)."""
        N, K = self.out_features, self.in_features
        q = torch.stack([self.nibbles & 0x0F, self.nibbles >> 4], dim=-1).view(N, K // GROUP, GROUP).float()
        scale, zero = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/32) each
        return ((q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] >= DENSE_FROM_ROWS:
            # The same numbers as the kernel (bfloat16 inputs, its scales), so that a prompt gives
            # the same logits whether it is processed at once or token by token.
            y = F.linear(x2.to(torch.bfloat16).float(), self.weight).to(torch.bfloat16)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, GROUP,
                                                          self.scales_and_zeros)  # (M, N) bfloat16
        if self.bias is not None:
            y = y.float() + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def _int8_rows(shape: tuple[int, int], decode_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of an (N, K) matrix whose float32 rows `decode_rows(slice)` gives.

    Works in slices of rows, so that a large table (Gemma's is 262k x 640) never needs
    full-size float temporaries.
    """
    q, scale = torch.empty(shape, dtype=torch.int8), torch.empty(shape[0], dtype=torch.bfloat16)
    for start in range(0, shape[0], 4096):
        rows = slice(start, start + 4096)
        w = decode_rows(rows)
        # The kernel reads bfloat16 scales: round the scale first, then the values with it,
        # so each value is off by at most half a step of the scale actually used.
        scale[rows] = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).bfloat16()
        q[rows] = torch.round(w / scale[rows, None].float()).clamp_(-127, 127)
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

    @property
    def weight(self) -> torch.Tensor:
        """W as a float32 (N, K) matrix, as the kernel computes with it (bfloat16 row scales)."""
        return self.q.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] >= DENSE_FROM_ROWS:  # as Int4Linear: the kernel's numbers, dense
            # A slice of output rows at a time: Gemma's LM head decoded whole would be 671 MB.
            x32 = x2.to(torch.bfloat16).float()
            y = torch.cat([F.linear(x32, self.q[rows].float() * self.scale[rows].float()[:, None]).to(torch.bfloat16)
                           for rows in (slice(i, i + 16384) for i in range(0, self.out_features, 16384))], dim=-1)
        else:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.scale)  # (M, N)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class Q8Embedding(nn.Module):
    """An embedding table kept in its Q8_0 form: int8 values with one scale per 32 (exact).

    Looking up T rows decodes only those rows, so the table costs ~1.06 bytes per weight
    instead of 4. (The tied LM head, which reads every row each step, uses an `Int8Linear`
    copy instead, because the int8 kernel takes one scale per row.)
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        """q: (V, C) int8; scale: (V, C/32) float."""
        super().__init__()
        self.num_embeddings, self.dim = q.shape
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.out_dtype = torch.float32

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}, Q8_0 (int8, a scale per {GROUP})"

    @property
    def weight(self) -> torch.Tensor:
        return self._decode(self.q, self.scale).float()

    def _decode(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        groups = q.view(*q.shape[:-1], self.dim // GROUP, GROUP).float() * scale.unsqueeze(-1)
        return groups.view(*q.shape).to(self.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._decode(self.q[ids], self.scale[ids])  # (..., C)

    def as_int8_linear(self) -> Int8Linear:
        """The table re-quantized with one scale per row, for the int8 matmul kernel: a tied LM head."""
        return Int8Linear(*_int8_rows(self.q.shape, lambda rows: self._decode(self.q[rows], self.scale[rows]).float()))


PACKED_MODULES = (Int4Linear, Int8Linear, Q8Embedding)


def packed_weight_sizes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """'<module>.weight' -> (logical parameters, bytes in memory) for every packed module."""
    sizes = {}
    for name, module in model.named_modules():
        if isinstance(module, PACKED_MODULES):
            nbytes = sum(b.numel() * b.element_size() for b in module.buffers())
            rows, cols = (module.num_embeddings, module.dim) if isinstance(module, Q8Embedding) else \
                (module.out_features, module.in_features)
            sizes[f"{name}.weight"] = (rows * cols, nbytes)
    return sizes
