"""The one-call RMSNorm, RoPE and gated-activation kernels (lucidlm/kernels/cpu_layer_ops.cpp)
against PyTorch's RMSNorm and activations and transformers' rotary embedding, and the matmul
kernel's handling of its input's shape.

Packed models on AVX-512 VNNI CPUs compute every norm, rotation and SwiGLU/GeGLU activation with these (`cpu_kernel`, set by
the loader); the whole-model comparisons with transformers (test_cpu_decode.py's tiny GGUF models,
the Gemma 3 decode test) run through them as well.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lucidlm.kernels import cpu_decode
from lucidlm.models.dot_linear import DENSE_FROM_ROWS

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="needs AVX-512 VNNI and a C++ compiler")

# Only the sum of squares is added up in another order than PyTorch's: a few float32 ulps.
NORM_TOLERANCE = dict(rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 640), (1, 9, 1, 64), (3, 100), (1, 512, 576), (4, 1)],
                         ids=["decode", "batch", "qk-norm", "C-not-a-multiple-of-16", "prompt", "C=1"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_is_pytorchs(shape, offset):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 3
    weight = torch.randn(shape[-1], generator=g)
    expected = F.rms_norm(x, (shape[-1],), weight + offset, eps=1e-6)
    torch.testing.assert_close(cpu_decode.rms_norm(x, weight, 1e-6, offset), expected, **NORM_TOLERANCE)


def test_rms_norm_takes_strided_input_and_tiny_rows():
    x = torch.randn(2, 5, 128)[:, ::2, :64]  # neither contiguous nor dense
    weight = torch.rand(64)
    torch.testing.assert_close(cpu_decode.rms_norm(x, weight, 1e-5), F.rms_norm(x, (64,), weight, eps=1e-5),
                               **NORM_TOLERANCE)
    zeros = torch.zeros(1, 64)  # mean 0: eps alone keeps it finite, as in PyTorch
    assert torch.equal(cpu_decode.rms_norm(zeros, weight, 1e-5), F.rms_norm(zeros, (64,), weight, eps=1e-5))


def _hf_rotation(x: torch.Tensor, positions: torch.Tensor, base: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' rotary embedding of x (B, H, T, D) at positions (B, T), and the cos and signed sin
    (B, 1, T, D) our kernel takes for the same angles."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    D = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = positions.double()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()  # (B, T, D)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)  # unsqueezes the head dimension itself
    signed_sin = torch.cat([-sin[..., :D // 2], sin[..., D // 2:]], dim=-1)
    return rotated, cos.unsqueeze(1).contiguous(), signed_sin.unsqueeze(1).contiguous()


@pytest.mark.parametrize("B,H,T,D", [(1, 9, 1, 64), (1, 3, 1, 64), (2, 4, 5, 256), (1, 2, 300, 32), (3, 1, 2, 6)])
def test_rotary_is_transformers_rotary_embedding(B, H, T, D):
    g = torch.Generator().manual_seed(B * H * T + D)
    # as a model hands it over: heads viewed out of a fused q/k/v projection's output
    fused = torch.randn(B, T, (H + 2) * D, generator=g)
    x = fused[..., :H * D].view(B, T, H, D).transpose(1, 2)  # (B, H, T, D), not contiguous
    positions = torch.randint(0, 30000, (B, T), generator=g)
    expected, cos, signed_sin = _hf_rotation(x, positions, base=10000.0)
    # the same multiplies and adds (the compiler may fuse one pair: an ulp of the largest term)
    torch.testing.assert_close(cpu_decode.rotary(x, cos, signed_sin), expected, rtol=1e-6, atol=1e-5)


def test_rope_module_takes_the_kernel_and_agrees_with_its_tensor_operations():
    from lucidlm.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(64, 10000.0, 4096)
    x = torch.randn(2, 9, 7, 64)
    positions = torch.arange(100, 114).view(2, 7)
    expected, _, _ = _hf_rotation(x, positions, base=10000.0)
    rope.cpu_kernel = True
    torch.testing.assert_close(rope(x, positions), expected, rtol=1e-6, atol=1e-5)
    rope.cpu_kernel = False
    torch.testing.assert_close(rope(x, positions), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 1, 2 * 1536), (1, 1, 2 * 2048), (2, 9, 2 * 100), (300, 2 * 8)],
                         ids=["smollm2", "gemma3", "F-not-a-multiple-of-16", "many-rows-F-below-16"])
def test_gated_activation_is_pytorchs(shape, activation):
    """act(gate) * up of a fused [gate | up] output, against PyTorch's silu and tanh-form gelu, values
    from tiny to large of both signs (e^-|x| never overflows)."""
    g = torch.Generator().manual_seed(shape[-1])
    gate_up = torch.randn(*shape, generator=g) * 4
    gate_up[..., :6] = torch.tensor([0.0, -0.0, 1e-7, -1e-7, 90.0, -90.0])
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    expected, ours = act * up, cpu_decode.gated_activation(gate_up, activation)
    # Our exponential against SLEEF's, then a division: a few float32 ulps of each product, and where
    # GELU is near 0 (gate << 0) its 1 + tanh(...) cancels, in PyTorch too: an ulp of 1 (2^-23) times
    # |gate up| / 2 apart at most.
    bound = 3e-6 * expected.abs() + 2**-23 * (gate * up).abs() + 1e-30
    assert ours.shape == expected.shape
    assert ((ours - expected).abs() <= bound).all(), float(((ours - expected).abs() / bound).max())


def test_bad_inputs_are_refused_with_a_message():
    with pytest.raises(RuntimeError, match="weight: \\(C,\\) float32"):
        cpu_decode.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_decode.rms_norm(torch.randn(2, 8).double(), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="cos, signed_sin"):
        cpu_decode.rotary(torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
    with pytest.raises(RuntimeError, match="gate_up"):
        cpu_decode.gated_activation(torch.randn(2, 7), "silu")
    with pytest.raises(KeyError):
        cpu_decode.gated_activation(torch.randn(2, 8), "relu")
    with pytest.raises(RuntimeError, match="D even"):
        cpu_decode.rotary(torch.randn(1, 2, 3, 7), torch.randn(1, 1, 3, 7), torch.randn(1, 1, 3, 7))


def test_matmul_keeps_the_inputs_leading_dimensions_bit_for_bit():
    """Int8DotLinear hands x (..., K) over as it is: the same numbers as the flattened (M, K) call."""
    from lucidlm.models.dot_linear import Int8DotLinear

    layer = Int8DotLinear.quantize(torch.randn(96, 128))
    x = torch.randn(2, 3, 256)[..., ::2]  # (2, 3, 128), strided
    flat = cpu_decode.matmul(x.reshape(6, 128).contiguous(), layer.weights, layer.scales, layer.bits)
    shaped = layer(x)
    assert shaped.shape == (2, 3, 96)
    assert torch.equal(shaped.reshape(6, 96), flat)
    one = cpu_decode.matmul(x[0, 0][None].contiguous(), layer.weights, layer.scales, layer.bits)
    assert torch.equal(layer(x[0, 0]), one[0])  # a single vector (K,) -> (N,)


def test_left_padded_batch_of_a_packed_model_matches_transformers(tmp_path):
    """Two prompts of different lengths, the shorter left-padded, through a tiny Q4_1 GGUF model:
    each row's RMSNorms run over its own vectors and each row's RoPE at its own positions (a prompt
    pass of 2 x 14 rows, then decode steps), through these kernels. Every row's logits are
    transformers' on that sequence alone."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from test_loading_gguf import VOCAB_SIZE, hf_llama_and_gguf_tensors, tiny_metadata, write_gguf

    import lucidlm

    hf_model, tensors = hf_llama_and_gguf_tensors(tie=True, encoding=GGMLQuantizationType.Q4_1)
    model = lucidlm.load(str(write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), tensors)), progress=False).model
    assert all(m.cpu_kernel for m in model.modules() if hasattr(m, "cpu_kernel"))  # norms, RoPE, MLPs
    rng = np.random.default_rng(3)
    prompt_lengths, steps = [9, 14], 6
    assert 2 * max(prompt_lengths) < DENSE_FROM_ROWS  # the prompt pass on the kernels too, not the dense path
    sequences = [torch.from_numpy(rng.integers(0, VOCAB_SIZE, size=(n + steps,))) for n in prompt_lengths]
    width = max(prompt_lengths)
    tokens = torch.zeros(2, width, dtype=torch.long)
    valid = torch.zeros(2, width, dtype=torch.bool)
    for row, (seq, n) in enumerate(zip(sequences, prompt_lengths)):
        tokens[row, width - n:], valid[row, width - n:] = seq[:n], True
    with torch.inference_mode():
        cache = model.new_cache(2, width + steps)
        ours = [model(tokens, cache, valid=valid)[:, -1]]  # (2, V): the last prompt position of each row
        for t in range(steps - 1):
            fed = torch.stack([seq[n + t] for seq, n in zip(sequences, prompt_lengths)])[:, None]  # (2, 1)
            ours.append(model(fed, cache)[:, -1])
        ours = torch.stack(ours, dim=1)  # (2, steps, V)
        for row, (seq, n) in enumerate(zip(sequences, prompt_lengths)):
            expected = hf_model(seq[None, :n + steps - 1]).logits[0, n - 1:].float()  # (steps, V)
            # as the single-sequence test in test_cpu_decode.py: x's int8 rounding only
            torch.testing.assert_close(ours[row], expected, rtol=0, atol=2e-3 * expected.abs().max().item())


@pytest.mark.parametrize("B,H,H_kv,D,cache_dtype,qk_norm", [(1, 9, 3, 64, torch.float16, False),
                                                           (2, 4, 1, 256, torch.float16, True),
                                                           (3, 2, 2, 32, torch.float32, False)],
                         ids=["smollm2", "gemma3-batch", "float32-cache"])
def test_rope_and_store_is_the_norms_rotations_and_copies_it_replaces(B, H, H_kv, D, cache_dtype, qk_norm):
    """rope_and_store (direct decode steps) against the calls the forward makes for the same work: rms_norm
    per head (Gemma's QK-norm), rotary on q and k, and the cache write (a converting copy): equal bit for
    bit (direct steps promise the forward's logits exactly). The rotations themselves are held to
    transformers' by the test above; the rest of the cache is left alone."""
    g = torch.Generator().manual_seed(D + B)
    fused = torch.randn(B, 1, (H + 2 * H_kv) * D, generator=g) * 2  # one fused projection's output
    q, k, v = fused.split([H * D, H_kv * D, H_kv * D], dim=-1)
    positions = torch.randint(0, 30000, (B, 1), generator=g)
    _, cos, signed_sin = _hf_rotation(q.view(B, 1, H, D).transpose(1, 2), positions, base=10000.0)
    keys = torch.randn(B, H_kv, 12, D, generator=g).to(cache_dtype)
    values = torch.randn(B, H_kv, 12, D, generator=g).to(cache_dtype)
    norms = (torch.randn(D, generator=g), torch.randn(D, generator=g), 1e-6, 1.0) if qk_norm else ()
    expected_keys, expected_values = keys.clone(), values.clone()

    heads_q, heads_k = q.view(B, 1, H, D).transpose(1, 2), k.view(B, 1, H_kv, D).transpose(1, 2)
    if qk_norm:
        heads_q = cpu_decode.rms_norm(heads_q, norms[0], norms[2], norms[3])
        heads_k = cpu_decode.rms_norm(heads_k, norms[1], norms[2], norms[3])
    expected_q = cpu_decode.rotary(heads_q, cos, signed_sin)
    expected_keys[:, :, 7:8] = cpu_decode.rotary(heads_k, cos, signed_sin)
    expected_values[:, :, 7:8] = v.view(B, 1, H_kv, D).transpose(1, 2)

    got_q = cpu_decode.rope_and_store(q, k, v, H, cos, signed_sin, keys, values, 7, *norms)
    assert got_q.shape == (B, H, 1, D)
    assert torch.equal(got_q, expected_q)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


def test_rope_and_store_refuses_what_it_cannot_take():
    q, k, v = torch.randn(1, 1, 128), torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    cos, sin = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    keys, values = torch.zeros(1, 1, 4, 64, dtype=torch.float16), torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="slot within the cache"):
        cpu_decode.rope_and_store(q, k, v, 2, cos, sin, keys, values, 4)
    with pytest.raises(RuntimeError, match="head_dim a multiple of 32"):
        cpu_decode.rope_and_store(q[..., :32], k[..., :16], v[..., :16], 2, cos[..., :16], sin[..., :16],
                                  keys[..., :16].contiguous(), values[..., :16].contiguous(), 0)
    with pytest.raises(RuntimeError, match="q \\(B, 1, H\\*D\\)"):
        cpu_decode.rope_and_store(q, k, v, 3, cos, sin, keys, values, 0)  # 3 heads of 64 are not 128 values
    with pytest.raises(RuntimeError, match="float32 or float16"):
        cpu_decode.rope_and_store(q, k, v, 2, cos, sin, keys.bfloat16(), values.bfloat16(), 0)
    with pytest.raises(RuntimeError, match="both or neither"):
        cpu_decode.rope_and_store(q, k, v, 2, cos, sin, keys, values, 0, torch.ones(64), None, 1e-6, 0.0)
