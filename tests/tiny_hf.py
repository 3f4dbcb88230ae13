"""Tiny random checkpoints made by Hugging Face transformers itself, and the checks every
family's test runs on them: LucidLM loads the saved directory and must compute the same
logits as transformers' model, with and without the KV cache, in padded batches, and in
greedy generation.

Weights are redrawn with unit-scale statistics (HF's init, std 0.02, makes every logit
nearly 0, and a tolerance on nearly-0 numbers tests nothing): norms around 1, embeddings
N(0, 1), matrices N(0, 1/fan_in), so activations stay O(1) through the layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lucidlm.generate import generate_tokens
from lucidlm.loading.hf import load_hf
from lucidlm.sampling import SamplingParams, make_sampler

LOGIT_ATOL = 1e-4  # float32, 2 layers; observed max |Δ| 1e-6 (|logits| < 5) to 1.5e-5 (tied heads, |logits| ~ 50)
VOCAB = 128


def save_tiny(hf_config, path: Path, seed: int = 0):
    """Build transformers' model for `hf_config` (eager attention), randomise it, save it as
    safetensors under `path`; return the model in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(torch.randn_like(p))
            else:
                # nn.Linear is (out, in); GPT-2's Conv1D is (in, out): fan_in is the input side.
                fan_in = p.shape[0] if ".c_" in name else p.shape[-1]
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def reference_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(tokens).logits.float()


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_ours(path: Path):
    return load_hf(path, progress=False).model


def assert_matches_reference(ours, hf_model, tokens: torch.Tensor, atol: float = LOGIT_ATOL) -> float:
    """Logits equal transformers' within atol; returns the max |Δ| observed."""
    expected = reference_logits(hf_model, tokens)
    with torch.inference_mode():
        actual = ours(tokens)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
    return float((actual - expected).abs().max())


def assert_cached_equals_uncached(ours, tokens: torch.Tensor, prefill: int) -> None:
    """Prefill `prefill` positions into a cache, then decode the rest one token at a time; also
    with the cache made static (`KVCache.make_static`: fixed shapes, the write position on the
    device, as CUDA graphs replay it) after the prefill, and static from the start."""
    B, T = tokens.shape
    with torch.inference_mode():
        full = ours(tokens)
        for static in (None, "after prefill", "from the start"):
            cache = ours.new_cache(B, T + 3)  # spare slots: a static cache attends over them, masked
            if static == "from the start":
                cache.make_static()
            steps = [ours(tokens[:, :prefill], cache)]
            if static == "after prefill":
                cache.make_static()
            steps += [ours(tokens[:, t : t + 1], cache) for t in range(prefill, T)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=LOGIT_ATOL, rtol=0, msg=lambda m: f"{static}: {m}")
            assert cache.length == T and (static is None or int(cache.slot) == T)


def assert_padded_batch_equals_alone(ours, tokens: torch.Tensor, lengths: list[int]) -> None:
    """Left-padded rows of different lengths, prefilled together then decoded two steps (the
    second on the cache made static), each row equal to the row run alone."""
    T = max(lengths)
    rows = [tokens[b, :n].tolist() for b, n in enumerate(lengths)]
    batch = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    valid = torch.tensor([[False] * (T - len(r)) + [True] * len(r) for r in rows])
    step, step2 = tokens[: len(rows), -1:], tokens[: len(rows), :1]
    with torch.inference_mode():
        cache = ours.new_cache(len(rows), T + 4)
        batch_prefill, batch_step = ours(batch, cache, valid), ours(step, cache)
        cache.make_static()
        batch_step2 = ours(step2, cache)
        for b, r in enumerate(rows):
            alone_cache = ours.new_cache(1, len(r) + 2)
            alone_prefill, alone_step = ours(torch.tensor([r]), alone_cache), ours(step[b : b + 1], alone_cache)
            alone_step2 = ours(step2[b : b + 1], alone_cache)
            torch.testing.assert_close(batch_prefill[b, T - len(r):], alone_prefill[0], atol=LOGIT_ATOL, rtol=0)
            torch.testing.assert_close(batch_step[b], alone_step[0], atol=LOGIT_ATOL, rtol=0)
            torch.testing.assert_close(batch_step2[b], alone_step2[0], atol=LOGIT_ATOL, rtol=0)


def assert_cuda_graph_decode_matches_reference(ours, hf_model, tokens: torch.Tensor, prefill: int) -> None:
    """On a GPU, decode steps replayed from CUDA graphs (`compile_decode(..., inductor=False)`, on
    a copy of `ours`) give transformers' logits (computed on the CPU) at every position.
    Families whose step cannot be captured (Mixtral's routing reads expert ids on the host)
    must say so with a warning and still decode correctly. Skipped without CUDA."""
    import copy
    import warnings

    import pytest

    from lucidlm.compile import compile_decode

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = copy.deepcopy(ours).cuda()
    runner = compile_decode(model, progress=False, inductor=False)
    B, T = tokens.shape
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = model.new_cache(B, T)
        x = tokens.cuda()
        steps = [model(x[:, :prefill], cache)] + [model(x[:, t : t + 1], cache) for t in range(prefill, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1).cpu(), reference_logits(hf_model, tokens), atol=LOGIT_ATOL, rtol=0)
    failed = [w for w in caught if "CUDA graph capture failed" in str(w.message)]
    assert bool(failed) == bool(runner.graphs.failed)


def assert_greedy_matches_reference(ours, hf_model, prompt: list[int], n: int = 8) -> None:
    """`generate_tokens` (cached) continues the prompt as transformers' greedy generate does."""
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    actual = [s.token_id for s in generate_tokens(ours, prompt, make_sampler(SamplingParams()), n)]
    assert actual == expected


def assert_reference_applies_window(hf_model, tokens: torch.Tensor, window: int) -> None:
    """The reference really uses its sliding window: without it, logits change from position
    `window` on (the first query with a key out of reach), and not before."""
    windowed = reference_logits(hf_model, tokens)
    hf_model.config.sliding_window = None
    try:
        full = reference_logits(hf_model, tokens)
    finally:
        hf_model.config.sliding_window = window
    torch.testing.assert_close(windowed[:, :window], full[:, :window], atol=1e-5, rtol=0)
    assert (windowed[:, window:] - full[:, window:]).abs().amax() > 1e-2


def assert_hooks_see_every_block(ours, tokens: torch.Tensor) -> None:
    """Every block exposes the standard hook sites; capturing them (attention patterns included,
    which switches attention to the explicit path) leaves the logits unchanged."""
    from lucidlm.introspect.capture import run_with_cache
    from lucidlm.introspect.lens import logit_lens

    logits, cache = run_with_cache(ours, tokens)
    with torch.inference_mode():
        torch.testing.assert_close(logits, ours(tokens), atol=LOGIT_ATOL, rtol=0)
    T = tokens.shape[1]
    for i in range(ours.config.n_layers):
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]  # (B, H, T, T)
        assert pattern.shape == (tokens.shape[0], ours.config.n_heads, T, T)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert cache[f"blocks.{i}.hook_resid_post"].shape == (*tokens.shape, ours.config.d_model)
    # The logit lens reads the last layer's residual stream as the model's own prediction.
    reading = logit_lens(ours, tokens[:1])
    assert torch.equal(reading.top_ids[-1, :, 0], logits[0].argmax(-1))
