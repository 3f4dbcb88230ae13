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

`fuse_projections` then stacks the projections that read the same input (q, k, v; gate, up)
into one Int4Linear or Int8Linear each, for fewer, larger kernel calls; the old names stay, as
`RowSlice` views of the fused rows.

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

from typing import Callable

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

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None = None,
                 pack: bool = True):
        """q: (N, K) integers 0..15; scale, offset: (N, K/32) float. pack=False leaves the
        kernel's copy to `pack()` (the loader stacks layers first, and packs each result once)."""
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
        self.register_buffer("packed", None)
        self.register_buffer("bias", None if bias is None else bias.float())
        if pack:
            self.pack()

    def pack(self) -> None:
        """Build the kernel's tiled copy of the 4-bit values (if not built yet)."""
        if self.packed is None:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                self.values().to(torch.int32).contiguous(), _INNER_K_TILES)

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
        fused.register_buffer("nibbles", torch.cat([p.nibbles for p in parts]))  # (N, K/2)
        fused.register_buffer("scales_and_zeros", torch.cat([p.scales_and_zeros for p in parts], dim=1))  # (K/32, N, 2)
        # The kernel's tiles span rows, so the parts' packed copies do not stack: `pack()`
        # builds the fused one (the loader stacks unpacked parts, and packs once).
        fused.register_buffer("packed", None)
        biases = [p.bias for p in parts]
        fused.register_buffer("bias", None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(p.out_features) if b is None else b for p, b in zip(parts, biases)]))
        return fused

    def values(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The 4-bit values q (0..15) of rows [start, stop), (rows, K) uint8."""
        nibbles = self.nibbles[start:stop]
        return torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1).view(nibbles.shape[0], self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """W as a float32 (N, K) matrix, as the kernel computes with it: (q - 8) * scale + zero
        with the kernel's bfloat16 scales and zeros (the file's values to within 2^-8 relative)."""
        return self.weight_rows(0, self.out_features)

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `weight`, decoding only those rows."""
        N, K = stop - start, self.in_features
        q = self.values(start, stop).view(N, K // GROUP, GROUP).float()
        scale, zero = self.scales_and_zeros[:, start:stop].float().transpose(0, 1).unbind(-1)  # (N, K/32) each
        return ((q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] >= DENSE_FROM_ROWS:
            # The same numbers as the kernel (bfloat16 inputs, its scales), so that a prompt gives
            # the same logits whether it is processed at once or token by token.
            y = F.linear(x2.to(torch.bfloat16).float(), self.weight).to(torch.bfloat16)
        else:
            self.pack()  # no-op once packed (the loader packs every layer before returning)
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
        return self.q[start:stop].float() * self.scale[start:stop].float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] >= DENSE_FROM_ROWS:  # as Int4Linear: the kernel's numbers, dense
            # A slice of output rows at a time: Gemma's LM head decoded whole would be 671 MB.
            x32 = x2.to(torch.bfloat16).float()
            y = torch.cat([F.linear(x32, self.weight_rows(i, i + 16384)).to(torch.bfloat16)
                           for i in range(0, self.out_features, 16384)], dim=-1)
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


class RowSlice(nn.Module):
    """Rows [start, stop) of a fused layer, under the name the unfused layer had (`q_proj` is
    rows 0..H*D of `qkv_proj`), so that introspection finds `in_features`, `out_features`,
    `weight` and `bias` where it always did, and calling it directly still gives q_proj(x).

    It holds no weights: the fused layer, registered on the same parent, owns them. The
    reference to it is a plain attribute, not a submodule, so the weights appear once in
    `state_dict()`, `buffers()` and `packed_weight_sizes`. The model's forward calls the
    fused layer itself; calling a slice runs the whole fused layer and keeps its rows.
    """

    def __init__(self, fused: Int4Linear | Int8Linear | nn.Linear, start: int, stop: int, fused_name: str):
        super().__init__()
        self.__dict__["fused"] = fused  # bypasses nn.Module.__setattr__: not a submodule
        self.start, self.stop, self.fused_name = start, stop, fused_name
        self.in_features, self.out_features = fused.in_features, stop - start

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rows {self.start}:{self.stop} of {self.fused_name}")

    @property
    def weight(self) -> torch.Tensor:
        """(out_features, in_features): float32 decoded from a packed layer, a view of a dense one."""
        if isinstance(self.fused, nn.Linear):
            return self.fused.weight[self.start:self.stop]
        return self.fused.weight_rows(self.start, self.stop)

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.fused, "bias", None)  # (Int8Linear has none)
        return None if bias is None else bias[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.stop]


# Fused layer -> the layers it replaces, in row order. A model class opts in by setting the
# fused attribute to None in __init__ and computing with it in forward when it is set
# (`llama.Attention`, `gemma3.Attention`, `layers.SwiGLU`, `gemma3.GeGLU`).
FUSIBLE = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
RELEASE_EVERY = 4 * 2**20  # bytes of replaced buffers between calls of fuse_projections' release_memory


def fuse_projections(model: nn.Module, release_memory: Callable[[], None] | None = None, dense: bool = False) -> int:
    """Stack the packed projections that read the same input into one layer each: q, k, v
    into `qkv_proj` and gate, up into `gate_up_proj`; the old names become `RowSlice`s of it.
    `dense=True` stacks plain nn.Linear groups too (`compile_decode` on a GPU, where each
    small matmul of a decode step is a kernel of a few microseconds, mostly latency).

    Why: a batch-1 decode step is many small matmuls, each paying for a kernel call and the
    conversion of its input and output to and from bfloat16. One call for q, k and v (and one
    for gate and up) does the same arithmetic in fewer, larger calls: SmolLM2 goes from 7 to
    4 int4 calls per layer, bit-identical outputs. A group is fused when its parts are all
    Int4Linear or all Int8Linear (Gemma 3's Q5_0 q/k/v/gate/up); mixed groups (a Q4_K q with
    a Q6_K v, say: Q4_K_M files mix them) are left as they are.

    The parts' buffers are freed as each fused layer is made, but the allocator keeps freed
    memory and cannot reuse it for the larger fused buffers: without `release_memory` (the
    loader passes one that returns freed memory to the system) peak RSS would grow by the
    size of everything fused (~190 MB for SmolLM2). It is called every RELEASE_EVERY bytes freed.
    Returns the number of fused layers made.
    """
    made, freed = 0, 0
    for module in list(model.modules()):
        for fused_name, part_names in FUSIBLE.items():
            if not hasattr(module, fused_name) or getattr(module, fused_name) is not None:
                continue  # this class does not compute with a fused layer, or already has one
            parts = [getattr(module, name) for name in part_names]
            kind = type(parts[0])
            if kind not in ((Int4Linear, Int8Linear, nn.Linear) if dense else (Int4Linear, Int8Linear)) \
                    or any(type(p) is not kind for p in parts) or len({p.in_features for p in parts}) != 1:
                continue  # mixed kinds (a Q4_K q with a Q6_K v, say) or not packed
            fused = _concat_linear(parts) if kind is nn.Linear else kind.concat(parts)
            setattr(module, fused_name, fused)
            start = 0
            for name, part in zip(part_names, parts):
                setattr(module, name, RowSlice(fused, start, start + part.out_features, fused_name))
                start += part.out_features
                freed += _tensor_bytes(part)
                for tensor in [n for n, _ in [*part.named_buffers(recurse=False), *part.named_parameters(recurse=False)]]:
                    delattr(part, tensor)  # free it now, even if something (the loader) still holds the part
            made += 1
            if release_memory is not None and freed >= RELEASE_EVERY:
                release_memory()
                freed = 0
    if release_memory is not None and freed:
        release_memory()
    return made


PACKED_MODULES = (Int4Linear, Int8Linear, Q8Embedding)


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose weight (and bias) are the parts' stacked by rows."""
    weight = torch.cat([p.weight.detach() for p in parts])  # (N, K)
    has_bias = any(p.bias is not None for p in parts)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")  # no init: replaced
    grad = parts[0].weight.requires_grad
    fused.weight = nn.Parameter(weight, requires_grad=grad)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([torch.zeros(p.out_features, dtype=weight.dtype, device=weight.device)
                                             if p.bias is None else p.bias.detach() for p in parts]), requires_grad=grad)
    return fused


def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of a layer's buffers (packed layers) and parameters (a stacked dense nn.Linear)."""
    return sum(t.numel() * t.element_size() for t in [*module.buffers(), *module.parameters()])


def packed_weight_sizes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """'<module>.weight' -> (logical parameters, bytes in memory) for every packed module.

    A fused layer is reported through its `RowSlice`s, by the names of the layers it replaced
    (those in the file), each with its rows' share of the bytes (every buffer of an
    Int4Linear or Int8Linear, and a stacked nn.Linear's weight, has a fixed size per row), so
    the totals are the unfused model's. A stacked dense layer's own parameters must then be left
    out of a parameter count (`fused_layer_names`).
    """
    fused_names = fused_layer_names(model)
    sizes = {}
    for name, module in model.named_modules():
        if isinstance(module, RowSlice):
            fused = module.fused
            per_row = _tensor_bytes(fused) // fused.out_features
            sizes[f"{name}.weight"] = (module.out_features * module.in_features, module.out_features * per_row)
        elif isinstance(module, PACKED_MODULES) and name not in fused_names:
            rows, cols = (module.num_embeddings, module.dim) if isinstance(module, Q8Embedding) else \
                (module.out_features, module.in_features)
            sizes[f"{name}.weight"] = (rows * cols, _tensor_bytes(module))
    return sizes


def fused_layer_names(model: nn.Module) -> set[str]:
    """Names of the fused layers (`qkv_proj`, `gate_up_proj`) that `RowSlice`s stand for."""
    viewed = {id(m.fused) for m in model.modules() if isinstance(m, RowSlice)}
    return {name for name, module in model.named_modules() if id(module) in viewed}
