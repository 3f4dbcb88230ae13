"""Turning a GGUF file into a ready model: read, check, dequantize, fix up, assign.

The model is built on PyTorch's `meta` device (shapes only, no memory, no random init),
then every parameter is replaced by the tensor decoded from the file. Before anything is
decoded we check that the file has exactly the tensors the config implies, with the right
shapes and supported types, so a bad file fails fast with a message naming the problem.

Three ways to hold the weights (`dtype`):

    "float32"   every tensor dequantized to float32: the exact reference arithmetic
                (what HF transformers computes from the same file); used by the parity tests.
    "bfloat16"  dense bfloat16 weights and activations (half the memory, AVX-512 BF16 speed).
    "packed"    4-bit matrices (Q4_0/Q4_1/Q4_K) stay 4-bit, the Q8_0 embedding table stays
                Q8_0, read from the mapped file row by row (`Q8Embedding`, exact lookups),
                other quantized matrices (Q5_0, Q6_K, Q8_0) become int8. On CPUs with AVX-512
                VNNI all of them are `models.dot_linear.Int8DotLinear`s (the 4-bit values and
                their float16 scales exact, Q5_0/Q5_1 exact as 5-bit values, others int8 with a
                scale per 32 values, a tied Q8_0 head exact), multiplied in decode steps by our
                own integer-dot kernel
                (`kernels.cpu_decode`). Elsewhere: `models.packed.Int4Linear` (scales in
                bfloat16) and `Int8Linear` (a scale per row; a head larger than the blocks
                together, as Gemma 3's, an `Int8Head` where PyTorch runs AVX2 kernels:
                `models.packed_head`), PyTorch's weight-only kernels. Activations and KV cache
                stay float32. The fastest on CPU and the smallest in memory; `bench/quality.py`
                measures what it changes in the next-token distribution (less than llama.cpp).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..direct_decode import install as install_direct_decode
from ..errors import ModelFileError, UnsupportedError
from ..models.gemma3 import Gemma3
from ..models.llama import Llama
from ..kernels import cpu_decode
from ..models.dot_linear import Int8DotLinear
from ..models.fusion import fuse_projections
from ..models.packed import DENSE_DTYPE, Int4Linear, Int8Linear, Q8Embedding
from ..models.packed_head import use_int8_head_where_it_pays
from ..progress import Progress
from ..tokenizers import BPETokenizer
from ..tokenizers.registry import tokenizer_from_gguf_metadata
from .gguf import GGUFFile
from .gguf_gemma3 import GEMMA3_TENSOR_NAMES, gemma3_config, gemma3_fix_up
from .gguf_llama import LLAMA_TENSOR_NAMES, expand_layer_names, llama_config, llama_fix_up
from .quants import AFFINE_4BIT_TYPES, AFFINE_5BIT_TYPES, affine_4bit, affine_5bit, check_supported, dequantize

# general.architecture -> (config builder, model class, name table, fix-up)
GGUF_ARCHITECTURES = {
    "llama": (llama_config, Llama, LLAMA_TENSOR_NAMES, llama_fix_up),
    "gemma3": (gemma3_config, Gemma3, GEMMA3_TENSOR_NAMES, gemma3_fix_up),
}


@dataclass
class LoadedGGUF:
    model: torch.nn.Module
    tokenizer: BPETokenizer
    metadata: dict
    tensor_types: dict[str, str]  # our parameter name -> ggml type in the file ("Q4_1", ...)
    path: Path


def build_tokenizer(meta: dict, path: Path):
    return tokenizer_from_gguf_metadata(meta, str(path))


WEIGHT_DTYPES = ("float32", "bfloat16", "packed")


def release_freed_memory() -> None:
    """Give memory freed during loading back to the system (glibc keeps freed blocks of the
    many transient decode buffers in its arenas otherwise: ~250 MiB of RSS for SmolLM2)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


# glibc serves an allocation above a threshold (128 KiB, raised as such blocks are freed) with
# pages mapped from the system and unmaps them when it is freed, and trims the top of its heap
# when enough there is free: a forward pass over a long prompt allocates and frees megabytes
# of activations per layer. Once a model is loaded, blocks up to MMAP_FROM bytes come from the
# heap and up to KEEP_FREED bytes of freed heap stay for reuse. SmolLM2, 512-token prefill,
# processes alternated: 1509, 1401, 1660 -> 1690, 2071, 1970 tok/s, peak RSS unchanged within
# 10 MiB (bench/RESULTS.md; which of the allocator's system calls cost that was not traced: page
# faults per prefill were few either way). Loading still trims (`release_freed_memory`).
MMAP_FROM, KEEP_FREED = 64 * 2**20, 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def reuse_freed_memory() -> None:
    """Have glibc keep and reuse freed memory for large temporaries (see above); elsewhere a no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_FROM)
        libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED)
    except (OSError, AttributeError):  # not glibc
        pass


# Tensors llama.cpp's converters write that we do not read (every other unused tensor is refused).
# rope_freqs.weight: Llama 3.1+'s RoPE frequency factors, which llama.cpp divides the frequencies
# by. Not applied (yet): such a file rotates with plain RoPE, which differs from llama.cpp in the
# low-frequency pairs (see `models.layers.llama3_scaled_inv_freq`), the more so the longer the context.
SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_gguf(path: str | Path, dtype: str = "float32", progress: bool = True) -> LoadedGGUF:
    if dtype not in WEIGHT_DTYPES:
        raise UnsupportedError(f"weight dtype '{dtype}' is not one of {', '.join(WEIGHT_DTYPES)}")
    gguf = GGUFFile(path)
    arch = gguf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedError(
            f"{gguf.path}: architecture '{arch}' is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    make_config, model_class, name_table, fix_up = GGUF_ARCHITECTURES[arch]
    try:
        # No output.weight in the file means the LM head is the embedding table.
        cfg = replace(make_config(gguf.metadata, arch), tie_embeddings="output.weight" not in gguf.tensors)
    except (ValueError, TypeError, ModelFileError) as e:  # 0 heads, a NaN RoPE base, a list where a size goes ...
        raise ModelFileError(f"{gguf.path}: {e}") from None
    # Checked before the model is built: a block_count far beyond the file's layers (4e9) would
    # otherwise spend minutes making modules before the tensors are compared.
    if not any(name.startswith(f"blk.{cfg.n_layers - 1}.") for name in gguf.tensors):
        raise ModelFileError(f"{gguf.path}: block_count is {cfg.n_layers}, but the file has no tensors "
                             f"of layer {cfg.n_layers - 1}")

    with torch.device("meta"):
        model = model_class(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    names = {g: ours for g, ours in expand_layer_names(name_table, cfg.n_layers).items() if g in gguf.tensors or ours in expected}
    if cfg.tie_embeddings:
        names.pop("output.weight", None)
    missing = [g for g in names if g not in gguf.tensors]
    if missing:
        raise ModelFileError(f"{gguf.path}: missing tensors {_few(missing)}")
    # A tensor the model would not read means the file and its metadata disagree (layers beyond
    # block_count, biases Llama has no place for): loading it anyway would compute another model.
    unused = [g for g in gguf.tensors if g not in names and g not in SKIPPED_TENSORS]
    if unused:
        raise ModelFileError(f"{gguf.path}: file has tensors this model does not use: {_few(unused)}")
    for g, ours in names.items():
        info = gguf.tensors[g]
        check_supported(info.ggml_type, g)
        if info.shape != expected[ours]:
            raise ModelFileError(f"{gguf.path}: tensor '{g}' has shape {info.shape}, expected {expected[ours]}")

    tokenizer = build_tokenizer(gguf.metadata, gguf.path)
    if tokenizer.vocab_size != cfg.vocab_size:
        # The model could then produce ids the tokenizer cannot decode (or the reverse).
        raise ModelFileError(f"{gguf.path}: the tokenizer has {tokenizer.vocab_size} tokens "
                             f"but the model's vocabulary size is {cfg.vocab_size}")
    state, packed = {}, {}  # parameter name -> dense tensor; module name -> packed module
    # Dense matrices: bfloat16 in "bfloat16" mode; float32 otherwise (also under "packed", where
    # only unquantized files have dense matrices, and float32 matmuls are the fast ones on CPU).
    matrix_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    bar = Progress(f"Loading {gguf.path.name}", len(names), enabled=progress)

    def decode(g: str, decoder, *args):
        """decoder(tensor g's bytes, *args), which copies them out; then the file's pages of g
        are dropped (peak memory: the model, not the model plus the mapped file)."""
        out = decoder(gguf.raw(g), *args)
        gguf.release(g)
        return out

    # Where the CPU has AVX-512 VNNI, packed matrices whose rows are whole chunks of 64 take the
    # int8-dot kernel's layout (`models.dot_linear`); elsewhere PyTorch's weight-only kernels'.
    dot = dtype == "packed" and cpu_decode.available_with_notice(progress)
    for n, (g, ours) in enumerate(names.items()):
        info = gguf.tensors[g]
        module_name = ours.removesuffix(".weight")
        is_linear = isinstance(model.get_submodule(module_name), torch.nn.Linear)
        use_dot = dot and Int8DotLinear.fits(info.shape)
        if dtype == "packed" and is_linear and info.type_name in AFFINE_4BIT_TYPES and (use_dot or Int4Linear.fits(info.shape)):
            # Fix-ups of linear weights only reorder rows (Llama's RoPE permutation), so
            # they apply to q, scale and offset alike.
            q, scale, offset = (fix_up(ours, t, cfg) for t in decode(g, affine_4bit, info.ggml_type, info.shape, g))
            packed[module_name] = Int8DotLinear.from_int4(q, scale, offset) if use_dot else \
                Int4Linear(q, scale, offset, pack=False)  # packed below, after stacking
        elif use_dot and is_linear and info.type_name in AFFINE_5BIT_TYPES:
            # Q5_0/Q5_1 exactly, as 5-bit values (0.75 bytes a weight; int8 would read 1.06)
            q, scale, offset = (fix_up(ours, t, cfg) for t in decode(g, affine_5bit, info.ggml_type, info.shape, g))
            packed[module_name] = Int8DotLinear.from_int5(q, scale, offset)
        elif dtype == "packed" and ours == "embed_tokens.weight" and info.type_name == "Q8_0":
            # The fix-ups never touch embedding tables, so the file's Q8_0 blocks are the table; it
            # stays in the file, memory-mapped, and only the rows looked up are ever read.
            packed["embed_tokens"] = Q8Embedding(gguf.map_tensor(g), info.shape)
            if cfg.tie_embeddings:  # reads every row once, through a mapping that goes with it
                packed["lm_head"] = Int8DotLinear.from_q8_0(gguf.map_tensor(g), info.shape) if use_dot else \
                    Q8Embedding(gguf.map_tensor(g), info.shape).as_int8_linear()
        else:
            tensor = fix_up(ours, decode(g, dequantize, info.ggml_type, info.shape, g), cfg)
            if dtype == "packed" and is_linear and info.type_name not in ("F32", "F16", "BF16"):
                # Q5_0, Q8_0, Q6_K ...: int8, a scale per 32 values (int8-dot) or per row
                packed[module_name] = Int8DotLinear.quantize(tensor) if use_dot else Int8Linear.quantize(tensor)
            else:
                # Norm weights and other vectors stay float32: norms compute in float32 anyway.
                state[ours] = tensor.to(matrix_dtype if tensor.dim() == 2 else torch.float32)
        if n % 16 == 15:
            release_freed_memory()  # keeps peak RSS near the final size (see release_freed_memory)
        bar.update(n + 1)
    bar.close()
    if cfg.tie_embeddings and "lm_head" not in packed:
        state["lm_head.weight"] = state["embed_tokens.weight"]

    for module_name, module in packed.items():
        _set_module(model, module_name, module)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    still_missing = [k for k in missing if k.rpartition(".")[0] not in packed]
    if still_missing or unexpected:  # a bug in the name tables, not a bad file: the checks above passed
        raise AssertionError(f"state dict mismatch: missing {still_missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_embeddings and "lm_head" not in packed:
        model.lm_head.weight = model.embed_tokens.weight
    if dtype == "packed":
        fuse_projections(model, release_freed_memory)  # q/k/v, gate/up stacked: fewer, larger kernel calls
        for n, module in enumerate(m for m in model.modules() if isinstance(m, Int4Linear)):
            module.pack()  # the int4 kernel's tiled copy, built once per (stacked) layer
            if n % 16 == 15:
                release_freed_memory()  # the packing's temporaries (4 bytes a weight) would pile up otherwise
        use_int8_head_where_it_pays(model, release_freed_memory)
        for module in model.modules():
            if hasattr(module, "prefill_dtype") and DENSE_DTYPE == torch.bfloat16:
                module.prefill_dtype = torch.bfloat16  # prompts' attention rounded as the dense matmuls are
            if hasattr(module, "decode_kernel"):
                module.decode_kernel = dot  # decode steps' attention: our kernel, built above
            if hasattr(module, "cpu_kernel"):
                module.cpu_kernel = dot  # norms, RoPE, gated activations: one kernel call each (layers.takes_cpu_kernel)
        if dot and hasattr(model, "kv_dtype") and cpu_decode.attention_fits(cfg.head_dim):
            model.kv_dtype = torch.float16  # keys and values as the decode attention kernel reads them (half the bytes)
    model.compute_dtype = matrix_dtype
    model.eval()
    if dtype == "packed" and dot:
        install_direct_decode(model)  # decode steps as their kernel calls alone (direct_decode), same logits
    gguf.close()  # every tensor has been copied out; drop the mapped pages of the file
    release_freed_memory()
    reuse_freed_memory()  # from now on: forward passes reuse the memory of their temporaries
    tensor_types = {ours: gguf.tensors[g].type_name for g, ours in names.items()}
    return LoadedGGUF(model, tokenizer, gguf.metadata, tensor_types, gguf.path)
