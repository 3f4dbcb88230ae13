"""Turning a GGUF file into a ready model: read, check, dequantize, fix up, assign.

The model is built on PyTorch's `meta` device (shapes only, no memory, no random init),
then every parameter is replaced by the tensor decoded from the file. Before anything is
decoded we check that the file has exactly the tensors the config implies, with the right
shapes and supported types, so a bad file fails fast with a message naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import ModelFileError, UnsupportedError
from ..models.gemma3 import Gemma3
from ..models.llama import Llama
from ..progress import Progress
from ..tokenizers import BPETokenizer
from ..tokenizers.registry import tokenizer_from_gguf_metadata
from .gguf import GGUFFile
from .gguf_gemma3 import GEMMA3_TENSOR_NAMES, gemma3_config, gemma3_fix_up
from .gguf_llama import LLAMA_TENSOR_NAMES, expand_layer_names, llama_config, llama_fix_up
from .quants import check_supported, dequantize

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


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedGGUF:
    gguf = GGUFFile(path)
    arch = gguf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedError(
            f"{gguf.path}: architecture '{arch}' is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    make_config, model_class, name_table, fix_up = GGUF_ARCHITECTURES[arch]
    cfg = make_config(gguf.metadata, arch)
    # No output.weight in the file means the LM head is the embedding table.
    cfg = replace(cfg, tie_embeddings="output.weight" not in gguf.tensors)

    with torch.device("meta"):
        model = model_class(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    names = {g: ours for g, ours in expand_layer_names(name_table, cfg.n_layers).items() if g in gguf.tensors or ours in expected}
    if cfg.tie_embeddings:
        names.pop("output.weight", None)
    missing = [g for g in names if g not in gguf.tensors]
    if missing:
        raise ModelFileError(f"{gguf.path}: missing tensors {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
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
    state = {}
    bar = Progress(f"Loading {gguf.path.name}", len(names), enabled=progress)
    for n, (g, ours) in enumerate(names.items()):
        info = gguf.tensors[g]
        tensor = dequantize(gguf.raw(g), info.ggml_type, info.shape, g)
        state[ours] = fix_up(ours, tensor, cfg).to(dtype)
        bar.update(n + 1)
    bar.close()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]

    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval()
    tensor_types = {ours: gguf.tensors[g].type_name for g, ours in names.items()}
    return LoadedGGUF(model, tokenizer, gguf.metadata, tensor_types, gguf.path)
