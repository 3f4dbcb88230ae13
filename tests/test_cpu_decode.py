"""Our C++ decode kernels (`lucidlm.kernels.cpu_decode`) and the layer that uses them
(`models.dot_linear.Int8DotLinear`), against plain float64 arithmetic and PyTorch's attention.

The matmul rounds x to two int8 terms per value (x ~ e (256 p1 + p2), e a scale per 32 values:
cpu_decode.cpp), so its error is bounded: each value is off by at most max|group| / 127 / 256
(half a fine step, plus the clamped extreme), and an output by that times the sum of |W| over
the group. The tests compute that bound from the inputs and require the kernel to stay within it
(a kernel with one term, or the wrong scale for a lane, misses it by orders of magnitude).
Skipped where the kernels do not run (no AVX-512 VNNI, or no C++ compiler): there packed models
keep PyTorch's kernels, covered by test_packed.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lucidlm.kernels import cpu_decode
from lucidlm.models.dot_linear import Int8DotLinear

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="needs AVX-512 VNNI and a C++ compiler")


def random_int4(N: int, K: int, seed: int = 0, bits: int = 4):
    """4-bit (or `bits`-bit) values, float16-exact scales and offsets per 32, and the float64 matrix they make."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (N, K), generator=g)
    scale = (torch.rand(N, K // 32, generator=g) * 0.05 + 0.001).half().float()
    offset = (-torch.rand(N, K // 32, generator=g) * 0.4).half().float()
    W = (q.double().view(N, K // 32, 32) * scale.double()[..., None] + offset.double()[..., None]).view(N, K)
    return q, scale, offset, W


def activations(M: int, K: int, seed: int = 1) -> torch.Tensor:
    """Rows like a model's hidden states: mostly small, a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, :: max(1, K // 7)] *= 30
    return x


def error_bound(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(M, N): the most the two-term int8 rounding of x can move x Wᵀ."""
    M, K = x.shape
    step = x.double().view(M, K // 32, 32).abs().amax(-1) / 127 / 256  # the fine step per group
    per_group = W.double().abs().view(W.shape[0], K // 32, 32).sum(-1)  # (N, G)
    return step @ per_group.t() + 1e-6


def from_random(bits: int, N: int, K: int, seed: int = 0):
    """An Int8DotLinear of random 4- or 5-bit values, and the float64 matrix it holds."""
    q, scale, offset, W = random_int4(N, K, seed, bits)
    return (Int8DotLinear.from_int4 if bits == 4 else Int8DotLinear.from_int5)(q, scale, offset), W


@pytest.mark.parametrize("bits", [4, 5])
# M: rows of x (blocks of up to 4 rows; from 8 rows, 16 weight rows at a time, N = 33 and 40 leaving a
# remainder for the one-at-a-time path)
@pytest.mark.parametrize("M,N,K", [(1, 960, 576), (1, 576, 1536), (3, 5, 64), (8, 48, 640), (2, 300, 2048),
                                   (5, 40, 576), (13, 33, 128), (31, 64, 576), (100, 40, 1536)])
def test_int4_and_int5_matmuls_are_the_float_product_within_the_rounding_bound(M, N, K, bits):
    layer, W = from_random(bits, N, K)
    x = activations(M, K)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    error = (y.double() - x.double() @ W.t()).abs()
    assert (error <= error_bound(x, W)).all(), f"max error {error.max():.3g}"


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_a_row_does_not_depend_on_the_rows_beside_it(bits):
    """Rows of x share decoded weights (blocks of up to 4 rows; from 8 rows, 16 weight rows' outputs
    across the lanes): a row's result must not depend on what the other rows hold. Fewer than 8 rows
    take the one-row arithmetic exactly (prompt lookup's checks, batches of a few sequences equal
    single decode steps); more, the row alone within the rounding bound (the bound test above)."""
    if bits == 8:
        layer = Int8DotLinear.quantize(torch.randn(72, 576, generator=torch.Generator().manual_seed(4)))
    else:
        layer, _ = from_random(bits, 72, 576, seed=bits)
    x = activations(37, 576, seed=bits)
    for M in (2, 3, 4, 5, 9, 17, 37):
        together = layer(x[:M])
        changed = x[:M].clone()
        changed[::2] = activations((M + 1) // 2, 576, seed=M)
        assert torch.equal(layer(changed)[1::2], together[1::2])
        if M < 8:
            assert torch.equal(torch.cat([layer(row) for row in x[:M].split(1)]), together)


def test_results_do_not_depend_on_the_number_of_threads():
    """Threads take whole blocks of 16 weight rows, so each output goes the same way (16 rows at a time
    across the lanes, or one row at a time) however many threads share the matrix."""
    layer, _ = from_random(4, 16 * 5 + 3, 576, seed=6)
    x = activations(12, 576, seed=6)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(layer(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_a_single_int8_term_would_miss_the_bound():
    """The bound is tight enough to tell one rounding term from two: x rounded once to int8
    (the usual scheme) moves the product by far more than it allows."""
    q, scale, offset, W = random_int4(64, 576)
    x = activations(1, 576)
    groups = x.view(1, -1, 32)
    step = groups.abs().amax(-1, keepdim=True) / 127
    once = ((groups / step).round() * step).view_as(x)
    assert ((once.double() @ W.t() - x.double() @ W.t()).abs() > error_bound(x, W)).any()


@pytest.mark.parametrize("bits", [4, 5])
def test_weights_decode_to_the_values_given(bits):
    layer, W = from_random(bits, 40, 128)
    assert torch.equal(layer.weight.double(), W)  # float16 scales: exact in float32
    assert torch.equal(layer.weight_rows(7, 19).double(), W[7:19])


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_dequantize_into_bfloat16_is_the_float32_value_rounded_once(bits):
    """The dense path's decoding: bfloat16 rows equal the float32 ones rounded by PyTorch (to nearest even)."""
    layer = from_random(bits, 70, 192)[0] if bits < 8 else Int8DotLinear.quantize(torch.randn(70, 192))
    exact = torch.empty(70, 192)
    cpu_decode.dequantize(layer.weights, layer.scales, bits, exact)
    assert torch.equal(exact, layer.weight)
    rounded = torch.empty(20, 192, dtype=torch.bfloat16)
    cpu_decode.dequantize(layer.weights[30:50], layer.scales[30:50], bits, rounded)
    assert torch.equal(rounded, exact[30:50].bfloat16())


def q8_0_blocks(N: int, K: int, seed: int = 2):
    """A Q8_0 matrix's bytes (a float16 scale, then 32 int8 values, per block) and its values."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-127, 128, (N, K // 32, 32), generator=g, dtype=torch.int8)
    scale = (torch.rand(N, K // 32, 1, generator=g) * 0.01).half()
    blocks = torch.cat([scale.view(torch.uint8), values.view(torch.uint8)], dim=-1)  # (N, K/32, 34)
    return blocks.reshape(-1), (values.double() * scale.double()).view(N, K)


def test_q8_0_head_is_exact_and_multiplies_within_the_bound():
    blocks, W = q8_0_blocks(200, 576)
    head = Int8DotLinear.from_q8_0(blocks, (200, 576))
    assert head.bits == 8 and torch.equal(head.weight.double(), W)
    x = activations(2, 576)
    error = (head(x).double() - x.double() @ W.t()).abs()
    assert (error <= error_bound(x, W)).all(), f"max error {error.max():.3g}"


@pytest.mark.parametrize("encoding", ["Q5_0", "Q5_1"])
def test_q5_matrices_are_held_exactly(encoding):
    """A Q5_0/Q5_1 matrix (bytes from gguf's quantizer) as 5-bit values: the layer's weight is gguf's
    own decoding of those bytes, bit for bit."""
    import gguf
    from lucidlm.loading.quants import affine_5bit

    qtype = getattr(gguf.GGMLQuantizationType, encoding)
    W = np.random.default_rng(3).standard_normal((48, 640)).astype(np.float32)
    raw = gguf.quants.quantize(W, qtype)
    layer = Int8DotLinear.from_int5(*affine_5bit(raw.reshape(-1), int(qtype), W.shape))
    assert layer.bits == 5 and layer.weights.shape == (48, 640 * 5 // 8)
    assert torch.equal(layer.weight, torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(W.shape)))


def test_quantize_rounds_each_value_to_within_half_a_step():
    W = torch.randn(33, 256) * torch.linspace(0.01, 3, 256)
    layer = Int8DotLinear.quantize(W)
    step = W.view(33, 8, 32).abs().amax(-1, keepdim=True) / 127
    assert ((layer.weight - W).view(33, 8, 32).abs() <= step * 0.5 * 1.002 + 1e-7).all()
    x = activations(1, 256)
    error = (layer(x).double() - x.double() @ layer.weight.double().t()).abs()
    assert (error <= error_bound(x, layer.weight)).all()


def test_stacked_layers_give_the_parts_outputs_bit_for_bit():
    parts = [Int8DotLinear.from_int4(*random_int4(n, 576, seed=n)[:3]) for n in (576, 192, 192)]
    fused = Int8DotLinear.concat(parts)
    x = activations(1, 576)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    with pytest.raises(ValueError, match="bits"):
        Int8DotLinear.concat([parts[0], Int8DotLinear.quantize(torch.randn(4, 576))])


def test_many_rows_take_the_dense_path_on_the_same_weights():
    q, scale, offset, W = random_int4(96, 576)
    layer = Int8DotLinear.from_int4(q, scale, offset)
    x = activations(200, 576)  # >= dot_linear.DENSE_FROM_ROWS
    reference = x.double() @ W.t()
    # bfloat16 dense matmuls on AVX-512 BF16 CPUs (x and W rounded to 8 bits), float32 elsewhere
    torch.testing.assert_close(layer(x).double(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def test_bad_shapes_are_refused_with_a_message():
    with pytest.raises(ValueError, match="in_features % 64"):
        Int8DotLinear(torch.zeros(4, 48, dtype=torch.uint8), torch.zeros(4, 6, dtype=torch.float16), 4)
    layer = Int8DotLinear.from_int4(*random_int4(16, 64)[:3])
    with pytest.raises(RuntimeError, match="weights"):
        cpu_decode.matmul(torch.randn(1, 128), layer.weights, layer.scales, 4)


@pytest.mark.parametrize("B,H,H_kv,S,D", [(1, 9, 3, 100, 64), (2, 9, 3, 37, 64), (1, 4, 1, 600, 256), (3, 8, 8, 5, 32)])
def test_decode_attention_is_pytorchs_attention(B, H, H_kv, S, D):
    g = torch.Generator().manual_seed(B * S)
    cache_k, cache_v = torch.randn(2, B, H_kv, S + 17, D, generator=g)  # a longer cache: k, v are views of it
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    q = torch.randn(B, H, 1, D, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., -1] = True  # a step always sees its own position
    for m in (None, mask):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=D**-0.5, enable_gqa=True)
        assert cpu_decode.attention_applies(q, k, v, m)
        torch.testing.assert_close(cpu_decode.decode_attention(q, k, v, m, D**-0.5), expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_ignores_what_masked_slots_hold():
    """A static cache's unused slots hold anything (here NaN): masked, they must not leak in."""
    q, k, v = torch.randn(1, 2, 1, 32), torch.randn(1, 1, 8, 32), torch.randn(1, 1, 8, 32)
    mask = torch.tensor([True] * 5 + [False] * 3).view(1, 1, 1, 8)
    expected = F.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5], scale=0.2, enable_gqa=True)
    k[:, :, 5:], v[:, :, 5:] = float("nan"), float("nan")
    torch.testing.assert_close(cpu_decode.decode_attention(q, k, v, mask, 0.2), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,H,H_kv,S,D", [(1, 9, 3, 100, 64), (2, 9, 3, 37, 64), (1, 4, 1, 600, 256), (3, 8, 8, 5, 32)])
def test_decode_attention_reads_a_float16_cache(B, H, H_kv, S, D):
    """Packed models keep keys and values as float16 (`kv_dtype`): the kernel widens each one exactly
    and computes in float32, so it is PyTorch's attention over those float16 values (in float64 here)."""
    g = torch.Generator().manual_seed(B * S + 1)
    cache_k, cache_v = (torch.randn(2, B, H_kv, S + 17, D, generator=g) * 3).half()
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    q = torch.randn(B, H, 1, D, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., -1] = True
    for m in (None, mask):
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, scale=D**-0.5,
                                                  enable_gqa=True)
        assert cpu_decode.attention_applies(q, k, v, m)
        torch.testing.assert_close(cpu_decode.decode_attention(q, k, v, m, D**-0.5).double(), expected,
                                   rtol=1e-5, atol=1e-5)
    assert not cpu_decode.attention_applies(q, k, v.float(), None)  # k and v in one dtype
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_decode.decode_attention(q, k, v.float(), None, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        cpu_decode.decode_attention(q, k.bfloat16(), v.bfloat16(), None, 1.0)


def test_attention_outside_its_cases_is_left_to_pytorch():
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 9, 64)  # two queries: a prefill
    assert not cpu_decode.attention_applies(q, k, k, None)
    assert not cpu_decode.attention_applies(q[:, :, :1].double(), k.double(), k.double(), None)
    assert not cpu_decode.attention_applies(q[:, :, :1, :24], k[..., :24], k[..., :24], None)  # head size not a multiple of 16
    assert not cpu_decode.attention_applies(q[:, :, :1], k, k.transpose(-1, -2).contiguous().transpose(-1, -2), None)
    one = torch.randn(1, 1, 4, 64).transpose(1, 2)  # one position, odd strides: still fine
    assert cpu_decode.attention_applies(q[:, :, :1], one, one, None)


def test_the_kernels_can_be_turned_off():
    """LUCIDLM_CPU_KERNELS=0: available() is False in a fresh process (the loader then builds Int4Linear)."""
    code = "from lucidlm.kernels import cpu_decode; print(cpu_decode.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "LUCIDLM_CPU_KERNELS": "0"}, check=True)
    assert out.stdout.strip() == "False"


# ----- packed models built on these kernels, against transformers and the float32 model -----

@pytest.mark.parametrize("encoding,tie", [("Q4_0", True), ("Q4_1", True), ("Q4_1", False), ("Q5_0", False), ("Q5_1", True)],
                         ids=["q4_0-tied", "q4_1-tied", "q4_1-untied-294-rows", "q5_0-untied", "q5_1-tied"])
def test_tiny_packed_model_matches_transformers(tmp_path, encoding, tie):
    """Every matrix 4-bit or 5-bit (q/k rows permuted as llama.cpp writes them, undone by the loader);
    the untied output matrix has 294 rows (no multiple of 16: PyTorch's int4 kernel could not take it).
    The values transformers gets are gguf's own decoding of the quantized bytes."""
    from gguf import GGMLQuantizationType
    from test_loading_gguf import VOCAB_SIZE, hf_llama_and_gguf_tensors, tiny_metadata, write_gguf
    from test_packed import _kl_and_agreement

    import lucidlm

    hf_model, tensors = hf_llama_and_gguf_tensors(tie=tie, encoding=getattr(GGMLQuantizationType, encoding))
    model = lucidlm.load(str(write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), tensors)), progress=False)
    layers = [model.model.layers[0].self_attn.qkv_proj, model.model.layers[1].mlp.down_proj]
    assert all(isinstance(m, Int8DotLinear) and m.bits == int(encoding[1]) for m in layers)
    layer_ops = [m for m in model.model.modules() if hasattr(m, "cpu_kernel")]
    assert len(layer_ops) == 2 * 3 + 1 + 1 and all(m.cpu_kernel for m in layer_ops)  # cpu_layer_ops.cpp
    if not tie:
        assert isinstance(model.model.lm_head, Int8DotLinear) and model.model.lm_head.out_features == 294
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB_SIZE, size=(48,)))
    with torch.inference_mode():
        expected = hf_model(ids[None]).logits[0].float()
        cache = model.model.new_cache(1, 48)
        stepped = torch.cat([model.model(ids[None, t:t + 1], cache)[0] for t in range(48)])  # decode steps: the kernels
    # The kernels' only rounding is x's two-term int8 (~1e-5 of each group's max): float32 parity.
    torch.testing.assert_close(stepped, expected, rtol=0, atol=2e-3 * expected.abs().max().item())
    kl, top1 = _kl_and_agreement(expected, model.logits(ids.tolist()))  # one pass: the dense path
    assert kl.mean() < 1e-3 and top1 >= 0.9, (float(kl.mean()), top1)


@pytest.fixture(scope="module")
def smollm_packed(smollm_path):
    import lucidlm

    return lucidlm.load(str(smollm_path), progress=False, dtype="packed")


@pytest.mark.slow
def test_smollm_packed_modules_are_ours(smollm_packed, lucid_smollm):
    from lucidlm.models.packed import Q8Embedding

    model = smollm_packed.model
    stacked = [m for m in model.modules() if isinstance(m, Int8DotLinear) and m.bits == 4]
    assert len(stacked) == 4 * model.config.n_layers  # q/k/v stacked, o, gate/up stacked, down
    assert isinstance(model.embed_tokens, Q8Embedding)
    head = model.lm_head
    assert isinstance(head, Int8DotLinear) and head.bits == 8
    assert torch.equal(head.weight_rows(100, 164), model.embed_tokens(torch.arange(100, 164)))  # the Q8_0 table, exactly
    # decode steps' attention: our kernel in the packed model only, never in the float32 reference
    assert {layer.self_attn.decode_kernel for layer in model.layers} == {True}
    assert {layer.self_attn.decode_kernel for layer in lucid_smollm.model.layers} == {False}
    # keys and values stored as float16 for that kernel; the float32 reference keeps float32
    assert model.new_cache(1, 4).keys[0].dtype == torch.float16
    assert lucid_smollm.model.new_cache(1, 4).keys[0].dtype == torch.float32


def _decode_logits(model, ids):
    with torch.inference_mode():
        cache = model.new_cache(1, len(ids))
        return torch.cat([model(torch.tensor([[t]]), cache)[0] for t in ids])


@pytest.mark.slow
def test_smollm_packed_decode_is_the_float32_model(lucid_smollm, smollm_packed):
    """Decode steps through the kernels against the float32 model (every weight dequantized, which
    matches transformers: test_models_llama.py): the 4-bit values, their float16 scales and the Q8_0
    head are exact, so only x's rounding and the float16 KV cache remain. Observed mean KL ~4e-7
    (7e-8 with a float32 cache; llama.cpp on the same file: 3e-3, bench/RESULTS.md)."""
    from prompts import PASSAGE
    from test_packed import _kl_and_agreement

    ids = lucid_smollm.tokenizer.encode(PASSAGE)[:160]
    kl, top1 = _kl_and_agreement(lucid_smollm.logits(ids), _decode_logits(smollm_packed.model, ids))
    assert kl.mean() < 1e-5 and top1 == 1.0, (float(kl.mean()), top1)


@pytest.mark.slow
def test_smollm_packed_decode_logits_are_not_rounded_to_bfloat16(smollm_packed, lucid_smollm):
    """PyTorch's weight-only kernels return bfloat16 (test_packed.py's xfail); ours return float32."""
    ids = lucid_smollm.tokenizer.encode("The capital of France is")
    last = _decode_logits(smollm_packed.model, ids)[-1]
    assert not torch.equal(last, last.bfloat16().float())


@pytest.mark.slow
def test_gemma_packed_decode_is_close_to_the_float32_model(gemma_path):
    """Gemma 3's Q5_0 block matrices are held exactly (5-bit), its Q6_K/Q8_0 ones re-rounded to int8
    (a scale per 32): observed mean KL ~1.1e-4 from the float32 model (4.5e-4 while the Q5_0 ones
    were int8 too; llama.cpp on the same file: 5e-3, bench/RESULTS.md)."""
    import lucidlm
    from prompts import PASSAGE
    from test_packed import _kl_and_agreement

    exact = lucidlm.load(str(gemma_path), progress=False, dtype="float32")
    packed = lucidlm.load(str(gemma_path), progress=False)
    bits = {m.bits for m in packed.model.modules() if isinstance(m, Int8DotLinear)}
    assert bits == {4, 5, 8}, bits
    ids = exact.tokenizer.encode(PASSAGE)[:120]
    kl, top1 = _kl_and_agreement(exact.logits(ids), _decode_logits(packed.model, ids))
    assert kl.mean() < 5e-4 and top1 >= 0.95, (float(kl.mean()), top1)


def test_argmax_is_torchs_argmax():
    """Greedy decoding's choice: the same index as torch.argmax, ties (the first), NaN (the first),
    all -inf (0), rows shorter than a vector and long ones (Gemma 3's 262,144 logits)."""
    g = torch.Generator().manual_seed(4)
    rows = [torch.randn(3, 262144, generator=g), torch.randn(2, 7, generator=g), torch.randn(1, 49152, generator=g)[:, :49151]]
    tied = torch.randn(2, 100, generator=g)
    tied[:, [17, 40, 99]] = 50.0  # ties across lanes and in the tail
    nan = torch.randn(2, 300, generator=g)
    nan[0, [120, 250]] = float("nan")
    nan[1, 299] = float("nan")
    rows += [tied, nan, torch.full((1, 40), -float("inf")), torch.full((1, 5), -float("inf")),
             torch.randn(4, 50, generator=g)[:, 3:]]  # rows strided, contiguous within
    for x in rows:
        assert torch.equal(cpu_decode.argmax(x), x.argmax(-1)), x.shape


def test_greedy_sampler_takes_the_kernel_and_agrees():
    from lucidlm.sampling import SamplingParams, make_sampler

    logits = torch.randn(2, 5000)
    assert cpu_decode.loaded()
    assert torch.equal(make_sampler(SamplingParams())(logits), logits.argmax(-1))


def test_a_slow_build_is_announced_and_a_cached_one_is_not(monkeypatch):
    """The first load builds the kernels (~5-10 s): a line on stderr says so after a second; when they
    come from PyTorch's cache (or are loaded already) nothing is printed."""
    import io
    import time

    monkeypatch.setattr(cpu_decode, "loaded", lambda: False)
    for seconds, announced in ((0.3, True), (0.0, False)):
        monkeypatch.setattr(cpu_decode, "available", lambda s=seconds: time.sleep(s) or True)
        stream = io.StringIO()
        assert cpu_decode.available_with_notice(delay=0.1, stream=stream)
        assert (cpu_decode.BUILD_NOTICE in stream.getvalue()) == announced
    stream = io.StringIO()
    assert cpu_decode.available_with_notice(enabled=False, delay=0.0, stream=stream) and stream.getvalue() == ""
