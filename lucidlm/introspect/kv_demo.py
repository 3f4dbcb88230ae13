"""The KV cache, measured: the same greedy generation with and without it.

Greedy decoding is deterministic, so both runs should produce the same token ids; only the
time differs (without a cache every step re-runs the model over the whole sequence). In a packed
model the two runs round differently (cached steps read float16 keys and values and multiply
through the decode kernels, whole-sequence passes through bfloat16 ones), so a near-tie between
two tokens could go either way: `identical` says whether they matched.
"""

from __future__ import annotations

import time

import torch

# The seeds' prompt for this experiment.
KV_DEMO_PROMPT = "Write an email apologizing to Sarah for the tragic gardening mishap. Explain how it happened."


def kv_cache_demo(lucid_model, prompt: str = KV_DEMO_PROMPT, max_new_tokens: int = 64) -> dict:
    """Time greedy generation with and without the cache; returns timings, ratio and both token-id lists."""
    runs = {}
    for use_cache in (True, False):
        started = time.perf_counter()
        text = lucid_model.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0, use_cache=use_cache)
        runs[use_cache] = (time.perf_counter() - started, list(lucid_model.last_stats.token_ids), text)
    (cached_s, cached_ids, text), (uncached_s, uncached_ids, _) = runs[True], runs[False]
    return {
        "prompt": prompt,
        "prompt_tokens": lucid_model.last_stats.prompt_tokens,
        "new_tokens": len(cached_ids),
        "seconds_with_cache": cached_s,
        "seconds_without_cache": uncached_s,
        "speedup": uncached_s / cached_s if cached_s > 0 else float("inf"),
        "torch_threads": torch.get_num_threads(),  # timings depend on it (and on what else the CPU is doing)
        "identical": cached_ids == uncached_ids,
        "token_ids_with_cache": cached_ids,
        "token_ids_without_cache": uncached_ids,
        "text": text,
    }
