"""Kernels for decode steps on a CPU with AVX-512 VNNI, in C++ (cpu_decode.cpp), used by packed models.

1. `matmul`: integer dot products, int8 activations times 4-, 5- or 8-bit weights.

Why: a batch-1 decode step multiplies one row by every weight matrix, and PyTorch's weight-only
CPU kernels (and Inductor's templates for them) turn each 4-bit weight into a float before a
float multiply-add: several instructions per weight, so on 2 cores they fall short of memory
bandwidth. AVX-512 VNNI multiplies 64 bytes by 64 bytes into 16 int32 sums in one instruction
(`vpdpbusd`). So, as llama.cpp does, we round the activations to integers as well, with one
scale per group of 32 values (the weights' own grouping), and multiply integers. Unlike
llama.cpp we round x to two int8 terms (x ~ e (256 p1 + p2)): one more instruction per 64
weights, which a kernel bound by reading its weights from memory has time for, and x's rounding
error drops from ~1/254 of each group's maximum to ~1/65000: decode steps compute what the
float32 model computes (next-token KL ~1e-7 on SmolLM2, where llama.cpp's one-term rounding
costs 3e-3: bench/RESULTS.md). `bench/decode_kernels.py` times it against PyTorch's kernel on a
whole model's worth of matrices streamed from memory, as a decode step reads them. Several rows
(a batch of sequences, a prompt) share the decoded weights: up to 3 rows take each chunk together;
from 8 rows, 16 weight rows at a time are decoded and transposed so that their outputs lie across
the vector lanes (`bench/kernel_ab.py`: per row of x, 1.4x the one-row arithmetic at 4 rows, 2.4x
at 8, 2.5x at 16, 3x at 64).

Layout (`Int8DotLinear` builds it): the weight W (N, K) in chunks of 64 values (two groups of
32: A, B), each chunk's values q stored as unsigned bytes (4-bit: 32 bytes, byte b holding
value b in its low nibble and value 32 + b in its high one; 5-bit: those 32 bytes for the low
four bits, then 8 bytes of fifth bits; 8-bit: 64 bytes, q + 128) and float16 scales and offsets
per chunk (W = scale * q + offset: 4- and 5-bit, scale and offset of A and B; 8-bit, the scales
of A and B, the offsets being -128 * scale). The C++ source (cpu_decode.cpp) has the arithmetic.

2. `decode_attention` (cpu_attention.cpp): the attention of one query per sequence over the
cache, float32 (its docstring says why).

3. `dequantize`: rows of such a weight as float32 or bfloat16, for the dense (prefill) path.

4. `argmax`: the index of each row's largest value (greedy decoding), ~10x PyTorch's reduction.

5. `rms_norm`, `rotary`, `gated_activation` (cpu_layer_ops.cpp): a layer's RMSNorm, RoPE and
SwiGLU/GeGLU activation, each in one call instead of 3-8 tensor operations, the same float32
arithmetic (a decode step pays ~1-2 us per operation for a few thousand numbers at most; SmolLM2
makes 61 norms, 60 rotations and 30 activations a step). `rope_and_store`: direct decode steps'
(`lucidlm.direct_decode`) QK-norm, RoPE and cache writes in one call.

The kernels (cpu_decode.cpp, cpu_attention.cpp, cpu_layer_ops.cpp) are compiled on first use with the C++ compiler
PyTorch's extensions use (~25 s on 2 cores; cached in torch's extension directory, `TORCH_EXTENSIONS_DIR`)
and only on x86 CPUs with AVX-512 VNNI; elsewhere, or if the build fails (the warning says why),
`available()` is False and packed models keep PyTorch's weight-only kernels (and attention).
LUCIDLM_CPU_KERNELS=0 turns them off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCES = [str(Path(__file__).with_name(name))
           for name in ("cpu_decode.cpp", "cpu_attention.cpp", "cpu_layer_ops.cpp", "bindings.cpp")]
CHUNK = 64  # values per chunk of the layout: two groups of 32
HEADERS = [Path(__file__).with_name(name)  # included by the sources
           for name in ("vector_math.h", "kernels.h", "int8_rows_across.h")]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-fopenmp"]


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (and the AVX-512 subsets the kernel uses), from /proc/cpuinfo."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "f16c", "fma"} <= set(flags.split(":")[-1].split())


@functools.cache
def available() -> bool:
    """Whether these kernels run here: an x86 CPU with AVX-512 VNNI, a C++ compiler, and
    not turned off (LUCIDLM_CPU_KERNELS=0). Builds them the first time (cached on disk)."""
    if os.environ.get("LUCIDLM_CPU_KERNELS", "1") == "0" or not cpu_has_vnni():
        return False
    if loaded():
        return True
    try:
        from torch.utils import cpp_extension
        # PyTorch rebuilds when a source or a flag changes, not a header: the headers' hash is a flag
        headers = hashlib.sha256(b"".join(path.read_bytes() for path in HEADERS)).hexdigest()[:16]
        module = cpp_extension.load(name="lucidlm_cpu_decode", sources=SOURCES,
                                    extra_cflags=FLAGS + [f"-DLUCIDLM_HEADERS={headers}"], extra_ldflags=["-fopenmp"],
                                    is_python_module=True, verbose=False)
    except Exception as error:  # no compiler, no ninja, a compiler error: PyTorch's kernels instead
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        warnings.warn(f"the int8-dot decode kernel could not be built ({reason}); using PyTorch's "
                      "weight-only kernels", RuntimeWarning, stacklevel=2)
        return False
    global _bound
    _bound = module
    # the outputs' shapes, for torch.compile's tracing (the operators are C++)
    torch.library.register_fake("lucidlm_kernels::int8_dot_matmul", _fake)
    torch.library.register_fake("lucidlm_kernels::decode_attention", _fake_attention)
    torch.library.register_fake("lucidlm_kernels::argmax", lambda x: x.new_empty(x.shape[0], dtype=torch.long))
    for name in ("rms_norm", "rotary"):  # (the models call these eagerly only; traced, their tensor operations)
        torch.library.register_fake(f"lucidlm_kernels::{name}", lambda x, *rest: torch.empty_like(x, memory_format=torch.contiguous_format))
    torch.library.register_fake("lucidlm_kernels::gated_activation",
                                lambda x, act: x.new_empty(*x.shape[:-1], x.shape[-1] // 2))
    return True


BUILD_NOTICE = "Building LucidLM's CPU decode kernels (first use only, ~25 s; cached afterwards)..."


def available_with_notice(enabled: bool = True, delay: float = 1.0, stream=None) -> bool:
    """`available()`, and if that takes longer than `delay` seconds (building the kernels: their first
    use, or after an upgrade), a line on stderr saying so, so that a first load does not look hung."""
    if not enabled or loaded():
        return available()
    notice = threading.Timer(delay, lambda: print(BUILD_NOTICE, file=stream or sys.stderr, flush=True))
    notice.start()
    try:
        return available()
    finally:
        notice.cancel()


_bound = None  # the built extension as a Python module (bindings.cpp), once `available()` has loaded it


def bound():
    """The operators a direct decode step calls (`int8_dot_matmul`, `decode_attention`, `rms_norm`,
    `gated_activation`, `rope_and_store`; same arguments as the wrappers here), bound straight to Python
    (bindings.cpp): the same C++ functions as the registered operators without the dispatcher's ~1 µs a
    call. Not traceable by torch.compile: the models call the operators. None until `available()`."""
    return _bound


def loaded() -> bool:
    """Whether the kernels are built and loaded in this process already (by `available()`; a
    packed model's loader calls it). Never builds them: for code that uses them only if present."""
    return hasattr(torch.ops.lucidlm_kernels, "argmax")


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x (B, V) float32 on the CPU, rows contiguous -> (B,) long: torch.argmax(x, -1), ties and NaN
    alike (the first index of the maximum; the first NaN if any)."""
    return torch.ops.lucidlm_kernels.argmax(x)


def matmul(x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """x (..., K) times Wᵀ -> (..., N) float32, W in the layout above (weights (N, K*bits/8) uint8,
    scales (N, K/64*4) or, 8-bit, (N, K/64*2) float16). x is rounded to two int8 terms inside, a
    scale per 32 values (cpu_decode.cpp's quantize_rows)."""
    return torch.ops.lucidlm_kernels.int8_dot_matmul(x if x.dtype == torch.float32 else x.float(), weights, scales, bits)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * (weight + weight_offset) over the last dimension of x (..., C) float32
    on the CPU; weight (C,) float32. weight_offset 1 is Gemma's norm (its weights are stored minus one)."""
    return torch.ops.lucidlm_kernels.rms_norm(x, weight, eps, weight_offset)


ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # gated_activation's `act` numbers


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for the output of a fused [gate | up] projection, gate_up (..., 2F) float32 on the
    CPU -> (..., F): SwiGLU's activation ("silu") or GeGLU's ("gelu_tanh", GELU's tanh form)."""
    return torch.ops.lucidlm_kernels.gated_activation(gate_up, ACTIVATIONS[activation])


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE, "rotate half" layout: x * cos + swap_halves(x) * signed_sin for x (B, H, T, D) float32 on the
    CPU with each head's D values contiguous; cos, signed_sin (B, 1, T, D) float32, contiguous."""
    return torch.ops.lucidlm_kernels.rotary(x, cos, signed_sin)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, cos: torch.Tensor,
                   signed_sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: int,
                   q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
                   norm_offset: float = 0.0) -> torch.Tensor:
    """A decode step's projections into the KV cache, in one call: q (B, 1, H*D), k, v (B, 1, H_kv*D)
    float32 (each row contiguous: views of a fused projection will do) -> the rotated q (B, H, 1, D);
    k rotated and v written to slot `slot` of keys, values (B, H_kv, S, D) (float32 or float16,
    contiguous). With q_norm, k_norm (D,): each head RMS-normed first (eps, norm_offset as `rms_norm`'s),
    Gemma 3's QK-norm. The values are `rms_norm`'s, `rotary`'s and a converting copy's, bit for bit
    (the same code); needs D a multiple of 32."""
    return torch.ops.lucidlm_kernels.rope_and_store(q, k, v, n_heads, cos, signed_sin, keys, values, slot,
                                                    q_norm, k_norm, eps, norm_offset)


def attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `decode_attention` takes this: one float32 query per sequence on a CPU, head size a
    multiple of 16, a float32 or float16 cache with contiguous rows, a bool mask or none. (Which
    models use it at all is theirs to say: `decode_kernel`, set by the packed loader where `available()`.)"""
    return (q.shape[2] == 1 and q.device.type == "cpu" and q.dtype == torch.float32 and attention_fits(q.shape[-1])
            and k.dtype == v.dtype and k.dtype in (torch.float32, torch.float16)
            and _rows_contiguous(k) and _rows_contiguous(v) and (mask is None or mask.dtype == torch.bool))


def attention_fits(head_dim: int) -> bool:
    """Whether `decode_attention` takes heads of this size (16 values per vector, whole vectors). The
    loader keeps a float16 cache only for models it fits: elsewhere every step would widen the cache."""
    return head_dim % 16 == 0


def _rows_contiguous(t: torch.Tensor) -> bool:
    """Each position's D values contiguous and positions D apart (a view of the cache is)."""
    return t.stride(-1) == 1 and (t.shape[-2] == 1 or t.stride(-2) == t.shape[-1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax(q kᵀ scale + mask) v for one query per sequence: q (B, H, 1, D), k, v (B, H_kv, S, D)
    (views of the cache, float32 or float16: read as they are, widened to float32 in registers),
    mask (B, 1, 1, S) bool or None. PyTorch's fused kernel spends ~15-30 µs
    a call setting up for this; the arithmetic of a small model's step is a few µs (SmolLM2: 30
    calls a step). Float32 throughout, equal to PyTorch's to ~1e-6."""
    return torch.ops.lucidlm_kernels.decode_attention(q, k, v, mask, scale)


def dequantize(weights: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """The float values of rows of a weight in the layout above, into `out` ((rows, K) float32 or
    bfloat16, contiguous): scale * q + offset in float32, for bfloat16 rounded once (the dense
    prefill path decodes its weights with this, ~5x faster than doing it with tensor operations)."""
    torch.ops.lucidlm_kernels.dequantize(weights, scales, bits, out)
    return out


def _fake(x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weights.shape[0], dtype=torch.float32)


def _fake_attention(q, k, v, mask, scale):
    return q.new_empty(q.shape)
