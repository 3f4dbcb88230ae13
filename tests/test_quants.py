"""`lucidlm.loading.quants.dequantize` against outside references.

Oracle 1, every supported type: the `gguf` package's numpy reference (`gguf.quants`),
which llama.cpp's own Python tooling uses. The inputs are (a) what `gguf.quants.quantize`
makes from random float32 data, for the types it can quantize, and (b) random raw blocks
(every bit pattern is a valid block once its float16 scales are finite), for all types.

Oracle 2, the k-quants: LucidLM decodes Q4_K/Q5_K/Q6_K by calling `gguf.quants` itself,
so oracle 1 alone would compare that code with itself. For them we also decode random
blocks element by element, transcribing the super-block layout of ggml's
`ggml-common.h` and the loops of its C reference `dequantize_row_q*_K` by hand.

Every comparison is exact: both sides do the same float32 operations (one multiply,
then one add or subtract) in the same order, so the results are bit-identical.
"""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from lucidlm.errors import UnsupportedError
from lucidlm.loading.quants import SUPPORTED_TYPES, dequantize

ROWS = 3

# Types `gguf.quants.quantize` implements in numpy (0.19: not the k-quants).
QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]

# Byte offsets, inside one block, of the float16 scales (d, and m/dmin where present),
# from ggml-common.h. Random bytes there could spell inf/NaN; we overwrite them with
# finite values so that the comparison is about the decoding, not NaN propagation.
F16_SCALE_OFFSETS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def _ours(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    out = dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), int(T[type_name]), shape)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == shape
    return out.numpy()


def _reference(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, T[type_name]), dtype=np.float32).reshape(shape)


def _random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """n_blocks random blocks of `type_name` as (n_blocks, type_size) uint8, scales finite."""
    block_size, type_size = GGML_QUANT_SIZES[T[type_name]]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS.get(type_name, []):
        scales = rng.uniform(-2.0, 2.0, size=n_blocks).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


def test_every_supported_type_is_tested():
    assert sorted(SUPPORTED_TYPES) == sorted(QUANTIZABLE + K_QUANTS)


@pytest.mark.parametrize("type_name", QUANTIZABLE)
@pytest.mark.parametrize("shape", [(ROWS, 64), (2, ROWS, 96)], ids=["2d", "3d"])
def test_quantized_by_gguf_matches_gguf_dequantize(type_name, shape):
    rng = np.random.default_rng(sum(map(ord, type_name)) + len(shape))
    data = (rng.standard_normal(shape) * rng.uniform(0.01, 10.0, size=shape[:-1] + (1,))).astype(np.float32)
    raw = gguf.quants.quantize(data, T[type_name])
    expected = _reference(raw, type_name, shape)
    ours = _ours(raw, type_name, shape)
    np.testing.assert_array_equal(ours, expected)
    # Sanity check of the oracle: the round trip is close to the input, and rows differ.
    if type_name in ("F32", "F16", "BF16", "Q8_0"):
        np.testing.assert_allclose(ours, data, rtol=0.02, atol=0.02 * np.abs(data).max())
    assert not np.array_equal(ours[..., 0, :], ours[..., 1, :])


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"] + K_QUANTS)
def test_random_blocks_match_gguf_dequantize(type_name):
    rng = np.random.default_rng(7 + sum(map(ord, type_name)))
    block_size, _ = GGML_QUANT_SIZES[T[type_name]]
    blocks_per_row = 2 if block_size == 256 else 4
    raw = _random_blocks(type_name, ROWS * blocks_per_row, rng)
    shape = (ROWS, blocks_per_row * block_size)
    np.testing.assert_array_equal(_ours(raw, type_name, shape), _reference(raw, type_name, shape))


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_random_half_precision_bits_match_gguf(type_name):
    """Every 16-bit pattern, inf and NaN included, decodes as gguf decodes it."""
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    shape = (4, 1 << 14)
    ours, expected = _ours(raw, type_name, shape), _reference(raw, type_name, shape)
    np.testing.assert_array_equal(ours, expected)  # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected))


def test_random_f32_bits_match_gguf():
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=ROWS * 64 * 4, dtype=np.uint8)
    shape = (ROWS, 64)
    ours = _ours(raw, "F32", shape)
    assert ours.view(np.uint32).tobytes() == _reference(raw, "F32", shape).view(np.uint32).tobytes()


# ----- k-quants decoded by hand from ggml's layout (oracle 2) -----

def _f16(block: np.ndarray, offset: int) -> np.float32:
    return np.float32(block[offset : offset + 2].view(np.float16)[0])


def _k4_scale_min(scales: np.ndarray, j: int) -> tuple[int, int]:
    """ggml's get_scale_min_k4: eight 6-bit (scale, min) pairs packed into 12 bytes."""
    q = [int(b) for b in scales]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _q4_k_block(b: np.ndarray) -> list[np.float32]:
    # d f16 | dmin f16 | scales[12] | qs[128]
    d, dmin, scales, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:144]
    out = []
    for chunk in range(4):  # 64 values per chunk: 32 low nibbles, then 32 high nibbles
        q = qs[32 * chunk : 32 * chunk + 32]
        for half, shift in ((0, 0), (1, 4)):
            sc, m = _k4_scale_min(scales, 2 * chunk + half)
            d1, m1 = d * np.float32(sc), dmin * np.float32(m)
            out += [d1 * np.float32((int(x) >> shift) & 0x0F) - m1 for x in q]
    return out


def _q5_k_block(b: np.ndarray) -> list[np.float32]:
    # d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
    d, dmin, scales, qh, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:48], b[48:176]
    out = []
    for chunk in range(4):
        q = qs[32 * chunk : 32 * chunk + 32]
        for half, shift in ((0, 0), (1, 4)):
            sc, m = _k4_scale_min(scales, 2 * chunk + half)
            d1, m1 = d * np.float32(sc), dmin * np.float32(m)
            high_bit = 2 * chunk + half  # the fifth bit of value l is bit (2*chunk+half) of qh[l]
            out += [d1 * np.float32(((int(x) >> shift) & 0x0F) | (((int(h) >> high_bit) & 1) << 4)) - m1
                    for x, h in zip(q, qh)]
    return out


def _q6_k_block(b: np.ndarray) -> list[np.float32]:
    # ql[128] | qh[64] | scales int8[16] | d f16
    ql, qh, scales, d = b[0:128], b[128:192], b[192:208].view(np.int8), _f16(b, 208)
    out = [np.float32(0)] * 256
    for half in range(2):  # 128 values per half
        lo, hi, sc = ql[64 * half : 64 * half + 64], qh[32 * half : 32 * half + 32], scales[8 * half : 8 * half + 8]
        for l in range(32):
            h = int(hi[l])
            q = [
                (int(lo[l]) & 0x0F) | ((h & 3) << 4),
                (int(lo[l + 32]) & 0x0F) | (((h >> 2) & 3) << 4),
                (int(lo[l]) >> 4) | (((h >> 4) & 3) << 4),
                (int(lo[l + 32]) >> 4) | (((h >> 6) & 3) << 4),
            ]
            for k in range(4):
                scale = d * np.float32(sc[l // 16 + 2 * k])
                out[128 * half + 32 * k + l] = scale * np.float32(q[k] - 32)
    return out


HAND_DECODERS = {"Q4_K": _q4_k_block, "Q5_K": _q5_k_block, "Q6_K": _q6_k_block}


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_k_quants_match_hand_decoding_of_ggml_layout(type_name):
    rng = np.random.default_rng(11 + sum(map(ord, type_name)))
    raw = _random_blocks(type_name, 2, rng)  # 2 rows of one 256-value super-block each
    expected = np.array([HAND_DECODERS[type_name](block) for block in raw], dtype=np.float32)
    np.testing.assert_array_equal(_ours(raw, type_name, (2, 256)), expected)


# ----- types we do not decode -----

@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "IQ2_XXS", "IQ4_NL", "Q8_1", "I32"])
def test_unsupported_type_names_the_type(type_name):
    block_size, type_size = GGML_QUANT_SIZES[T[type_name]]
    raw = np.zeros(ROWS * type_size, dtype=np.uint8)
    with pytest.raises(UnsupportedError, match=type_name):
        dequantize(raw, int(T[type_name]), (ROWS, block_size), name="blk.0.attn_q.weight")


def test_unknown_type_id_is_unsupported():
    with pytest.raises(UnsupportedError, match="99"):
        dequantize(np.zeros(64, dtype=np.uint8), 99, (4, 16), name="blk.0.attn_q.weight")
