"""Decode steps replayed from CUDA graphs (what `compile_decode` does on a GPU).

Why. A batch-1 decode step of a small model is about 1,300 GPU kernels of 1-4 µs each, and
launching each one from Python costs the host 8-25 µs: the GPU idles ~90 % of every step
(`bench/RESULTS.md`, "GPU"). A CUDA graph records the kernels of one step once; replaying it
is a single launch, after which the GPU runs the kernels back to back.

What a graph needs: the same kernels, reading and writing the same addresses, every time.
- The KV cache is made static (`KVCache.make_static`): new keys and values go to a slot
  counted on the device, and attention reads the whole preallocated cache with the unwritten
  slots masked out, so shapes do not grow from step to step.
- The step's input ids are copied into a tensor the graph owns before each replay, and its
  logits come back in a tensor the graph owns (handed out as a copy: the next replay
  overwrites the original).
- Nothing in the step reads a GPU value on the host or copies from host memory (masks are
  always built on the device for a static cache; RoPE frequencies are kept on the device).

A graph belongs to one cache (its tensors' addresses are baked in). The first decode step of
a cache runs normally (it also warms up whatever runs inside: cuBLAS handles, a compiled
graph's first call), then the step is captured; later steps replay it. Generation makes a
new cache per call, so each call pays one capture (`bench/RESULTS.md` has the cost).
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .cache import KVCache

# A cache whose batch keeps changing (contrastive search widens it to k rows and back every
# step) would be re-captured every step, slower than not using graphs: stop after this many.
MAX_CAPTURES_PER_CACHE = 2


class DecodeGraph:
    """One decode step (B rows, one new token each) captured on one static cache."""

    def __init__(self, step, cache: KVCache):
        self.keys, self.valid = cache.keys[0], cache.valid  # to notice a cache whose tensors were replaced
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.valid.device)
        self.graph = torch.cuda.CUDAGraph()
        # Captured on a side stream, as `torch.cuda.graph` does, but without its emptying of
        # PyTorch's memory cache before every capture: one capture per generation would
        # otherwise make the next prompt's tensors be allocated from the driver again.
        stream, length = torch.cuda.Stream(), cache.length
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                # thread_local: another thread's CUDA work (a server's other requests) may go on
                # while this thread captures; only this thread's unsafe calls are refused.
                self.graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self.logits = step(self.tokens, cache)  # (B, 1, V)
                finally:
                    self.graph.capture_end()
        finally:
            # Capturing records kernels without running them: the cache's device-side slot did
            # not move, but the Python side of the step counted one position.
            cache.length = length
        torch.cuda.current_stream().wait_stream(stream)

    def fits(self, cache: KVCache) -> bool:
        return cache.keys[0] is self.keys and cache.valid is self.valid

    def replay(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B, 1) -> logits (B, 1, V), the cache advanced by one position."""
        cache.check_room(1)  # the graph writes at cache.slot without looking: check on the host first
        self.tokens.copy_(tokens)
        self.graph.replay()  # writes k, v and validity at cache.slot, then advances cache.slot
        cache.length += 1
        return self.logits.clone()


class GraphedDecode:
    """Runs a model's decode steps (`step(tokens, cache)`) through one CUDA graph per cache."""

    def __init__(self):
        self.graphs: weakref.WeakKeyDictionary[KVCache, DecodeGraph] = weakref.WeakKeyDictionary()
        self.captures: weakref.WeakKeyDictionary[KVCache, int] = weakref.WeakKeyDictionary()
        self.failed: str | None = None  # why capturing failed, once it has: then every step runs as it is

    def __call__(self, step, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        graph = self.graphs.get(cache)
        if graph is not None and graph.fits(cache):
            return graph.replay(tokens, cache)
        if self.failed or self.captures.get(cache, 0) >= MAX_CAPTURES_PER_CACHE:
            return step(tokens, cache)
        cache.make_static()
        logits = _run_on_side_stream(step, tokens, cache)  # this step, for real: also the warm-up
        self.captures[cache] = self.captures.get(cache, 0) + 1
        try:
            self.graphs[cache] = DecodeGraph(step, cache)
        except RuntimeError as error:  # something in the step cannot be captured (a host sync, say)
            self.failed = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(f"CUDA graph capture failed, decoding without graphs: {self.failed}", RuntimeWarning,
                          stacklevel=4)
        return logits


def _run_on_side_stream(step, tokens, cache) -> torch.Tensor:
    """Run `step` on a stream of its own, as CUDA graph capture wants its warm-up run: lazily
    created state (cuBLAS workspaces, autotuning) must not be created during capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        logits = step(tokens, cache)
    torch.cuda.current_stream().wait_stream(side)
    return logits
