"""Stacking the projections that read the same input into one layer (q, k, v; gate, up).

A decode step is many small matmuls; one call for q, k and v (and one for gate and up) does the
same arithmetic in fewer, larger calls. `fuse_projections` stacks packed layers (`models.packed`,
the CPU path) or, with `dense=True`, plain nn.Linear ones (`compile_decode` on a GPU); the old
names stay as `RowSlice` views of the fused rows, so introspection finds every layer of the file
where it always did. `packed_weight_sizes` and `fused_layer_names` let the architecture summary
count each weight once.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .dot_linear import Int8DotLinear
from .packed import PACKED_MODULES, Int4Linear, Int8Linear, Q8Embedding

FUSIBLE_KINDS = (Int4Linear, Int8Linear, Int8DotLinear)  # packed layers with a `concat` (embeddings have none)


class RowSlice(nn.Module):
    """Rows [start, stop) of a fused layer, under the name the unfused layer had (`q_proj` is
    rows 0..H*D of `qkv_proj`), so that introspection finds `in_features`, `out_features`,
    `weight` and `bias` where it always did, and calling it directly still gives q_proj(x).

    It holds no weights: the fused layer, registered on the same parent, owns them. The
    reference to it is a plain attribute, not a submodule, so the weights appear once in
    `state_dict()`, `buffers()` and `packed_weight_sizes`. The model's forward calls the
    fused layer itself; calling a slice runs the whole fused layer and keeps its rows.
    """

    def __init__(self, fused: Int4Linear | Int8Linear | nn.Linear, start: int, stop: int, fused_name: str):
        super().__init__()
        self.__dict__["fused"] = fused  # bypasses nn.Module.__setattr__: not a submodule
        self.start, self.stop, self.fused_name = start, stop, fused_name
        self.in_features, self.out_features = fused.in_features, stop - start

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rows {self.start}:{self.stop} of {self.fused_name}")

    @property
    def weight(self) -> torch.Tensor:
        """(out_features, in_features): float32 decoded from a packed layer, a view of a dense one."""
        if isinstance(self.fused, nn.Linear):
            return self.fused.weight[self.start:self.stop]
        return self.fused.weight_rows(self.start, self.stop)

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.fused, "bias", None)  # (Int8Linear has none)
        return None if bias is None else bias[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.stop]


# Fused layer -> the layers it replaces, in row order. A model class opts in by setting the
# fused attribute to None in __init__ and computing with it in forward when it is set
# (`llama.Attention`, `gemma3.Attention`, `layers.SwiGLU`, `gemma3.GeGLU`).
FUSIBLE = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
RELEASE_EVERY = 4 * 2**20  # bytes of replaced buffers between calls of fuse_projections' release_memory


def fuse_projections(model: nn.Module, release_memory: Callable[[], None] | None = None, dense: bool = False) -> int:
    """Stack the packed projections that read the same input into one layer each: q, k, v
    into `qkv_proj` and gate, up into `gate_up_proj`; the old names become `RowSlice`s of it.
    `dense=True` stacks plain nn.Linear groups too (`compile_decode` on a GPU, where each
    small matmul of a decode step is a kernel of a few microseconds, mostly latency).

    Why: a batch-1 decode step is many small matmuls, each paying for a kernel call and the
    conversion of its input and output to and from bfloat16. One call for q, k and v (and one
    for gate and up) does the same arithmetic in fewer, larger calls: SmolLM2 goes from 7 to
    4 int4 calls per layer, bit-identical outputs. A group is fused when its parts are all
    Int4Linear or all Int8Linear (Gemma 3's Q5_0 q/k/v/gate/up); mixed groups (a Q4_K q with
    a Q6_K v, say: Q4_K_M files mix them) are left as they are.

    The parts' buffers are freed as each fused layer is made, but the allocator keeps freed
    memory and cannot reuse it for the larger fused buffers: without `release_memory` (the
    loader passes one that returns freed memory to the system) peak RSS would grow by the
    size of everything fused (~190 MB for SmolLM2). It is called every RELEASE_EVERY bytes freed.
    Returns the number of fused layers made.
    """
    made, freed = 0, 0
    for module in list(model.modules()):
        for fused_name, part_names in FUSIBLE.items():
            if not hasattr(module, fused_name) or getattr(module, fused_name) is not None:
                continue  # this class does not compute with a fused layer, or already has one
            parts = [getattr(module, name) for name in part_names]
            kind = type(parts[0])
            if kind not in ((*FUSIBLE_KINDS, nn.Linear) if dense else FUSIBLE_KINDS) or any(type(p) is not kind for p in parts) \
                    or len({(p.in_features, getattr(p, "bits", 0)) for p in parts}) != 1:
                continue  # mixed kinds or widths (a Q4_K q with a Q6_K v, say) or not packed
            fused = _concat_linear(parts) if kind is nn.Linear else kind.concat(parts)
            fused.part_sizes = [p.out_features for p in parts]  # how forward splits its output (`project_qkv`)
            setattr(module, fused_name, fused)
            start = 0
            for name, part in zip(part_names, parts):
                setattr(module, name, RowSlice(fused, start, start + part.out_features, fused_name))
                start += part.out_features
                freed += _tensor_bytes(part)
                for tensor in [n for n, _ in [*part.named_buffers(recurse=False), *part.named_parameters(recurse=False)]]:
                    delattr(part, tensor)  # free it now, even if something (the loader) still holds the part
            made += 1
            if release_memory is not None and freed >= RELEASE_EVERY:
                release_memory()
                freed = 0
    if release_memory is not None and freed:
        release_memory()
    return made


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose weight (and bias) are the parts' stacked by rows."""
    weight = torch.cat([p.weight.detach() for p in parts])  # (N, K)
    has_bias = any(p.bias is not None for p in parts)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")  # no init: replaced
    grad = parts[0].weight.requires_grad
    fused.weight = nn.Parameter(weight, requires_grad=grad)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([torch.zeros(p.out_features, dtype=weight.dtype, device=weight.device)
                                             if p.bias is None else p.bias.detach() for p in parts]), requires_grad=grad)
    return fused


def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of a layer's buffers (packed layers) and parameters (a stacked dense nn.Linear)."""
    return sum(t.numel() * t.element_size() for t in [*module.buffers(), *module.parameters()])


def packed_weight_sizes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """'<module>.weight' -> (logical parameters, bytes in memory) for every packed module.

    A fused layer is reported through its `RowSlice`s, by the names of the layers it replaced
    (those in the file), each with its rows' share of the bytes (every buffer of an
    Int4Linear or Int8Linear, and a stacked nn.Linear's weight, has a fixed size per row), so
    the totals are the unfused model's. A stacked dense layer's own parameters must then be left
    out of a parameter count (`fused_layer_names`).
    """
    fused_names = fused_layer_names(model)
    sizes = {}
    for name, module in model.named_modules():
        if isinstance(module, RowSlice):
            fused = module.fused
            per_row = _tensor_bytes(fused) // fused.out_features
            sizes[f"{name}.weight"] = (module.out_features * module.in_features, module.out_features * per_row)
        elif isinstance(module, PACKED_MODULES) and name not in fused_names:
            rows, cols = (module.num_embeddings, module.dim) if isinstance(module, Q8Embedding) else \
                (module.out_features, module.in_features)
            sizes[f"{name}.weight"] = (rows * cols, _tensor_bytes(module))
    return sizes


def fused_layer_names(model: nn.Module) -> set[str]:
    """Names of the fused layers (`qkv_proj`, `gate_up_proj`) that `RowSlice`s stand for."""
    viewed = {id(m.fused) for m in model.modules() if isinstance(m, RowSlice)}
    return {name for name, module in model.named_modules() if id(module) in viewed}
