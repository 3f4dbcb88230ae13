"""The KV cache (lucidlm/cache.py) as packed models use it: float16 keys and values under float32
activations (`kv_dtype`, set by the loader where our decode attention kernel reads float16), against
transformers' logits on a tiny Q4_1 GGUF model (the same file transformers loads)."""

import numpy as np
import pytest
import torch

from lucidlm.kernels import cpu_decode

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="float16 caches come with the AVX-512 VNNI kernels")


def test_packed_cache_is_float16_and_a_prompt_pass_reads_its_own_keys(tmp_path):
    """Keys and values are stored as float16 where the attention kernel reads them; a prompt pass
    into the empty cache attends over its float32 keys and values as computed, so its logits are the
    uncached pass's bit for bit, and later steps (reading float16) stay transformers' to float32 parity."""
    from gguf import GGMLQuantizationType
    from test_loading_gguf import VOCAB_SIZE, hf_llama_and_gguf_tensors, tiny_metadata, write_gguf

    import lucidlm

    hf_model, tensors = hf_llama_and_gguf_tensors(tie=True, encoding=GGMLQuantizationType.Q4_1)
    model = lucidlm.load(str(write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), tensors)), progress=False).model
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, VOCAB_SIZE, size=(1, 30)))
    with torch.inference_mode():
        cache = model.new_cache(1, 30)
        assert cache.keys[0].dtype == cache.values[0].dtype == torch.float16
        prompt = model(ids[:, :20], cache)
        assert torch.equal(prompt, model(ids[:, :20]))
        steps = torch.cat([model(ids[:, t:t + 1], cache)[0] for t in range(20, 30)])
        static = model.new_cache(1, 32)  # the fixed-shape cache CUDA graphs replay: writes convert too
        static.make_static()
        model(ids[:, :20], static)
        static_steps = torch.cat([model(ids[:, t:t + 1], static)[0] for t in range(20, 30)])
        expected = hf_model(ids).logits[0, 20:].float()
    for got in (steps, static_steps):
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-3 * expected.abs().max().item())


@pytest.fixture(scope="module")
def tiny_packed(tmp_path_factory):
    """(transformers' model, ours) on one tiny Q4_1 GGUF: 4 heads of 16 values, 2 KV heads, 256 positions."""
    from gguf import GGMLQuantizationType
    from test_loading_gguf import hf_llama_and_gguf_tensors, tiny_metadata, write_gguf

    import lucidlm

    hf_model, tensors = hf_llama_and_gguf_tensors(tie=True, encoding=GGMLQuantizationType.Q4_1)
    path = write_gguf(tmp_path_factory.mktemp("cache") / "tiny.gguf", tiny_metadata(), tensors)
    return hf_model, lucidlm.load(str(path), progress=False).model


def _ids(n: int, seed: int) -> torch.Tensor:
    from test_loading_gguf import VOCAB_SIZE

    return torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB_SIZE, size=(1, n)))


def _close(ours: torch.Tensor, expected: torch.Tensor, bound: float = 2e-3) -> None:
    # float32 parity up to x's int8 rounding in the decode matmuls and the float16 keys and values
    # (bfloat16 passes, the chunked prompt path, get their own bound)
    torch.testing.assert_close(ours, expected, rtol=0, atol=bound * expected.abs().max().item())


def test_every_kind_of_pass_over_a_float16_cache_gives_transformers_logits(tiny_packed):
    """A 1-token prompt (the decode kernel on the fresh keys, whose values are a strided view), decode
    steps, a pass of several tokens over the cache (prompt lookup's check), the same after `truncate`
    (rejected guesses), and a 140-token pass onto a non-empty cache (the bfloat16 chunked path, reading
    the float16 cache)."""
    hf_model, model = tiny_packed
    ids = _ids(180, seed=11)
    with torch.inference_mode():
        expected = hf_model(ids).logits[0].float()  # (180, V)
        cache = model.new_cache(1, 200)
        assert cache.keys[0].dtype == torch.float16
        first = model(ids[:, :1], cache)[0]
        assert torch.equal(first, model(ids[:, :1])[0])  # the prompt pass reads its own keys
        steps = torch.cat([model(ids[:, t:t + 1], cache)[0] for t in range(1, 12)])
        _close(steps, expected[1:12])
        _close(model(ids[:, 12:17], cache)[0], expected[12:17])  # five positions at once
        cache.truncate(14)  # the last three were "rejected"
        _close(model(ids[:, 14:20], cache)[0], expected[14:20])
        _close(model(ids[:, 20:160], cache)[0], expected[20:160], bound=2e-2)  # bfloat16 matmuls and attention
        uncached = model(ids[:, :160])[0, 20:160]  # the same rounding without a cache: what the bound allows
        assert (uncached - expected[20:160]).abs().max() > 2e-3 * expected[20:160].abs().max()


def test_batched_generation_over_float16_caches_is_each_prompts_own(tiny_packed):
    """generate_batch merges and trims float16 caches of prompts of different lengths: every row's
    greedy tokens are transformers' greedy continuation of that prompt alone."""
    from lucidlm.batch import generate_batch

    hf_model, model = tiny_packed
    prompts = [_ids(n, seed=n)[0].tolist() for n in (5, 17, 9)]
    rows = generate_batch(model, prompts, max_new_tokens=8)
    for prompt, row in zip(prompts, rows):
        with torch.inference_mode():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                         pad_token_id=0)[0, len(prompt):].tolist()
        assert row == expected


def test_heads_the_kernel_cannot_take_keep_a_float32_cache(tmp_path):
    """Heads of 8 values: the decode attention kernel does not take them, so every step would widen a
    float16 cache back to float32; such models keep float32."""
    from test_loading_gguf import random_tiny_tensors, tiny_metadata, write_gguf

    import lucidlm

    sizes = dict(n_heads=8, n_kv_heads=2)  # d_model 64: heads of 8
    model = lucidlm.load(str(write_gguf(tmp_path / "h8.gguf", tiny_metadata(**sizes), random_tiny_tensors(**sizes))),
                         progress=False).model
    assert model.config.head_dim == 8 and model.new_cache(1, 4).keys[0].dtype == torch.float32
