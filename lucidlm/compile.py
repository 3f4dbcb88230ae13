"""Compiling the decode step with torch.compile (opt-in: `load(..., compile=True)`, `--compile`).

A batch-1 decode step of a small model on a CPU is as much overhead as arithmetic: SmolLM2's
30 blocks run ~850 PyTorch operations per token (views, slices and cache writes, residual adds,
and the matmul, norm, RoPE and activation kernels; where those kernels do not run, each norm and
rotation is several operations more), each paying Python and dispatcher costs of a microsecond or
more, and the modules around them their Python calls. torch.compile traces the whole forward pass once into a graph, and Inductor
fuses the elementwise work into a few generated C++ loops; the matmul kernels stay the same
(`bench/RESULTS.md` has the measured effect). Packed models on CPUs with our kernels get most of
that without compiling: their decode steps are direct by default (`lucidlm.direct_decode`), and
compiling them gains little more (bench/RESULTS.md, session 16).

What is compiled, and when it is used:

- Only decode steps: one new position per sequence, with a KV cache, and the short passes of
  prompt lookup (`lucidlm.prompt_lookup`: a token and its guesses, up to `COMPILED_MAX_POSITIONS`).
  Dynamo specialises a length of 1, so the short passes get a second graph, compiled at the
  first one. Prefill (many positions, one call per prompt) gains little and stays eager.
- Only while nobody observes the model: a hook listener (`lucidlm.introspect`) or an
  attention layer asked for explicit weights sends the step through the ordinary eager
  forward, so every introspection tool sees exactly what it sees without compilation.
- Shapes are dynamic (`dynamic=True`): the growing cache length and the batch size are
  symbols in one graph, not a recompilation per token.

On CPU the graph also holds the weights as constants, its wrapper (the code that calls each
kernel in turn) is generated as C++ rather than Python, and, where packed layers still use
PyTorch's weight-only int4/int8 kernels (CPUs without AVX-512 VNNI), Inductor times its own C++
matmul templates against them and keeps the faster (`CPU_OPTIONS`; its int4 template is 1.5-1.8x
as fast as PyTorch's kernel for one row). Our own kernels (`kernels.cpu_decode`) are operators
the graph calls as they are.

Compiling costs time once (about a minute for SmolLM2 or Gemma 3 on 2 cores; Inductor caches
the result on disk, so a later process takes 12-16 s: freezing makes AOTAutograd skip its own
cache, "Cannot cache a graph with freezing enabled", and Dynamo traces the step again; without
freezing 4-7 s, but decode ~4 % slower, bench/RESULTS.md "Session 14"). If compilation fails (no C++ compiler, an
unsupported operation), a warning says why and decode steps run as they would without it (the
forward, or direct steps for packed models: `lucidlm.direct_decode`).

On a CUDA GPU the decode steps are, in addition, replayed from CUDA graphs
(`lucidlm.cuda_graphs`): there the cost of a step is mostly launching its kernels one by one.
`inductor=False` keeps the graphs and skips torch.compile (no compile time; unfused kernels).
"""

from __future__ import annotations

import sys
import time
import types
import warnings

import torch
from torch import nn

from .cuda_graphs import GraphedDecode
from .direct_decode import DirectDecode
from .introspect.hook_point import Observers
from .models.layers import model_device
from .models.fusion import fuse_projections

# Dynamo re-checks, before every call of a compiled graph, the assumptions it traced under
# ("guards"): on a 30-layer model some 4,000 checks (~0.5 ms of a ~4.8 ms SmolLM2 step). All
# those on the model's own modules are dropped: what may change there between steps is whether
# anyone observes (hook listeners, PyTorch hooks, `explicit` attention), and `CompiledDecode`
# checks that itself before each step (`observed`), sending observed steps eagerly; the rest
# (module types, layer indices, sizes, weights, flags like a layer's sliding window) is fixed
# by loading. Each model compiles its own graphs (`_own_frame`), so two models never share
# one. Guards on the arguments (the cache's length and tensors, token shapes) are kept:
# those still select or recompile graphs.
# On CPU, Inductor also gets the model's weights as constants of the graph ("freezing") and
# chooses each weight-only int4/int8 matmul between PyTorch's kernel and a C++ template it
# generates for that exact shape, by timing both at compile time ("max-autotune" of GEMMs only).
# Its template wins for batch-1 decode: SmolLM2 on a 2-core AVX-512 CPU 173 -> 211 tok/s
# (bench/RESULTS.md). `cpp_wrapper`: the wrapper that calls the step's ~300 kernels runs as C++;
# with our own operators (each a call through PyTorch's dispatcher from a Python wrapper) that
# made SmolLM2's compiled decode 216 -> 235 tok/s (session 12). The price of all three: a longer
# first compilation (~1 min more; cached on disk like the rest), and the graph may hold copies
# of weights that it derived at compile time, so weights edited after compiling are not
# guaranteed to be seen (listeners and hooks, LucidLM's way of editing activations, send steps
# through the eager forward anyway). Each model gets
# graphs of its own (`_own_frame`; tests/test_compile.py interleaves two models of one shape).
CPU_OPTIONS = {"freezing": True, "max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP,ATEN",
               "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False,  # (timings not printed)
               "cpp_wrapper": True}

# Floats the traced code reads (every norm's eps, attention scales) become constants of the
# graph. By default Dynamo makes each one an input instead, converted to a tensor before every
# call: ~100 conversions a SmolLM2 step, ~0.2 ms (compiled decode 253 -> 266 tok/s, session 13).
# They are fixed once a model is loaded (and their guards are dropped with the modules' own).
DYNAMO_CONFIG = {"specialize_float": True}

_seconds_compiling = 0.0  # all models together, this process

COMPILED_MAX_POSITIONS = 8  # longest pass with a KV cache that runs compiled (prompt lookup's checking passes)


def seconds_compiling() -> float:
    """Seconds this process has spent compiling decode steps so far: generation statistics
    subtract what a generation spent compiling from its decode time (`generate.TextStream`)."""
    return _seconds_compiling


def _keep_guard(entries) -> list[bool]:
    return [not entry.orig_guard.source.is_unspecialized_nn_module() for entry in entries]


class CompiledDecode:
    """A model's forward that runs decode steps through a compiled graph and all else eagerly.

    Installed as the model's `forward` by `compile_decode`; it takes the same arguments
    (tokens (B, T), cache, ...) and returns the same logits.
    """

    def __init__(self, model: nn.Module, progress: bool = True, inductor: bool = True):
        self.eager = model.forward  # the model's forward, or the direct decode steps around it (packed models)
        # what torch.compile traces: the model's own forward, never `direct_decode`'s steps
        self.traced = self.eager.eager if isinstance(self.eager, DirectDecode) else self.eager
        self.compiled = None  # made at the first decode step: torch.compile imports Inductor (~2.5 s)
        self.graph_kinds: set[str] = set()  # "one position", "several positions": graphs compiled so far
        self.failed_kinds: set[str] = set()  # ... and those whose compilation failed (they run eagerly)
        self.progress = progress
        self.state = "not yet compiled" if inductor else "not compiled (inductor=False)"
        # -> "compiled" | "failed: <reason>"
        self.graphs = GraphedDecode() if model_device(model).type == "cuda" else None
        self.observers = Observers(model)

    @property
    def decode_steps(self) -> str:
        """How decode steps run, for `lucid inspect`."""
        return f"torch.compile ({self.state})" + (" and CUDA graphs" if self.graphs is not None else "")

    def observed(self) -> bool:
        """Would anyone see inside this step? Then it must run eagerly: a compiled graph or a
        CUDA graph replay runs no Python, so listeners and hooks would silently not be called."""
        return self.observers.any()

    def __call__(self, tokens: torch.Tensor, cache=None, *args, **kwargs) -> torch.Tensor:
        positions = tokens.shape[1]
        if cache is None or torch.is_grad_enabled() or self.observed():
            return self.eager(tokens, cache, *args, **kwargs)
        # Several positions after some already cached: prompt lookup's checking pass. A prefill
        # (into an empty cache) stays eager: once per prompt, not worth a graph.
        if positions > 1 and (positions > COMPILED_MAX_POSITIONS or cache.length == 0 or args or kwargs):
            return self.eager(tokens, cache, *args, **kwargs)
        kwargs.pop("last_only", None)  # one position: last_only changes nothing, so it must not make a graph of its own
        # CUDA graphs replay single-position steps (not a `valid` mask: padding added mid-way, rare).
        if self.graphs is not None and positions == 1 and not args and not kwargs:
            return self.graphs(self.step, tokens, cache)
        return self.step(tokens, cache, *args, **kwargs)

    def step(self, tokens, cache, *args, **kwargs) -> torch.Tensor:
        """One pass: through a compiled graph (compiling it the first time) or eagerly."""
        kind = "one position" if tokens.shape[1] == 1 else "several positions"
        if kind in self.graph_kinds:
            return self.compiled(tokens, cache, *args, **kwargs)
        if kind in self.failed_kinds or self.state not in ("not yet compiled", "compiled"):
            return self.eager(tokens, cache, *args, **kwargs)
        return self._first_call(kind, tokens, cache, *args, **kwargs)

    def _first_call(self, kind: str, tokens, cache, *args, **kwargs) -> torch.Tensor:
        if self.progress:
            print(f"compiling the decode step ({kind}) with torch.compile (about a minute the first time; "
                  "cached on disk afterwards)...", file=sys.stderr, flush=True)
        global _seconds_compiling
        started = time.perf_counter()
        length = cache.length
        try:
            if self.compiled is None:
                compiled = torch.compile(_own_frame(self.traced), dynamic=True,
                                         options={"guard_filter_fn": _keep_guard})
                self.compiled = _with_config(compiled, CPU_OPTIONS if self.graphs is None else {})
            logits = self.compiled(tokens, cache, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:
            _seconds_compiling += time.perf_counter() - started
            # Compilation happens before the graph runs, so the cache is untouched; undo the
            # position count in case the failure came after it was traced, and go eager.
            cache.length = length
            reason = _failure_reason(error)
            self.failed_kinds.add(kind)  # passes of this kind stay eager; a graph compiled before still runs
            if not self.graph_kinds:
                self.state = f"failed: {reason}"
            warnings.warn(f"torch.compile failed, decoding {kind} without it: {reason}", RuntimeWarning,
                          stacklevel=3)
            return self.eager(tokens, cache, *args, **kwargs)
        self.state = "compiled"
        self.graph_kinds.add(kind)
        _seconds_compiling += time.perf_counter() - started
        if self.progress:
            print(f"compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        return logits


def _own_frame(forward):
    """A function that calls `forward`, with a code object of its own.

    Dynamo keeps compiled graphs per code object, and all models of a class share their
    `forward`'s: a second model of the same shapes would run the first one's graph (torch.compile
    calls with equal options count as one backend), which is right only while the graph reads
    the weights at every call. With frozen weights (CPU_OPTIONS) it would compute with the
    first model's. A fresh code object per compiled model keeps each model's graphs its own.
    """
    def step(*args, **kwargs):
        return forward(*args, **kwargs)

    return types.FunctionType(step.__code__.replace(), step.__globals__, "decode_step", step.__defaults__, step.__closure__)


def _with_config(compiled, inductor_config: dict):
    """`compiled`, run with Inductor's config patched by `inductor_config` and Dynamo's by
    `DYNAMO_CONFIG` at every call: any call may (re)compile, and Dynamo reads some settings
    (freezing) while tracing, before the options given to torch.compile apply; the patches
    leave the rest of the process alone. (Each patch object is made once: making one is a
    good part of what a patch costs.)"""
    inductor_patch = torch._inductor.config.patch(inductor_config)
    dynamo_patch = torch._dynamo.config.patch(DYNAMO_CONFIG)

    def run(*args, **kwargs):
        with inductor_patch, dynamo_patch:
            return compiled(*args, **kwargs)

    return run


def _failure_reason(error: Exception) -> str:
    """One line saying why compilation failed. Dynamo's message starts with a header
    ("backend='inductor' raised:") and, for a C++ build failure, puts the compiler command
    before the compiler's own first error: keep the lines that say what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    informative = [line for line in lines if not line.endswith("raised:")]
    if not informative:
        return type(error).__name__
    reason = informative[0]
    compiler_errors = [line for line in informative if "error:" in line]
    if compiler_errors:  # e.g. "...main.cpp:27:41: error: 'at::vec' has not been declared"
        reason += " (" + compiler_errors[0].split("error:", 1)[1].strip() + ")"
    return reason


def warm_up(model: nn.Module, batch_sizes=(1, 2)) -> None:
    """Compile now rather than at the first real request: a server's first clients should not wait.

    Dynamo specialises the values 0 and 1 of any size (a batch of 1, a cache length of 1), so
    one step per batch size in `batch_sizes`, after a 2-token prompt, covers single requests and
    batches of any size (a 1-token prompt still compiles its own first step).
    """
    with torch.inference_mode():
        for batch in batch_sizes:
            cache = model.new_cache(batch, 8)
            device = cache.valid.device
            model(torch.zeros(batch, 2, dtype=torch.long, device=device), cache)  # eager prefill: length 2
            for _ in range(2):
                model(torch.zeros(batch, 1, dtype=torch.long, device=device), cache)


def compile_decode(model: nn.Module, progress: bool = True, inductor: bool = True) -> CompiledDecode:
    """Make `model`'s decode steps run through torch.compile, and on a GPU through CUDA graphs
    (see the module docstring); `inductor=False`: CUDA graphs only. On a GPU this also stacks
    the q/k/v and gate/up weights (`fusion.fuse_projections`; the old names stay, as views).

    Compilation itself happens at the first decode step. Returns the installed `CompiledDecode`
    (its `state` says whether compilation succeeded).
    """
    if isinstance(model.forward, CompiledDecode):
        return model.forward
    # Inductor's C++ code generator remarks when a fused kernel mixes bfloat16 and float16 values.
    # Packed models' do by design (the embedding's float16 scales, the int4 kernels' bfloat16
    # results) and the generated code converts them correctly: the remark would only alarm.
    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node", category=UserWarning)
    # Inductor's own use of a deprecated PyTorch API while it times kernels (CPU_OPTIONS): not ours to act on.
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning,
                            module=r"torch\._inductor\.")
    if model_device(model).type == "cuda":
        fuse_projections(model, dense=True)  # fewer, larger matmul kernels (packed CPU models are stacked at load)
    model.forward = CompiledDecode(model, progress, inductor)
    return model.forward
