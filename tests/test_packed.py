"""The packed CPU path (`lucidlm.models.packed`, `load(..., dtype="packed")`) against outside oracles.

- Decoding (`affine_4bit`, Q8Embedding's Q8_0 blocks, the torch Q4_K decoder): the `gguf` package's
  numpy reference `gguf.quants.dequantize`, bit for bit, on random blocks (every bit
  pattern is a valid block once its float16 scales are finite) and on blocks made by
  `gguf.quants.quantize`.
- Int4Linear / Int8Linear / Q8Embedding: the weight matrices decoded by `gguf.quants`,
  multiplied in float64. Both row paths (the weight-only kernels for fewer than
  DENSE_FROM_ROWS rows, a float32 matmul on the decoded matrix for more) take bfloat16
  activations and bfloat16 scales and return bfloat16, so their error is bounded element
  by element by bfloat16 rounding (unit roundoff u = 2^-8); the bound is derived in
  `_kernel_bound`. The bounds also hold for a float32 dense path or an exact `.weight`.
- Loading a tiny random Llama written to GGUF: HF transformers' logits on the same
  (gguf-dequantized) weights.
- The real models (slow): the same file loaded exactly in float32 (itself checked
  against HF transformers in test_models_llama.py / test_models_gemma3.py).
"""

from __future__ import annotations

import gc
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

import lucidlm
from lucidlm.errors import InvalidArgumentError, UnsupportedError
from lucidlm.generate import generate_tokens
from lucidlm.loading.quants import affine_4bit, dequantize
from lucidlm.models.packed import DENSE_FROM_ROWS, GROUP, Int4Linear, Int8Linear, Q8Embedding
from lucidlm.sampling import SamplingParams, make_sampler
from prompts import PASSAGE

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
TEXT = PASSAGE[: len(PASSAGE) // 2]  # one copy of the passage: ~300 tokens of English

# Byte offsets of the float16 scales inside one block (ggml-common.h).
F16_SCALE_OFFSETS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2]}

# These tests are about PyTorch's weight-only kernels: they run there even where ours would.
pytestmark = pytest.mark.usefixtures("pytorch_weight_only_kernels")


def _random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks (n_blocks, type_size) uint8 whose float16 scales are finite and sane:
    magnitudes log-uniform over 1e-4..4 (some float16 subnormals), both signs."""
    _, type_size = GGML_QUANT_SIZES[T[type_name]]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[type_name]:
        scales = (rng.choice([-1.0, 1.0], n_blocks) * np.exp(rng.uniform(np.log(1e-4), np.log(4.0), n_blocks)))
        raw[:, offset : offset + 2] = scales.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


def _gguf_matrix(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """The reference decoding of an (N, K) matrix: gguf.quants.dequantize, float32."""
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, T[type_name]), dtype=np.float32).reshape(shape))


def _random_4bit_matrix(type_name: str, shape: tuple[int, int], seed: int, made_by_gguf: bool):
    """Raw bytes of an (N, K) matrix of a 4-bit type: random blocks, or gguf's quantization
    of random Gaussian rows of different magnitudes (Q4_0/Q4_1 only)."""
    rng = np.random.default_rng(seed)
    N, K = shape
    if made_by_gguf:
        data = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, size=(N, 1))).astype(np.float32)
        return np.ascontiguousarray(gguf.quants.quantize(data, T[type_name])).reshape(-1)
    block_size, _ = GGML_QUANT_SIZES[T[type_name]]
    return _random_blocks(type_name, N * K // block_size, rng).reshape(-1)


def _affine_value(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """q * scale + offset per group of 32, in float32: one multiply, then one add."""
    N, K = q.shape
    groups = q.float().view(N, K // GROUP, GROUP) * scale.unsqueeze(-1)
    return (groups + offset.unsqueeze(-1)).view(N, K)


FOUR_BIT_CASES = [("Q4_0", False), ("Q4_0", True), ("Q4_1", False), ("Q4_1", True), ("Q4_K", False)]
FOUR_BIT_IDS = ["q4_0-random", "q4_0-quantized", "q4_1-random", "q4_1-quantized", "q4_k-random"]
# every 4-bit case without a bias, two of them with one (the loader never passes one; the module supports it)
LAYER_CASES = [(t, g, False) for t, g in FOUR_BIT_CASES] + [("Q4_1", True, True), ("Q4_K", False, True)]
LAYER_IDS = FOUR_BIT_IDS + ["q4_1-quantized-bias", "q4_k-random-bias"]


# ----- 1. decoding into the packed form, against gguf.quants -----

@pytest.mark.parametrize(("type_name", "made_by_gguf"), FOUR_BIT_CASES, ids=FOUR_BIT_IDS)
def test_affine_4bit_equals_gguf_dequantize(type_name, made_by_gguf):
    shape = (24, 512)
    raw = _random_4bit_matrix(type_name, shape, seed=len(type_name) + made_by_gguf, made_by_gguf=made_by_gguf)
    q, scale, offset = affine_4bit(raw, int(T[type_name]), shape)
    assert q.dtype == torch.uint8 and tuple(q.shape) == shape
    assert int(q.min()) == 0 and int(q.max()) == 15  # the whole 4-bit range occurs
    assert scale.dtype == offset.dtype == torch.float32
    assert tuple(scale.shape) == tuple(offset.shape) == (shape[0], shape[1] // GROUP)
    expected = _gguf_matrix(raw, type_name, shape)
    assert expected.abs().max() > 0 and torch.isfinite(expected).all()
    assert torch.equal(_affine_value(q, scale, offset), expected)


@pytest.mark.parametrize("shape", [(6, 512), (2, 3, 256)], ids=["2d", "3d"])
def test_q4_k_dequantize_equals_gguf(shape):
    raw = _random_blocks("Q4_K", math.prod(shape) // 256, np.random.default_rng(7)).reshape(-1)
    ours = dequantize(raw, int(T.Q4_K), shape)
    expected = np.asarray(gguf.quants.dequantize(raw, T.Q4_K), dtype=np.float32).reshape(shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    np.testing.assert_array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("made_by_gguf", [False, True], ids=["random", "quantized"])
def test_q8_embedding_decodes_the_file_blocks_as_gguf_does(made_by_gguf):
    """Q8Embedding reads the file's Q8_0 bytes as they are (float16 scale, 32 int8 values)."""
    N, K = 20, 256
    rng = np.random.default_rng(3)
    if made_by_gguf:
        data = (rng.standard_normal((N, K)) * rng.uniform(0.01, 3.0, size=(N, 1))).astype(np.float32)
        raw = np.ascontiguousarray(gguf.quants.quantize(data, T.Q8_0)).reshape(-1)
    else:
        raw = _random_blocks("Q8_0", N * K // 32, rng).reshape(-1)
    table = Q8Embedding(torch.from_numpy(raw.copy()), (N, K))
    assert table.blocks.dtype == torch.uint8 and table.blocks.numel() == raw.size  # the bytes, not decoded
    assert torch.equal(table.weight, _gguf_matrix(raw, "Q8_0", (N, K)))
    with pytest.raises(ValueError, match="not a Q8_0 table"):
        Q8Embedding(torch.from_numpy(raw[:-34].copy()), (N, K))


def test_affine_4bit_rejects_other_types():
    raw = _random_blocks("Q8_0", 2, np.random.default_rng(0)).reshape(-1)
    with pytest.raises(UnsupportedError, match="Q8_0"):
        affine_4bit(raw, int(T.Q8_0), (2, 32))


# ----- 2. Int4Linear against the gguf-decoded matrix in float64 -----
#
# Both row paths take bfloat16 activations and the kernel's bfloat16 scales and zeros
# (the dense path for many rows computes the same numbers with a float32 matmul, so that a
# prompt gives the same logits at once or token by token), and return bfloat16.

def _kernel_bound(x: torch.Tensor, w_abs_err: torch.Tensor, w_abs: torch.Tensor, ref: torch.Tensor,
                  weights_rounded: bool = False) -> torch.Tensor:
    """Element-wise bound on |layer(x) - x Wᵀ| for a layer that rounds x to bfloat16, uses
    weights off by at most `w_abs_err` (bfloat16 scales), accumulates in float32 and rounds
    the output to bfloat16:

        |x̃ w̃ - x w| <= |x̃| |w̃ - w| + |x̃ - x| |w| <= (1+u) |x| w_abs_err + u |x| |w|
        float32 accumulation over K terms: K 2^-24 |x| |w|;  output rounding: u |y|

    weights_rounded: the decoded weights are rounded to bfloat16 as well (the dense path where
    DENSE_DTYPE is bfloat16), u |w̃| more per weight: w_abs_err grows by u (|w| + w_abs_err).
    Everything in float64 (x (M, K); w_abs_err, w_abs (N, K); ref = x Wᵀ (M, N))."""
    K = x.shape[-1]
    xa = x.abs()
    if weights_rounded:
        w_abs_err = w_abs_err + U_BF16 * (w_abs + w_abs_err)
    total = (1 + U_BF16) * (xa @ w_abs_err.T) + (U_BF16 + K * 2.0**-24) * (xa @ w_abs.T)
    return 1.01 * (total + U_BF16 * (ref.abs() + total)) + 1e-30


def _int4_case(type_name: str, made_by_gguf: bool, shape=(48, 512), bias: bool = False):
    """(layer, the file's matrix by gguf, bias, bound on |weight the kernel uses - file matrix|)."""
    raw = _random_4bit_matrix(type_name, shape, seed=11 + made_by_gguf, made_by_gguf=made_by_gguf)
    q, scale, offset = affine_4bit(raw, int(T[type_name]), shape)
    b = torch.randn(shape[0], generator=torch.Generator().manual_seed(5)) if bias else None
    layer = Int4Linear(q, scale, offset, b)
    W = _gguf_matrix(raw, type_name, shape)
    # The kernel dequantizes (q - 8) * bf16(scale) + bf16(offset + 8 * scale) (its documented form).
    S = scale.double().repeat_interleave(GROUP, dim=1)
    Z = (offset.double() + 8 * scale.double()).repeat_interleave(GROUP, dim=1)
    w_err = U_BF16 * (8 * S.abs() + Z.abs())
    return layer, W, b, w_err


def _inputs(m: int, k: int, seed: int, lead=()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, m, k, generator=g) * 2  # float32, exactly representable in float64


def _reference(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ W.double().T
    return y if b is None else y + b.double()


def _assert_within_bound(y, x, W, b, w_err, what):
    from lucidlm.models import packed

    ref = _reference(x, W, b)
    dense_bf16 = x.reshape(-1, x.shape[-1]).shape[0] >= DENSE_FROM_ROWS and packed.DENSE_DTYPE == torch.bfloat16
    bound = _kernel_bound(x.double(), w_err, W.double().abs(), ref, weights_rounded=dense_bf16)
    excess = (y.double() - ref).abs() - bound
    assert excess.max() <= 0, f"{what}: exceeds the bfloat16 bound by {excess.max():.3g}"
    # The typical error is the bfloat16 rounding of the output (~u/sqrt(3) relative), far below 1 %.
    assert (y.double() - ref).norm() <= 1e-2 * ref.norm(), what
    assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max(), what


@pytest.mark.parametrize(("type_name", "made_by_gguf"), FOUR_BIT_CASES, ids=FOUR_BIT_IDS)
def test_int4_weight_is_the_file_matrix(type_name, made_by_gguf):
    """`.weight` (for introspection) is the file's matrix, up to the bfloat16 rounding of the
    scales the kernel computes with."""
    layer, W, _, w_err = _int4_case(type_name, made_by_gguf)
    assert (layer.out_features, layer.in_features) == tuple(W.shape)
    weight = layer.weight
    assert weight.dtype == torch.float32 and tuple(weight.shape) == tuple(W.shape)
    assert ((weight.double() - W.double()).abs() <= w_err * 1.01 + 2.0**-24 * W.double().abs()).all()


def test_int4_exact_when_scales_are_bfloat16_numbers():
    """Scales 2^e and offsets scale * (-120..120): scale, offset and zero = offset + 8 scale are
    all bfloat16 numbers, so the layer's weights are exactly q * scale + offset. The kernel (few
    rows) rounds x and its output to bfloat16: no other error. The dense path (many rows)
    computes in float32 throughout (only float32 accumulation error), or where DENSE_DTYPE is
    bfloat16 (AVX-512 BF16 CPUs) rounds x and the output as the kernel does (the weights, integers
    of -120..135 times a power of 2, are bfloat16 numbers)."""
    from lucidlm.models import packed

    N, K = 32, 256
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale = 2.0 ** torch.randint(-8, 3, (N, K // GROUP), generator=g).float()
    offset = scale * torch.randint(-120, 121, (N, K // GROUP), generator=g).float()
    layer = Int4Linear(q, scale, offset)
    W = _affine_value(q, scale, offset)
    assert torch.equal(layer.weight, W)
    for m in (1, 7, DENSE_FROM_ROWS - 1, DENSE_FROM_ROWS, 50):
        x = _inputs(m, K, seed=m)
        rounded = m < DENSE_FROM_ROWS or packed.DENSE_DTYPE == torch.bfloat16
        exact = (x.bfloat16() if rounded else x).double() @ W.double().T  # float64: no accumulation error to speak of
        accumulation = K * 2.0**-24 * (x.double().abs() @ W.double().abs().T)
        err = (layer(x).double() - exact).abs()
        output_rounding = U_BF16 if rounded else 2.0**-24
        assert (err <= output_rounding * (exact.abs() + accumulation) + accumulation).all(), m


@pytest.mark.parametrize(("type_name", "made_by_gguf", "bias"), LAYER_CASES, ids=LAYER_IDS)
def test_int4_kernel_path_within_bfloat16_bound(type_name, made_by_gguf, bias):
    """M = 1 .. DENSE_FROM_ROWS-1 rows: the int4 kernel."""
    layer, W, b, w_err = _int4_case(type_name, made_by_gguf, bias=bias)
    x_all = _inputs(DENSE_FROM_ROWS - 1, W.shape[1], seed=1)
    ref_all = _reference(x_all, W, b)
    bound_all = _kernel_bound(x_all.double(), w_err, W.double().abs(), ref_all)
    for m in range(1, DENSE_FROM_ROWS):
        x, ref, bound = x_all[-m:], ref_all[-m:], bound_all[-m:]
        y = layer(x)
        assert y.dtype == torch.float32 and tuple(y.shape) == (m, W.shape[0])
        excess = (y.double() - ref).abs() - bound
        assert excess.max() <= 0, f"M={m}: exceeds the bfloat16 bound by {excess.max():.3g}"
        assert (y.double() - ref).norm() <= 1e-2 * ref.norm(), f"M={m}"
        assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max(), f"M={m}"


@pytest.mark.parametrize(("type_name", "made_by_gguf", "bias"), LAYER_CASES, ids=LAYER_IDS)
def test_int4_dense_path_within_bfloat16_bound(type_name, made_by_gguf, bias):
    """M >= DENSE_FROM_ROWS rows: a float32 matmul on the decoded matrix."""
    layer, W, b, w_err = _int4_case(type_name, made_by_gguf, bias=bias)
    for m in (DENSE_FROM_ROWS, DENSE_FROM_ROWS + 1, DENSE_FROM_ROWS + 40):
        x = _inputs(m, W.shape[1], seed=100 + m)
        y = layer(x)
        assert y.dtype == torch.float32 and tuple(y.shape) == (m, W.shape[0])
        _assert_within_bound(y, x, W, b, w_err, f"M={m}")


@pytest.mark.parametrize(("type_name", "made_by_gguf"), [("Q4_1", True), ("Q4_K", False)], ids=["q4_1", "q4_k"])
def test_int4_paths_agree(type_name, made_by_gguf):
    """The same rows through the kernel (in chunks below the threshold) and through the dense
    path: the same weights; they differ by the kernel's rounding of x to bfloat16 (at most
    u |x| each), of its output (one bfloat16 step) and by float32 summation order."""
    layer, W, _, _ = _int4_case(type_name, made_by_gguf)
    x = _inputs(2 * DENSE_FROM_ROWS, W.shape[1], seed=9)
    dense = layer(x).double()
    kernel = torch.cat([layer(chunk) for chunk in x.split(DENSE_FROM_ROWS - 1)]).double()
    w = layer.weight.double()  # the weights both paths multiply with
    accumulation = 2 * W.shape[1] * 2.0**-24 * (x.bfloat16().double().abs() @ w.abs().T)
    one_step = 2 * U_BF16 * torch.maximum(dense.abs(), kernel.abs())  # a bfloat16 ulp is <= 2u |y|
    input_rounding = U_BF16 * (x.double().abs() @ w.abs().T)
    assert ((dense - kernel).abs() <= one_step + input_rounding + accumulation * 1.01).all()


@pytest.mark.parametrize("lead", [(2, 5), (3, 20), (1, 1)], ids=["kernel-10-rows", "dense-60-rows", "one-row"])
def test_int4_three_d_input(lead):
    layer, W, b, w_err = _int4_case("Q4_1", True, bias=True)
    x = _inputs(lead[1], W.shape[1], seed=4, lead=lead[:1])  # (B, T, K)
    y = layer(x)
    assert tuple(y.shape) == (*lead, W.shape[0])
    assert torch.equal(y, layer(x.reshape(-1, W.shape[1])).view(*lead, W.shape[0]))
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, not contiguous
    assert torch.equal(layer(xt), y)
    rows = lead[0] * lead[1]
    _assert_within_bound(y.reshape(rows, -1), x.reshape(rows, -1), W, b, w_err, str(lead))


def test_int4_keeps_the_callers_dtype():
    layer, W, _, _ = _int4_case("Q4_0", True)
    for m in (1, DENSE_FROM_ROWS):
        x = _inputs(m, W.shape[1], seed=1)
        assert layer(x.bfloat16()).dtype == torch.bfloat16
        assert layer(x.double()).dtype == torch.float64


def test_int4_rejects_rows_not_in_groups_of_32():
    q = torch.zeros(16, 48, dtype=torch.uint8)
    with pytest.raises(ValueError, match="in_features % 32 == 0"):
        Int4Linear(q, torch.ones(16, 1), torch.zeros(16, 1))


# Shapes that leave every kind of last block in both vector layouts (blocks of 64 rows with
# AVX-512, of 32 with AVX2): 16, 32 and 48 rows after full blocks, or no full block at all.
@pytest.mark.parametrize("shape", [(32, 64), (48, 64), (16, 576), (112, 96), (80, 64), (96, 32), (176, 96), (128, 64)],
                         ids=["32", "48", "16", "112", "64-and-16", "64-and-32", "128-and-48", "128"])
def test_int4_keeps_one_copy_and_reads_it_back(shape):
    """After packing, the kernel's tiled copy is the only copy of the 4-bit values (0.5 bytes a
    weight); the values, `.weight` and any rows of it decode from that copy. Oracle: the q,
    scale and offset given, in float64."""
    N, K = shape
    g = torch.Generator().manual_seed(N + K)
    q = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    scale, offset = torch.rand(N, K // GROUP, generator=g) + 0.1, torch.randn(N, K // GROUP, generator=g)
    layer = Int4Linear(q, scale, offset)
    assert layer.nibbles is None and layer.packed.numel() == N * K // 2
    assert torch.equal(layer.values(), q)
    # the kernel's numbers: (q - 8) * bf16(scale) + bf16(offset + 8 scale)
    s = scale.bfloat16().double().repeat_interleave(GROUP, dim=1)
    z = (offset + 8 * scale).bfloat16().double().repeat_interleave(GROUP, dim=1)
    expected = (q.double() - 8) * s + z
    assert ((layer.weight.double() - expected).abs() <= 2.0**-24 * expected.abs() * 2).all()
    for start, stop in [(0, N), (5, N - 3), (N - 16, N), (N // 2, N // 2 + 1)]:
        assert torch.equal(layer.weight_rows(start, stop), layer.weight[start:stop]), (start, stop)


_LAYOUT_CHECK = """
import torch
from lucidlm.models.int4_layout import packed_layout
from lucidlm.models.packed import Int4Linear
g = torch.Generator().manual_seed(0)
for N, K in [(176, 96), (96, 64), (32, 32)]:
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale, offset = torch.rand(N, K // 32, generator=g) + 0.1, torch.randn(N, K // 32, generator=g)
    layer = Int4Linear(q, scale, offset)
    assert torch.equal(layer.values(), q), (N, K)
    x = torch.randn(3, K, generator=g)
    exact = x.double() @ layer.weight.double().t()  # the decoded weight, which the kernel must agree with
    kernel = layer.kernel_matmul(x).double()
    assert ((kernel - exact).abs() <= 0.02 * exact.abs() + 0.05 * exact.abs().max()).all(), (N, K)
print(torch.backends.cpu.get_cpu_capability(), tuple(packed_layout()))
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_int4_layout_of_each_cpu_build(capability):
    """PyTorch's int4 packing depends on the instruction set it dispatches to (blocks of 64 rows
    with AVX-512, 32 with AVX2, another pairing without vectors): on each (chosen with
    ATEN_CPU_CAPABILITY, in a fresh process), the 4-bit values read back from the kernel's copy
    are the ones given, and the kernel's product agrees with the weight read back (a misread
    layout gives rows of other rows' values: errors of the weights' own size)."""
    import os

    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run([sys.executable, "-c", _LAYOUT_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reached, layout = result.stdout.split(maxsplit=1)
    if reached.lower() != capability:  # a CPU without AVX-512 runs its best build instead
        pytest.skip(f"this CPU runs {reached} when asked for {capability}")
    assert layout.strip() == {"default": "(32, False)", "avx2": "(32, True)", "avx512": "(64, True)"}[capability]


def test_int4_unreadable_packing_is_a_clear_error(monkeypatch):
    """Int4Linear reads the kernel's packed bytes itself: a PyTorch that lays them out
    differently must fail loudly at packing, not decode garbage in prefill."""
    from lucidlm.models import packed

    from lucidlm.models import int4_layout

    monkeypatch.setattr(int4_layout, "int4pack", lambda q: packed._row_nibbles(q.to(torch.uint8)))  # another layout
    int4_layout.packed_layout.cache_clear()
    try:
        with pytest.raises(UnsupportedError, match="layout LucidLM cannot read"):
            Int4Linear(torch.zeros(32, 64, dtype=torch.uint8), torch.ones(32, 2), torch.zeros(32, 2))
    finally:
        int4_layout.packed_layout.cache_clear()


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_dense_path_in_row_slices(monkeypatch, kind):
    """A layer larger than DENSE_CHUNK weights (an LM head) is decoded a slice of rows at a time
    into a small buffer: the result is still within the bfloat16 bound of the file's matrix."""
    from lucidlm.models import dense_path, packed

    if kind == "int4":
        layer, W, b, w_err = _int4_case("Q4_1", True, shape=(112, 256), bias=True)  # 3 blocks of 32 and 16 rows (AVX-512: 64 and 48)
    else:
        W, b = _rows_of_varied_scale(100, 256, seed=4), None
        layer = Int8Linear.quantize(W)
        W, w_err = layer.weight, torch.zeros(100, 256, dtype=torch.float64)
    x = _inputs(DENSE_FROM_ROWS + 3, 256, seed=8)
    whole = layer(x)
    rows = packed.packed_layout().block_rows if kind == "int4" else 32  # int4 slices hold whole blocks of the kernel's rows
    monkeypatch.setattr(dense_path, "DENSE_CHUNK", rows * 256)  # slices of `rows` rows
    monkeypatch.setattr(dense_path._DECODE_BUFFER, "tensor", torch.empty(0))  # not a larger one left by an earlier test
    with torch.inference_mode():  # (the buffer is reused only without autograd)
        sliced = layer(x)
        assert dense_path._DECODE_BUFFER.tensor.numel() <= rows * 256
    _assert_within_bound(sliced, x, W, b, w_err, "sliced")
    _assert_within_bound(whole, x, W, b, w_err, "whole")


def test_dense_path_buffer_is_per_thread():
    """The decode buffer is reused between calls but never shared between threads: layers of
    different shapes run concurrently give what each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [_int4_case("Q4_0", True, shape=(n, 256)) for n in (48, 96, 160)]
    x = _inputs(DENSE_FROM_ROWS, 256, seed=2)
    with torch.inference_mode():
        alone = [layer(x) for layer, *_ in cases]

    def run(i):
        with torch.inference_mode():
            return all(torch.equal(cases[i % 3][0](x), alone[i % 3]) for _ in range(5))

    with ThreadPoolExecutor(3) as pool:
        assert all(pool.map(run, range(12)))


# ----- 3. Int8Linear and Q8Embedding -----

def _rows_of_varied_scale(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None]


def test_int8_quantize_is_symmetric_per_row():
    W = _rows_of_varied_scale(64, 256, seed=0)
    layer = Int8Linear.quantize(W)
    assert layer.q.dtype == torch.int8 and int(layer.q.abs().max()) == 127
    assert int(layer.q.min()) >= -127
    assert torch.equal(layer.q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))  # max |w| -> 127
    # the largest weight of each row keeps its sign
    rows = torch.arange(64)
    biggest = W.abs().argmax(dim=1)
    assert torch.equal(torch.sign(layer.q[rows, biggest].float()), torch.sign(W[rows, biggest]))


def test_int8_quantize_error_within_half_a_step_plus_bfloat16_scale():
    """What holds today: round-to-nearest with the float32 step s = max|w|/127 (error <= s/2),
    then the step stored in bfloat16 moves every value by |q| |s - bf16(s)| <= 127 u s."""
    W = _rows_of_varied_scale(64, 256, seed=1)
    layer = Int8Linear.quantize(W)
    step = W.abs().amax(dim=1).double() / 127
    stored = layer.scale.double()
    assert ((stored - step).abs() <= U_BF16 * step).all()  # the stored step is bf16(step)
    err = (W.double() - layer.weight.double()).abs().amax(dim=1)
    assert (err <= step / 2 + 127 * (stored - step).abs() + 1e-7 * step).all()


def test_int8_quantize_error_within_half_the_stored_step():
    W = _rows_of_varied_scale(64, 256, seed=1)
    layer = Int8Linear.quantize(W)
    step = layer.scale.double()  # the step the kernel and .weight actually use
    err = (W.double() - layer.weight.double()).abs().amax(dim=1)
    assert (err <= step / 2 * (1 + 1e-6)).all(), f"max error / step = {(err / step).max():.3f}"


def test_int8_forward_kernel_and_dense_paths():
    W = _rows_of_varied_scale(80, 256, seed=2)
    layer = Int8Linear.quantize(W)
    W8 = layer.weight  # q * stored scale: exactly what the kernel multiplies with
    step = W.abs().amax(dim=1).double() / 127
    x_all = _inputs(DENSE_FROM_ROWS + 20, 256, seed=3)
    ref_all = _reference(x_all, W8, None)
    bound_all = _kernel_bound(x_all.double(), torch.zeros_like(W8, dtype=torch.float64), W8.double().abs(), ref_all)
    # close to the unquantized layer too: every weight within one step (max |w| / 127) of its row's
    dense_all = _reference(x_all, W, None)
    quantization_all = x_all.double().abs().sum(dim=1, keepdim=True) * step[None, :]
    for m in list(range(1, DENSE_FROM_ROWS)) + [DENSE_FROM_ROWS, DENSE_FROM_ROWS + 20]:  # kernel, then dense path
        y = layer(x_all[:m])
        assert y.dtype == torch.float32 and tuple(y.shape) == (m, 80)
        err = (y.double() - ref_all[:m]).abs()
        assert (err <= bound_all[:m]).all(), f"M={m}: {(err - bound_all[:m]).max():.3g} over the bound"
        assert ((y.double() - dense_all[:m]).abs() <= quantization_all[:m] + bound_all[:m]).all(), m
    x3 = _inputs(4, 256, seed=3, lead=(2,))
    assert torch.equal(layer(x3), layer(x3.reshape(8, 256)).view(2, 4, 80))


@pytest.fixture(scope="module")
def q8_table():
    """A random Q8_0 table (V, C) as raw bytes, the packed embedding and gguf's decoding."""
    V, C = 300, 128
    raw = _random_blocks("Q8_0", V * C // 32, np.random.default_rng(21)).reshape(-1)
    return Q8Embedding(torch.from_numpy(raw.copy()), (V, C)), _gguf_matrix(raw, "Q8_0", (V, C))


def test_q8_embedding_lookup_is_exact(q8_table):
    emb, table = q8_table
    assert (emb.num_embeddings, emb.dim) == tuple(table.shape)
    assert torch.equal(emb.weight, table)
    ids = torch.tensor([[0, 299, 5, 5], [17, 1, 2, 250]])
    out = emb(ids)
    assert out.dtype == torch.float32 and tuple(out.shape) == (2, 4, 128)
    assert torch.equal(out, table[ids])
    assert torch.equal(emb(torch.tensor([42])), table[42:43])


def test_q8_embedding_as_int8_linear_equals_quantizing_the_table(q8_table):
    emb, table = q8_table
    head, reference = emb.as_int8_linear(), Int8Linear.quantize(table)
    assert torch.equal(head.q, reference.q) and torch.equal(head.scale, reference.scale)
    assert (head.out_features, head.in_features) == tuple(table.shape)


# ----- loading a tiny GGUF packed, against HF transformers on the same weights -----

@pytest.mark.parametrize("encoding", [T.Q4_0, T.Q4_1], ids=["q4_0", "q4_1"])
def test_tiny_packed_model_matches_transformers(tmp_path, encoding):
    """Every matrix 4-bit (tied embedding: the LM head is the dense table), the q/k rows
    permuted as llama.cpp writes them: the packed loader must undo the permutation on
    q, scale and offset alike."""
    from test_loading_gguf import VOCAB_SIZE, hf_llama_and_gguf_tensors, tiny_metadata, write_gguf

    hf_model, tensors = hf_llama_and_gguf_tensors(tie=True, encoding=encoding)
    path = write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), tensors)
    model = lucidlm.load(str(path), progress=False, dtype="packed")
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int4Linear)  # q, k, v stacked (fuse_projections)
    assert isinstance(model.model.layers[1].mlp.down_proj, Int4Linear)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB_SIZE, size=(48,)))
    with torch.inference_mode():
        expected = hf_model(ids[None]).logits[0].float()
    assert expected.std() > 0.5
    # 48 rows (the dense path) and 8 rows (the int4 kernel): bfloat16 activations entering
    # every matmul through 2 layers; ~0.5 % of the logits' scale observed
    for n in (48, 8):
        actual = model.logits(ids[:n].tolist())
        err = (actual - expected[:n]).abs().max()
        assert err <= 2e-2 * expected[:n].abs().max(), (n, float(err))
        kl, top1 = _kl_and_agreement(expected[:n], actual)
        assert kl.mean() < 1e-3 and top1 >= 0.9, (n, float(kl.mean()), top1)


def test_packed_load_of_a_4bit_matrix_with_rows_not_a_multiple_of_16(tmp_path):
    from test_loading_gguf import VOCAB_SIZE, hf_llama_and_gguf_tensors, tiny_metadata, write_gguf

    assert VOCAB_SIZE % 16
    hf_model, tensors = hf_llama_and_gguf_tensors(tie=False, encoding=T.Q4_1)  # untied Q4_1 output.weight
    path = write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), tensors)
    model = lucidlm.load(str(path), progress=False)  # "auto" is packed for GGUF on CPU
    assert isinstance(model.model.lm_head, Int8Linear)  # the int4 kernel cannot take 294 rows: int8 instead
    ids = list(range(40))
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids])).logits[0].float()
    actual = model.logits(ids)
    assert (actual - expected).abs().max() <= 2e-2 * expected.abs().max()
    kl, top1 = _kl_and_agreement(expected, actual)
    assert kl.mean() < 1e-3 and top1 >= 0.9, (float(kl.mean()), top1)


# ----- 4. the real models -----

def _kl_and_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-position KL(reference || other) of the next-token distributions, and top-1 agreement."""
    p_log, q_log = reference.double().log_softmax(-1), other.double().log_softmax(-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    return kl, (reference.argmax(-1) == other.argmax(-1)).double().mean().item()


@pytest.fixture(scope="module")
def smollm_packed(smollm_path):
    return lucidlm.load(str(smollm_path), progress=False, dtype="packed")


@pytest.fixture(scope="module")
def smollm_text(lucid_smollm, smollm_packed):
    """(ids, float32 logits, packed logits) of TEXT, each model run once."""
    ids = lucid_smollm.tokenizer.encode(TEXT)
    assert smollm_packed.tokenizer.encode(TEXT) == ids
    return ids, lucid_smollm.logits(ids), smollm_packed.logits(ids)


def _greedy(model, ids, n, use_cache):
    steps = generate_tokens(model.model, ids, make_sampler(SamplingParams()), n, stop_ids=(), use_cache=use_cache)
    return list(steps)


@pytest.mark.slow
def test_smollm_packed_modules(smollm_packed, lucid_smollm):
    model = smollm_packed.model
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    # every Q4_1 matrix stays 4-bit: q/k/v stacked in one layer, gate/up in one, o and down
    assert len(int4) == 4 * model.config.n_layers
    assert isinstance(model.embed_tokens, Q8Embedding) and isinstance(model.lm_head, Int8Linear)
    # prompts' attention in bfloat16 blocks exactly where the dense matmuls are bfloat16; never on the exact path
    from lucidlm.models import packed
    expected = torch.bfloat16 if packed.DENSE_DTYPE == torch.bfloat16 else None
    assert {layer.self_attn.prefill_dtype for layer in model.layers} == {expected}
    assert {layer.self_attn.prefill_dtype for layer in lucid_smollm.model.layers} == {None}
    # the packed modules hold the file's values: the embedding table exactly; q_proj (rows
    # permuted back from llama.cpp's RoPE order) up to the bfloat16 rounding of its scales
    for name in ("layers.3.self_attn.q_proj", "layers.3.self_attn.k_proj", "layers.29.mlp.down_proj"):
        ours, exact = model.get_submodule(name).weight, lucid_smollm.model.get_submodule(name).weight.detach()
        assert (ours - exact).norm() <= U_BF16 * exact.norm(), name
        assert F.cosine_similarity(ours, exact, dim=1).min() > 1 - 1e-4, name  # no row out of place
    assert torch.equal(model.embed_tokens.weight, lucid_smollm.model.embed_tokens.weight)


def _file_mappings(path: Path) -> dict[int, tuple[int, int, int]]:
    """This process's mappings of `path` (Linux /proc/self/smaps): start -> (end, size KiB, resident KiB)."""
    mappings, current = {}, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: "start-end perms offset dev inode [path]"
                current = None
                if fields[-1] == str(path):
                    start, end = (int(a, 16) for a in fields[0].split("-"))
                    current = mappings[start] = [end, 0, 0]
            elif current is not None and fields[0] in ("Size:", "Rss:"):
                current[1 if fields[0] == "Size:" else 2] = int(fields[1])
    return {start: tuple(v) for start, v in mappings.items()}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_smollm_embedding_table_stays_in_the_file(smollm_path):
    """The Q8_0 embedding table (28.7 MiB) is a view of the GGUF file, mapped, not a copy: after
    loading none of it is resident (building the tied LM head read it through a mapping of its
    own, gone with it), and a lookup brings in only the pages around its rows."""
    path = smollm_path.resolve()
    gc.collect()  # (models of earlier tests waiting in reference cycles: their mappings go now, not below)
    before = _file_mappings(path)
    model = lucidlm.load(str(smollm_path), progress=False, dtype="packed").model
    table = model.embed_tokens.blocks
    new = {start: v for start, v in _file_mappings(path).items() if start not in before}
    assert len(new) == 1, new  # one mapping left by the load: the table's
    (start, (end, size_kib, resident_kib)), = new.items()
    assert start <= table.data_ptr() and table.data_ptr() + table.numel() <= end
    assert size_kib * 1024 >= table.numel() == 49152 * 18 * 34
    assert resident_kib == 0
    ids = torch.tensor([[0, 20000, 49151]])
    with torch.inference_mode():
        assert torch.equal(model.embed_tokens(ids), model.embed_tokens.weight[ids])  # .weight reads every row
    del model, table
    gc.collect()
    assert set(_file_mappings(path)) == set(before)  # the mapping goes with the model

    model = lucidlm.load(str(smollm_path), progress=False, dtype="packed").model
    with torch.inference_mode():
        model.embed_tokens(ids)
    (_, _, resident_kib), = [v for start, v in _file_mappings(path).items() if start not in before]
    assert 0 < resident_kib <= 1024  # 3 rows of 612 bytes, and their neighbours (the OS maps pages in groups)


@pytest.mark.slow
def test_smollm_packed_next_token_distributions(smollm_text):
    ids, exact, packed = smollm_text
    assert 250 <= len(ids) <= 400
    kl, top1 = _kl_and_agreement(exact, packed)
    assert kl.mean() < 0.01, float(kl.mean())
    assert top1 >= 0.90, top1


@pytest.mark.slow
def test_smollm_packed_cached_decode_distributions(lucid_smollm, smollm_packed, smollm_text):
    """One token at a time through the KV cache: every matmul takes the few-row kernels."""
    ids, exact, _ = smollm_text
    n = 32
    model = smollm_packed.model
    cache = model.new_cache(1, n)
    with torch.inference_mode():
        steps = [model(torch.tensor([[t]]), cache)[0, -1] for t in ids[:n]]
    kl, top1 = _kl_and_agreement(exact[:n], torch.stack(steps))
    assert kl.mean() < 0.01, float(kl.mean())
    assert top1 >= 0.90, top1


@pytest.mark.slow
def test_smollm_packed_knows_paris(smollm_packed):
    text = smollm_packed.generate("The capital of France is", max_new_tokens=16)
    assert text.startswith(" Paris"), text


DIVERGES = pytest.mark.xfail(strict=False, reason=(
    "BUG (see test_smollm_packed_logits_are_not_rounded_to_bfloat16): attention over the cache differs from "
    "the full causal attention by ~1e-7; the bfloat16 rounding of every packed layer's output amplifies that "
    "to ~0.2 nats in the log-probs, and the cached run meets an exact top-2 tie at step 9"))


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["The capital of France is", DENSE_FROM_ROWS + 2,
                                    pytest.param(6, marks=DIVERGES)],
                         ids=["short", "long", "printing-press"])
def test_smollm_packed_cached_equals_uncached(smollm_packed, smollm_text, prompt):
    """Short: every step under DENSE_FROM_ROWS rows. Long (the text's first DENSE_FROM_ROWS + 2 tokens): the
    uncached recomputation takes the dense path, the cached decode the kernels.
    Printing-press: the text's first 6 tokens, "The history of the printing press"."""
    ids = smollm_packed.tokenizer.encode(prompt) if isinstance(prompt, str) else smollm_text[0][:prompt]
    cached = _greedy(smollm_packed, ids, 12, use_cache=True)
    uncached = _greedy(smollm_packed, ids, 12, use_cache=False)
    assert [s.token_id for s in cached] == [s.token_id for s in uncached]
    for a, b in zip(cached, uncached):
        kl = (a.logprobs.exp() * (a.logprobs - b.logprobs)).sum()
        assert kl < 1e-2, float(kl)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="LIMITATION (documented in models/packed.py): the int4/int8 kernels "
                                       "return bfloat16, the LM head included: logits come in steps of 0.125 "
                                       "near |logit| 16-32; dtype='float32' gives exact logits")
def test_smollm_packed_logits_are_not_rounded_to_bfloat16(smollm_packed, smollm_text):
    with torch.inference_mode():
        for n in (6, DENSE_FROM_ROWS + 2):  # the kernel, the dense path
            last = smollm_packed.model(torch.tensor([smollm_text[0][:n]]), last_only=True)[0, -1]
            assert not torch.equal(last, last.bfloat16().float()), n


@pytest.mark.slow
@pytest.mark.parametrize("prompt_tokens", [6, DENSE_FROM_ROWS + 8], ids=["kernel", "dense"])
def test_smollm_last_only_is_the_last_row(lucid_smollm, smollm_packed, smollm_text, prompt_tokens):
    tokens = torch.tensor([smollm_text[0][:prompt_tokens]])
    with torch.inference_mode():
        exact_full, exact_last = lucid_smollm.model(tokens), lucid_smollm.model(tokens, last_only=True)
        full, last = smollm_packed.model(tokens), smollm_packed.model(tokens, last_only=True)
    assert tuple(exact_last.shape) == tuple(last.shape) == (1, 1, full.shape[-1])
    torch.testing.assert_close(exact_last, exact_full[:, -1:], atol=1e-4, rtol=0)
    # packed: the LM head sees 1 row (int8 kernel, bfloat16) against T rows (T >= DENSE_FROM_ROWS: float32)
    if prompt_tokens < DENSE_FROM_ROWS:
        torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
    else:
        assert (last - full[:, -1:]).abs().max() <= 1e-2 * full[:, -1].abs().max()
    assert int(last.argmax()) == int(full[0, -1].argmax())


@pytest.fixture(scope="module")
def gemma_packed(gemma_path):
    return lucidlm.load(str(gemma_path), progress=False, dtype="packed")


@pytest.mark.slow
def test_gemma_packed_next_token_distributions(lucid_gemma, gemma_packed):
    model = gemma_packed.model
    assert any(isinstance(m, Int4Linear) for m in model.modules())  # Q4_K matrices
    assert any(isinstance(m, Int8Linear) for m in model.modules())  # Q5_0 / Q6_K / Q8_0 matrices
    ids = lucid_gemma.tokenizer.encode(TEXT)
    assert 250 <= len(ids) <= 400
    kl, top1 = _kl_and_agreement(lucid_gemma.logits(ids), gemma_packed.logits(ids))
    assert kl.mean() < 0.02, float(kl.mean())
    assert top1 >= 0.90, top1


# ----- 5. bad options -----

def test_unknown_dtype():
    with pytest.raises(InvalidArgumentError) as info:
        lucidlm.load("smollm2-135m-instruct", progress=False, dtype="int3")
    message = str(info.value)
    assert "int3" in message and "packed" in message and "float32" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu(device):
    with pytest.raises(InvalidArgumentError) as info:
        lucidlm.load("smollm2-135m-instruct", progress=False, device=device)
    assert "CUDA" in str(info.value) and "\n" not in str(info.value)


def test_cli_rejects_unknown_dtype():
    lucid = Path(sys.executable).parent / "lucid"
    command = [str(lucid)] if lucid.exists() else [sys.executable, "-m", "lucidlm.cli"]
    result = subprocess.run([*command, "generate", "x", "--dtype", "nope"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--dtype" in errors[0] and "'nope'" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


# ----- 6. introspection on a packed model -----

@pytest.mark.slow
def test_run_with_cache_on_packed(lucid_smollm, smollm_packed):
    prompt = "The capital of France is"
    model, n, C = smollm_packed.model, smollm_packed.config.n_layers, smollm_packed.config.d_model
    tokens = smollm_packed.token_batch(prompt)
    with torch.inference_mode():
        direct = model(tokens)
    # every hook point, the residual stream included
    logits, cache = smollm_packed.run_with_cache(prompt)
    for i in range(n):
        for site in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
            assert tuple(cache[f"blocks.{i}.{site}"].shape) == (1, tokens.shape[1], C), site
    # (capturing attention patterns computes attention explicitly, not fused: a different
    # float32 rounding, which the bfloat16 kernels amplify to ~bfloat16 differences)
    kl, top1 = _kl_and_agreement(direct[0], logits[0])
    assert kl.max() < 1e-2 and top1 == 1.0
    # the residual stream alone: the very same computation as the plain forward
    resid_logits, resid = smollm_packed.run_with_cache(prompt, names=lambda name: name.endswith("hook_resid_post"))
    assert torch.equal(resid_logits, direct)
    with torch.inference_mode():  # the last residual stream through the final norm and LM head is the logits
        relensed = model.lm_head(model.norm(resid[f"blocks.{n - 1}.hook_resid_post"])).float()
    torch.testing.assert_close(relensed, direct, atol=1e-5, rtol=0)
    # against the float32 model's residual stream: the same direction after every layer
    _, exact = lucid_smollm.run_with_cache(prompt, names=lambda name: name.endswith("hook_resid_post"))
    for i in range(n):
        a, b = exact[f"blocks.{i}.hook_resid_post"][0], resid[f"blocks.{i}.hook_resid_post"][0]
        assert F.cosine_similarity(a, b, dim=-1).min() > 0.99, i


@pytest.mark.slow
def test_logit_lens_on_packed(smollm_packed):
    from lucidlm.introspect import logit_lens

    tokens = smollm_packed.token_batch("The capital of France is")
    reading = logit_lens(smollm_packed.model, tokens, k=3)
    n = smollm_packed.config.n_layers
    assert tuple(reading.top_ids.shape) == (n, tokens.shape[1], 3)
    with torch.inference_mode():
        logits = smollm_packed.model(tokens)[0]
    assert torch.equal(reading.top_ids[-1, :, 0], logits.argmax(-1))
    assert smollm_packed.tokenizer.decode([int(reading.top_ids[-1, -1, 0])]) == " Paris"


@pytest.mark.slow
def test_describe_runs_on_packed(smollm_packed):
    from lucidlm.introspect.architecture import describe

    d = describe(smollm_packed)
    assert "Int4Linear" in d["module_tree"] and d["hook_points"]
    assert d["config"]["n_layers"] == smollm_packed.config.n_layers


@pytest.mark.slow
def test_describe_counts_packed_weights(lucid_smollm, smollm_packed):
    from lucidlm.introspect.architecture import describe

    packed, exact = describe(smollm_packed), describe(lucid_smollm)
    assert packed["parameters"] == exact["parameters"]
    assert {row["type"] for row in packed["tensor_types"]} == {row["type"] for row in exact["tensor_types"]}


@pytest.mark.parametrize("type_name,made_by_gguf", [("Q4_0", True), ("Q4_1", True), ("Q4_K", False)])
def test_bfloat16_decoding_is_the_float32_weight_rounded_once(type_name, made_by_gguf):
    """The dense path decodes straight into bfloat16 (one in-place multiply-add, computed in
    float32 by PyTorch's bfloat16 kernels): it must give the float32 decoding rounded to
    bfloat16, bit for bit, for int4 blocks of real GGUF types (made by `gguf`, or random Q4_K
    blocks, which it cannot make) and for int8 rows,
    on whichever CPU build runs it (not a second rounding of a rounded product)."""
    layer, _, _, _ = _int4_case(type_name, made_by_gguf, shape=(160, 512))  # 2 blocks of 64 and 32 rows (AVX-512); 5 of 32
    N, K = layer.out_features, layer.in_features
    in_float32 = layer._weight_t(0, N, torch.empty(K * N))
    in_bfloat16 = layer._weight_t(0, N, torch.empty(K * N, dtype=torch.bfloat16))
    assert torch.equal(in_bfloat16, in_float32.bfloat16())
    rows = Int8Linear.quantize(_rows_of_varied_scale(100, 256, seed=6))
    in_float32 = rows._weight_rows_into(0, 100, torch.empty(100 * 256))
    assert torch.equal(rows._weight_rows_into(0, 100, torch.empty(100 * 256, dtype=torch.bfloat16)), in_float32.bfloat16())
