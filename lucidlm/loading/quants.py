"""Decoding ggml tensor encodings (float and block-quantized) into float32 PyTorch tensors.

A block-quantized row is a sequence of fixed-size blocks; each block stores a few scale
numbers and `block_size` small integers, and an element is reconstructed as
`scale * q (+ min)`. Layouts (from ggml's `ggml-common.h`):

    Q8_0  32 values, 34 bytes: d f16 | q int8[32]                      x = d*q
    Q4_0  32 values, 18 bytes: d f16 | qs u8[16]                       x = d*(q-8)
    Q4_1  32 values, 20 bytes: d f16 | m f16 | qs u8[16]               x = d*q + m
    Q5_0  32 values, 22 bytes: d f16 | qh u32 | qs u8[16]              x = d*(q-16)
    Q5_1  32 values, 24 bytes: d f16 | m f16 | qh u32 | qs u8[16]      x = d*q + m

    Q4_K  256 values, 144 bytes: d f16 | dmin f16 | scales u8[12] | qs u8[128]
          8 sub-blocks of 32, each with a 6-bit scale sc and 6-bit min m:  x = d*sc*q - dmin*m

In the 4-bit nibbles `qs[j]`, the low nibble is element j and the high nibble element
j+16; for the 5-bit types bit j of `qh` is the fifth bit of element j. Q5_K and Q6_K are
decoded with the `gguf` package's reference numpy implementation.

The 4-bit types Q4_0, Q4_1 and Q4_K all mean `scale * q + offset` per group of 32 values
with q in 0..15; `affine_4bit` returns them in that form, which `models.packed.Int4Linear`
multiplies with directly (no float copy of the weights is ever made).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ModelFileError, UnsupportedError


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_size: int  # values per block
    type_size: int  # bytes per block


# Every type whose size we know, so any file's directory can be checked for truncation.
GGML_TYPES = {
    0: GGMLType("F32", 1, 4), 1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18), 3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22), 7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34), 9: GGMLType("Q8_1", 32, 36),
    10: GGMLType("Q2_K", 256, 84), 11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144), 13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210), 15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66), 17: GGMLType("IQ2_XS", 256, 74),
    18: GGMLType("IQ3_XXS", 256, 98), 19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18), 21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82), 23: GGMLType("IQ4_XS", 256, 136),
    24: GGMLType("I8", 1, 1), 25: GGMLType("I16", 1, 2), 26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8), 28: GGMLType("F64", 1, 8), 29: GGMLType("IQ1_M", 256, 56),
    30: GGMLType("BF16", 1, 2), 34: GGMLType("TQ1_0", 256, 54), 35: GGMLType("TQ2_0", 256, 66),
}

AFFINE_4BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def tensor_nbytes(ggml_type: int, dims: tuple[int, ...], name: str) -> int:
    """Bytes a tensor of `dims` (ggml order) occupies in `ggml_type`."""
    if ggml_type not in GGML_TYPES:
        raise UnsupportedError(f"tensor '{name}' has unknown ggml type id {ggml_type}")
    t = GGML_TYPES[ggml_type]
    n = math.prod(dims)  # Python ints: corrupt huge dims must not wrap around as int64 would
    if dims and dims[0] % t.block_size:
        raise ModelFileError(f"tensor '{name}': row length {dims[0]} is not a multiple of the {t.name} block size")
    return n // t.block_size * t.type_size


def check_supported(ggml_type: int, name: str) -> None:
    """Raise a clear error if LucidLM cannot decode this tensor type."""
    if ggml_type not in GGML_TYPES:
        raise UnsupportedError(f"tensor '{name}' has unknown ggml type id {ggml_type}")
    type_name = GGML_TYPES[ggml_type].name
    if type_name not in SUPPORTED_TYPES:
        raise UnsupportedError(
            f"tensor '{name}' uses ggml type {type_name}, which LucidLM does not support "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of every block read as a float16 scale, as float32 (N, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16) bytes -> (N, 32) 4-bit values: low nibbles are elements 0..15, high 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(qh_bytes: torch.Tensor) -> torch.Tensor:
    """(N, 4) bytes of a little-endian u32 -> (N, 32) values 0 or 16 (bit j of qh -> element j)."""
    qh = qh_bytes.long()
    qh = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
    bits = (qh[:, None] >> torch.arange(32)) & 1
    return (bits << 4).to(torch.uint8)


def _dequantize_blocks(type_name: str, blocks: torch.Tensor) -> torch.Tensor:
    """blocks (N, type_size) uint8 -> values (N, 32) float32 for the 32-value block types."""
    if type_name == "Q8_0":
        return _f16(blocks, 0) * blocks[:, 2:34].contiguous().view(torch.int8).float()
    if type_name == "Q4_0":
        return _f16(blocks, 0) * (_nibbles(blocks[:, 2:18]).float() - 8)
    if type_name == "Q4_1":
        return _f16(blocks, 0) * _nibbles(blocks[:, 4:20]).float() + _f16(blocks, 2)
    if type_name == "Q5_0":
        q = _nibbles(blocks[:, 6:22]) | _fifth_bits(blocks[:, 2:6])
        return _f16(blocks, 0) * (q.float() - 16)
    if type_name == "Q5_1":
        q = _nibbles(blocks[:, 8:24]) | _fifth_bits(blocks[:, 4:8])
        return _f16(blocks, 0) * q.float() + _f16(blocks, 2)
    raise AssertionError(type_name)


def _q4_k_sub_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 packed bytes per super-block (N, 12) -> 6-bit scales and mins, each (N, 8).

    Sub-blocks 0-3 keep their scale and min in the low 6 bits of bytes 0-3 and 4-7; for
    sub-blocks 4-7 the low 4 bits sit in bytes 8-11 and the top 2 bits in the spare top
    bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    s = scales.long()
    low_sc, low_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    high_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([low_sc, high_sc], dim=1), torch.cat([low_m, high_m], dim=1)


def affine_4bit(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...],
                name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0/Q4_1/Q4_K matrix as (q, scale, offset) with value = scale * q + offset per 32-group.

    shape (N, K) -> q (N, K) uint8 in 0..15, scale and offset (N, K/32) float32.
    """
    check_supported(ggml_type, name)
    t = GGML_TYPES[ggml_type]
    if t.name not in AFFINE_4BIT_TYPES:
        raise UnsupportedError(f"tensor '{name}' is {t.name}, not one of the 4-bit types {AFFINE_4BIT_TYPES}")
    N, K = shape
    blocks = torch.from_numpy(raw.copy()).view(-1, t.type_size)
    if t.name == "Q4_0":  # d*(q-8)
        d = _f16(blocks, 0)
        q, scale, offset = _nibbles(blocks[:, 2:18]), d, -8 * d
    elif t.name == "Q4_1":  # d*q + m
        q, scale, offset = _nibbles(blocks[:, 4:20]), _f16(blocks, 0), _f16(blocks, 2)
    else:  # Q4_K: d*sc*q - dmin*m, sub-block by sub-block
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (B, 1)
        sc, m = _q4_k_sub_scales(blocks[:, 4:16])  # (B, 8)
        qs = blocks[:, 16:144].reshape(-1, 4, 32)  # 4 chunks of 32 bytes = 64 values each
        # Chunk j: low nibbles are values 64j..64j+31 (sub-block 2j), high nibbles the next 32.
        q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 256)
        scale, offset = d * sc.float(), -dmin * m.float()  # (B, 8)
    return q.reshape(N, K), scale.reshape(N, K // 32), offset.reshape(N, K // 32)


def q8_0_parts(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 matrix (N, K) as its int8 values (N, K) and per-32 scales (N, K/32) float32."""
    N, K = shape
    blocks = torch.from_numpy(raw.copy()).view(-1, 34)
    return blocks[:, 2:34].contiguous().view(torch.int8).reshape(N, K), _f16(blocks, 0).reshape(N, K // 32)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """Decode a tensor's encoded bytes `raw` (uint8) into a float32 tensor of PyTorch `shape`."""
    check_supported(ggml_type, name)
    t = GGML_TYPES[ggml_type]
    if t.name == "F32":
        values = torch.from_numpy(raw.view(np.float32).copy())
    elif t.name == "F16":
        values = torch.from_numpy(raw.view(np.float16).astype(np.float32))
    elif t.name == "BF16":
        # bfloat16 is the top half of a float32: shift the 16 bits into place.
        bits = raw.view(np.uint16).astype(np.uint32) << 16
        values = torch.from_numpy(bits.view(np.float32))
    elif t.name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        blocks = torch.from_numpy(raw.copy()).view(-1, t.type_size)
        values = _dequantize_blocks(t.name, blocks)
    elif t.name == "Q4_K":
        q, scale, offset = affine_4bit(raw, ggml_type, (math.prod(shape) // 256 * 8, 32), name)
        values = q.float() * scale + offset
    else:  # Q5_K, Q6_K
        from gguf.quants import dequantize as gguf_dequantize

        values = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, ggml_type), dtype=np.float32))
    return values.reshape(shape)
