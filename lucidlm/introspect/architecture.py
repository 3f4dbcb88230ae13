"""What a loaded model is made of: module tree, config, parameters, bytes by tensor type, KV-cache cost."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict

from ..loading.quants import GGML_TYPES
from ..models.fusion import fused_layer_names, packed_weight_sizes
from .hook_point import HOOK_SITES, hook_sites

_GGML_BY_NAME = {t.name: t for t in GGML_TYPES.values()}


def unique_parameters(model) -> dict[str, object]:
    """Parameter name -> tensor, each tensor once (a tied LM head shares the embedding table)."""
    seen, unique = set(), {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            unique[name] = p
    return unique


def weight_sizes(model) -> dict[str, tuple[int, int]]:
    """Weight name -> (parameters, bytes in memory): ordinary parameters, and the weights of
    packed modules (`models.packed`), which are buffers holding compressed values."""
    fused = fused_layer_names(model)  # stacked dense layers: counted through their views, by the file's names
    sizes = {name: (p.numel(), p.numel() * p.element_size()) for name, p in unique_parameters(model).items()
             if name.rpartition(".")[0] not in fused}
    sizes.update(packed_weight_sizes(model))
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tied and "lm_head.weight" in sizes and "embed_tokens.weight" in sizes:
        # A packed tied head is an int8 copy of the embedding table: the same parameters,
        # more memory.
        _, head_bytes = sizes.pop("lm_head.weight")
        count, nbytes = sizes["embed_tokens.weight"]
        sizes["embed_tokens.weight"] = (count, nbytes + head_bytes)
    return sizes


def bytes_by_tensor_type(model, tensor_types: dict[str, str]) -> list[dict]:
    """One row per storage type in the file ("Q4_1", "F32", ...): tensors, parameters, bytes in
    the file (from the type's block layout) and bytes in memory (as loaded, dequantized)."""
    rows: dict[str, dict] = defaultdict(lambda: dict(tensors=0, parameters=0, file_bytes=0, memory_bytes=0))
    for name, (count, nbytes) in weight_sizes(model).items():
        type_name = tensor_types.get(name, "unknown")
        row = rows[type_name]
        row["tensors"] += 1
        row["parameters"] += count
        row["memory_bytes"] += nbytes
        if type_name in _GGML_BY_NAME:
            t = _GGML_BY_NAME[type_name]
            row["file_bytes"] += count // t.block_size * t.type_size
    return [{"type": k, **v} for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["parameters"])]


def describe(lucid_model) -> dict:
    """Everything `lucid inspect` shows, as plain JSON-ready values."""
    model, cfg = lucid_model.model, lucid_model.config
    n_layers = cfg.n_layers
    # the dtype `new_cache` allocates (the activations', or float16 in packed models), asked of a
    # one-slot cache rather than worked out again here; an encoder has no cache: None
    kv32 = getattr(cfg, "kv_bytes_per_token", None)
    kv_dtype = None if kv32 is None else model.new_cache(1, 1).keys[0].dtype
    kv_bytes = None if kv32 is None else kv32 // 4 * kv_dtype.itemsize  # (the config counts float32 bytes)
    return {
        "name": lucid_model.name,
        "path": str(lucid_model.path) if lucid_model.path else None,
        "file_bytes": lucid_model.path.stat().st_size if lucid_model.path else None,
        "module_tree": repr(model),
        "config": asdict(cfg),
        "parameters": sum(count for count, _ in weight_sizes(model).values()),
        "tensor_types": bytes_by_tensor_type(model, lucid_model.tensor_types),
        "context_length": cfg.context_length,
        "kv_cache_dtype": None if kv_bytes is None else str(kv_dtype).removeprefix("torch."),
        "kv_cache_bytes_per_token": kv_bytes,
        "kv_cache_bytes_full_context": None if kv_bytes is None else kv_bytes * cfg.context_length,
        # how a decode step runs: the forward, or a wrapper installed as the forward (direct_decode, compile)
        "decode_steps": None if kv32 is None else getattr(model.forward, "decode_steps", "eager forward"),
        "hook_points": {
            site.replace("{i}", f"{{0-{n_layers - 1}}}"): HOOK_SITES.get(site.removeprefix("blocks.{i}."), ("?",))[0]
            for site in hook_sites(model)
        },
    }
