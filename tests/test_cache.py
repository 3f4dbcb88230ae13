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
