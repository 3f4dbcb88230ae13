"""Where PyTorch's int4 CPU kernel keeps each 4-bit value of a packed weight, by CPU build.

`Int4Linear` (models/packed.py) multiplies through `aten._weight_int4pack_mm_for_cpu`, whose weight
is packed by `aten._convert_weight_to_int4pack_for_cpu` in a layout tiled for the kernel's inner
loop, and reads those bytes back itself for prefill's dense path and `.weight`. The layout is not
fixed: PyTorch compiles the kernel once per instruction set and dispatches to the best one the
CPU has, and each build tiles rows for its own vector width (ATen/native/cpu/int4mm_kernel.cpp in
PyTorch 2.13). So the layout is found at run time, from a probe, among the known ones.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..errors import UnsupportedError

# The int4 kernel packs pairs of 4-bit values in a layout tiled for its inner loop; 2 is the
# number of 16-wide K tiles per pack, the value PyTorch's own int4 CPU path uses.
_INNER_K_TILES = 2


def int4pack(q: torch.Tensor) -> torch.Tensor:
    """The int4 kernel's tiled copy of (N, K) values 0..15."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), _INNER_K_TILES)


class PackedLayout(NamedTuple):
    """Where the int4 kernel's packing puts each 4-bit value (see `Int4Linear`).

    block_rows: rows per full block (the kernel's BLOCK_N, 4 x its float vector width: 64 with
    AVX-512, 32 with AVX2 or none). halves: in a full block, byte j pairs row j with row
    j + block_rows/2 (what the vectorized kernels unpack in one shift); False: rows 2j and
    2j + 1, as in the last, smaller block of every build.
    """

    block_rows: int
    halves: bool

    def codes_t(self, codes: torch.Tensor, N: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """q - 8 of rows [start, stop) of a packed (N, K) matrix (`codes`: its bytes, (N, K/2)
        uint8), transposed into out (K, stop - start)."""
        K, R = out.shape[0], self.block_rows
        blocks_end = N // R * R
        if start < min(stop, blocks_end):
            end = min(stop, blocks_end)
            blocks = codes[start:end].view((end - start) // R, K, R // 2)  # byte [block, k, j]
            rows = out[:, :end - start].view(K, (end - start) // R, *((2, R // 2) if self.halves else (R // 2, 2)))
            low, high = (rows[:, :, 0], rows[:, :, 1]) if self.halves else (rows[..., 0], rows[..., 1])
            low.copy_((blocks & 0x0F).view(torch.int8).sub_(8).transpose(0, 1))
            high.copy_((blocks >> 4).view(torch.int8).sub_(8).transpose(0, 1))
        if stop > blocks_end:  # the last N % R rows: byte [k, j] holds rows 2j and 2j + 1
            pairs = codes[blocks_end:].view(K, (N - blocks_end) // 2)
            rows = out[:, blocks_end - start:].view(K, (N - blocks_end) // 2, 2)
            rows[..., 0].copy_((pairs & 0x0F).view(torch.int8).sub_(8))
            rows[..., 1].copy_((pairs >> 4).view(torch.int8).sub_(8))
        return out


# Every layout of PyTorch 2.13's CPU builds (its ATen/native/cpu/int4mm_kernel.cpp): AVX-512, AVX2, no vectors.
_KNOWN_LAYOUTS = (PackedLayout(64, True), PackedLayout(32, True), PackedLayout(32, False))


@functools.cache
def packed_layout() -> PackedLayout:
    """The layout this PyTorch, on this CPU, packs int4 weights in: Int4Linear reads the kernel's
    packed bytes itself (prefill, `.weight`), so it packs a probe (two full blocks of the widest
    layout and a last block of 16 rows) and keeps the known layout that reads it back; none is a
    clear error, never garbage decoded in a prefill."""
    N, K = 144, 64
    q = torch.arange(N * K).remainder(13).view(N, K).to(torch.uint8)  # no pattern of period 16
    codes = int4pack(q).view(torch.uint8).reshape(N, K // 2)
    for layout in _KNOWN_LAYOUTS:
        if torch.equal(layout.codes_t(codes, N, 0, N, torch.empty(K, N, dtype=torch.int8)).t() + 8, q):
            return layout
    raise UnsupportedError(f"PyTorch {torch.__version__} packs int4 weights in a layout LucidLM cannot read "
                           f"(CPU capability {torch.backends.cpu.get_cpu_capability()}); load with "
                           "dtype='float32' (or 'bfloat16'), or use PyTorch 2.13")
