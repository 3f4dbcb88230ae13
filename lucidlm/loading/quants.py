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
j+16; for the 5-bit types bit j of `qh` is the fifth bit of element j. Q6_K is laid out in
`_q6_k`; Q5_K is decoded with the `gguf` package's reference numpy implementation.

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
AFFINE_5BIT_TYPES = ("Q5_0", "Q5_1")
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


def _blocks(raw: np.ndarray, type_size: int) -> np.ndarray:
    """The encoded bytes as (N, type_size) blocks: a view of `raw` (the mapped file), no copy.

    The decoders below read these views directly and write each result once, into a new
    array: no copy of the file's bytes and no full-size temporaries beyond the output."""
    return raw.reshape(-1, type_size)


def _f16(blocks: np.ndarray, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of every block read as a float16 scale, as float32 (N, 1)."""
    # Block sizes and scale offsets are even in every ggml type: the blocks read as float16 columns.
    halves = blocks.view(np.float16)[:, start // 2]
    return torch.from_numpy(halves.astype(np.float32).reshape(-1, 1))


_LOW_NIBBLES = np.uint64(0x0F0F_0F0F_0F0F_0F0F)


def _nibbles(qs: np.ndarray, chunk: int = 16) -> np.ndarray:
    """(N, B) bytes -> (N, 2B) 4-bit values, `chunk` bytes at a time: the low nibbles of a
    chunk's bytes are its first `chunk` values, the high nibbles the next `chunk`.

    (chunk 16 for the 32-value blocks: low nibbles are elements 0..15, high 16..31.)
    Eight bytes at a time, as uint64 columns: numpy then runs a few long loops down the
    columns instead of a short loop for each of millions of blocks (3x faster)."""
    n, n_bytes = qs.shape
    try:
        words = qs.view(np.uint64)  # (N, B/8)
    except ValueError:  # numpy < 1.23 views only contiguous arrays as a wider type
        words = np.ascontiguousarray(qs).view(np.uint64)
    out = np.empty((n, 2 * n_bytes), dtype=np.uint8)
    out_words = out.view(np.uint64)  # (N, B/4)
    per_chunk = chunk // 8
    for c in range(n_bytes // 8):
        low = c // per_chunk * 2 * per_chunk + c % per_chunk  # where the chunk's low nibbles go
        high = low + per_chunk
        np.bitwise_and(words[:, c], _LOW_NIBBLES, out=out_words[:, low])
        np.right_shift(words[:, c], np.uint64(4), out=out_words[:, high])
        np.bitwise_and(out_words[:, high], _LOW_NIBBLES, out=out_words[:, high])
    return out


def _fifth_bits(qh_bytes: np.ndarray) -> np.ndarray:
    """(N, 4) bytes of a little-endian u32 -> (N, 32) values 0 or 16 (bit j of qh -> element j)."""
    bits = np.unpackbits(np.ascontiguousarray(qh_bytes).reshape(-1), bitorder="little")
    return np.left_shift(bits, 4, out=bits).reshape(-1, 32)


def _times(values: np.ndarray, scale: torch.Tensor) -> torch.Tensor:
    """Small integers (N, 32) (uint8 or int8) times the per-block float32 scales (N, 1)."""
    return torch.from_numpy(values.astype(np.float32)).mul_(scale)


def _dequantize_blocks(type_name: str, blocks: np.ndarray) -> torch.Tensor:
    """blocks (N, type_size) uint8 -> values (N, 32) float32 for the 32-value block types.

    The products of a float16 scale and a small integer are exact in float32, so only
    Q4_1/Q5_1's `+ m` rounds, as in ggml: the order of the operations does not matter."""
    if type_name == "Q8_0":
        return _times(*_q8_0_fields(blocks))
    if type_name == "Q4_0":
        q = _nibbles(blocks[:, 2:18])
        q -= 8  # q - 8 as int8 (uint8 arithmetic wraps: 0..7 -> 248..255 = -8..-1)
        return _times(q.view(np.int8), _f16(blocks, 0))
    if type_name == "Q4_1":
        return _times(_nibbles(blocks[:, 4:20]), _f16(blocks, 0)).add_(_f16(blocks, 2))
    if type_name in ("Q5_0", "Q5_1"):  # d*q + offset: exact for Q5_0 too (d*q and 16 d are, and so their difference)
        q, d, offset = _q5_fields(type_name, blocks)
        return _times(q, d).add_(offset)
    raise AssertionError(type_name)


def _q4_k_sub_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes per super-block (N, 12) -> 6-bit scales and mins, each (N, 8) uint8.

    Sub-blocks 0-3 keep their scale and min in the low 6 bits of bytes 0-3 and 4-7; for
    sub-blocks 4-7 the low 4 bits sit in bytes 8-11 and the top 2 bits in the spare top
    bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    s = scales
    low_sc, low_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    high_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return np.concatenate([low_sc, high_sc], axis=1), np.concatenate([low_m, high_m], axis=1)


def _q6_k(blocks: np.ndarray) -> torch.Tensor:
    """Q6_K super-blocks (B, 210) -> values (B, 256) float32: x = d * sc * (q - 32).

    Layout: ql u8[128] | qh u8[64] | sc i8[16] | d f16. Each half of 128 values takes 64
    bytes of ql and 32 of qh: values 0-31 and 32-63 of the half are the low nibbles of
    ql[0:32] and ql[32:64], values 64-95 and 96-127 their high nibbles; their top two bits
    are bits 0-1, 2-3, 4-5 and 6-7 of qh[0:32]. Every 16 values share one scale sc.
    (The `gguf` package's reference, transcribed with fewer temporaries: d * sc * q is
    exact in float32, at most 11 + 7 + 5 significant bits, so the results are bit-identical.)
    """
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 1, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    low = np.right_shift(ql, np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1))  # (B, 2, 2, 64)
    low &= 0x0F
    high = np.right_shift(qh, np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1))  # (B, 2, 4, 32)
    high &= 3
    high <<= 4
    high |= low.reshape(n, 2, 4, 32)
    high -= 32  # q - 32 as int8 (uint8 arithmetic wraps: 0..31 -> 224..255 = -32..-1)
    scales = _f16(blocks, 208) * torch.from_numpy(blocks[:, 192:208].view(np.int8).astype(np.float32))  # (B, 16)
    return _times(high.reshape(n, 16, 16).view(np.int8), scales.unsqueeze(-1)).view(n, 256)


def _typed_blocks(raw: np.ndarray, ggml_type: int, name: str, types: tuple[str, ...],
                  kind: str) -> tuple[str, np.ndarray]:
    """The type's name and the tensor's blocks (N, type_size), if its type is one of `types`."""
    check_supported(ggml_type, name)
    t = GGML_TYPES[ggml_type]
    if t.name not in types:
        raise UnsupportedError(f"tensor '{name}' is {t.name}, not one of the {kind} types {types}")
    return t.name, _blocks(raw, t.type_size)


def affine_4bit(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...],
                name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0/Q4_1/Q4_K matrix as (q, scale, offset) with value = scale * q + offset per 32-group.

    shape (N, K) -> q (N, K) uint8 in 0..15, scale and offset (N, K/32) float32.
    """
    type_name, blocks = _typed_blocks(raw, ggml_type, name, AFFINE_4BIT_TYPES, "4-bit")
    N, K = shape
    if type_name == "Q4_0":  # d*(q-8)
        d = _f16(blocks, 0)
        q, scale, offset = _nibbles(blocks[:, 2:18]), d, -8 * d
    elif type_name == "Q4_1":  # d*q + m
        q, scale, offset = _nibbles(blocks[:, 4:20]), _f16(blocks, 0), _f16(blocks, 2)
    else:  # Q4_K: d*sc*q - dmin*m, sub-block by sub-block
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (B, 1)
        sc, m = _q4_k_sub_scales(blocks[:, 4:16])  # (B, 8)
        # 4 chunks of 32 bytes = 64 values each. Chunk j: low nibbles are values 64j..64j+31
        # (sub-block 2j), high nibbles the next 32.
        q = _nibbles(blocks[:, 16:144], chunk=32)
        scale, offset = d * torch.from_numpy(sc).float(), -dmin * torch.from_numpy(m).float()  # (B, 8)
    return torch.from_numpy(q).reshape(N, K), scale.reshape(N, K // 32), offset.reshape(N, K // 32)


def affine_5bit(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...],
                name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q5_0/Q5_1 matrix as (q, scale, offset) with value = scale * q + offset per 32-group,
    as `affine_4bit` (q in 0..31): Q5_0 d*(q-16) -> scale d, offset -16 d; Q5_1 d*q + m."""
    type_name, blocks = _typed_blocks(raw, ggml_type, name, AFFINE_5BIT_TYPES, "5-bit")
    N, K = shape
    q, d, offset = _q5_fields(type_name, blocks)
    return torch.from_numpy(q).reshape(N, K), d.reshape(N, K // 32), offset.reshape(N, K // 32)


def _q5_fields(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Q5_0/Q5_1 blocks (N, 22 or 24) -> values q (N, 32) uint8 in 0..31, scale d and offset (N, 1)
    float32, value = d * q + offset (Q5_0: offset -16 d)."""
    start = 2 if type_name == "Q5_0" else 4  # the fifth bits follow d (and m)
    q = np.bitwise_or(_fifth_bits(blocks[:, start:start + 4]), _nibbles(blocks[:, start + 4:start + 20]))
    d = _f16(blocks, 0)
    return q, d, (-16 * d if type_name == "Q5_0" else _f16(blocks, 2))


def _q8_0_fields(blocks: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """Q8_0 blocks (N, 34) -> their values (N, 32) int8, a view of the blocks, and scales d (N, 1)."""
    return blocks[:, 2:34].view(np.int8), _f16(blocks, 0)


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
        values = _dequantize_blocks(t.name, _blocks(raw, t.type_size))
    elif t.name == "Q4_K":
        q, scale, offset = affine_4bit(raw, ggml_type, (math.prod(shape) // 256 * 8, 32), name)
        values = q.float().mul_(scale).add_(offset)
    elif t.name == "Q6_K":
        values = _q6_k(_blocks(raw, t.type_size))
    else:  # Q5_K
        from gguf.quants import dequantize as gguf_dequantize

        values = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, ggml_type), dtype=np.float32))
    return values.reshape(shape)
