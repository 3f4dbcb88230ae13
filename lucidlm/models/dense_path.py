"""The dense path of the packed layers (`models.packed`): many rows at once, on the decoded weight.

A prefill multiplies hundreds of rows by each weight. PyTorch's weight-only int4/int8 kernels
unpack the weight again for every block of rows, so from DENSE_FROM_ROWS rows on, a packed layer
decodes its weight once per call, into a reused buffer, and runs one dense matmul: in float32,
or in bfloat16 where the CPU has AVX-512 BF16 (`DENSE_DTYPE`). The layers supply the decoding
(`weight_rows`); this module owns when, in what dtype, into which memory and in what slices.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn.functional as F

# With many rows (a prefill) it pays to unpack the weight once per call and run a dense
# matmul, instead of the weight-only kernels, which redo their unpacking for every block of
# rows. `python bench/kernels.py` (2 threads, SmolLM2's shapes; µs per call, int4 kernel /
# unpack + dense matmul):
#   AVX2 CPU, float32 dense: 64 rows 916 / 1492 (576x576), 2492 / 3152 (1536x576);
#     128 rows 1879 / 1780, 5268 / 4218; 512 rows 6762 / 5691, 18799 / 9688.
#   AVX-512 BF16 CPU, bfloat16 dense (unpacking ~100 / ~500 µs): 64 rows 134 / 211, 331 / 708;
#     128 rows 259 / 244, 663 / 842; 512 rows 1018 / 525, 2643 / 1616. (float32 dense there:
#     512 rows 1852, 5127: slower than the kernel.)
DENSE_FROM_ROWS = 128


def has_avx512_bf16() -> bool:
    """Whether this CPU has AVX-512 BF16 (bfloat16 dot products into float32): bfloat16 matmuls are fast."""
    is_supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # (a private helper of PyTorch's)
    return bool(is_supported and is_supported())


# The dense path's matmul dtype. bfloat16 where the CPU has AVX-512 BF16 (dot products of
# bfloat16 pairs into float32: a 512-row SmolLM2 prefill 683 -> 1472 tok/s on a 2-core Zen 5,
# next-token KL 0.002 from the float32 dense path); float32 elsewhere, where bfloat16 matmuls
# are emulated and 5-10x slower than float32.
DENSE_DTYPE = torch.bfloat16 if has_avx512_bf16() else torch.float32


# Prefill's dense path decodes a weight (to DENSE_DTYPE) on every call. It does so into one
# buffer per thread, reused, rather than a fresh tensor: multi-megabyte blocks come fresh from
# the system as zero-filled pages, and faulting those in cost more than the decoding (SmolLM2,
# 512-token prompt: ~400 ms of ~1.6 s went to decoding weights into new memory), and layers
# larger than DENSE_CHUNK weights (an LM head) go a slice of rows at a time, so the buffer
# stays small (16 MiB in float32; Gemma's head whole would be 671 MB).
DENSE_CHUNK = 2**22


class _DecodeBuffer(threading.local):
    tensor = torch.empty(0)  # weights are decoded into it


_DECODE_BUFFER = _DecodeBuffer()


def _decode_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    # Fresh memory where autograd may keep the weight for a backward pass, or where the code
    # is being traced (torch.compile).
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return torch.empty(numel, dtype=dtype)
    buffer = _DECODE_BUFFER.tensor
    if buffer.numel() < numel or buffer.dtype != dtype:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buffer = torch.empty(numel, dtype=dtype)
        _DECODE_BUFFER.tensor = buffer
    return buffer[:numel]


def dense_matmul(x: torch.Tensor, out_features: int, weight_rows: Callable[[int, int, torch.Tensor], torch.Tensor],
                  align: int, transposed: bool) -> torch.Tensor:
    """x (M, K) times Wᵀ as DENSE_DTYPE matmuls, float32 out, on the weight the kernels multiply
    with, decoded (in float32, then rounded once to DENSE_DTYPE). weight_rows(start, stop, out)
    decodes rows [start, stop) of W into `out`, a (rows, K) view of a DENSE_DTYPE buffer;
    `transposed`: the layer decodes columns of a (K, rows) matrix (Int4Linear's layout), so the
    buffer is laid out that way. Slices start at multiples of `align`."""
    K = x.shape[-1]
    x = x.to(DENSE_DTYPE)

    def product(i: int, j: int) -> torch.Tensor:  # x times rows [i, j) of W
        w = _decode_buffer(K * (j - i), DENSE_DTYPE)
        w = w.view(K, j - i).t() if transposed else w.view(j - i, K)  # (j - i, K)
        weight_rows(i, j, w)
        return F.linear(x, w).float()

    step = max(align, DENSE_CHUNK // K // align * align)
    if step >= out_features:
        return product(0, out_features)
    return torch.cat([product(i, min(i + step, out_features)) for i in range(0, out_features, step)], dim=-1)
