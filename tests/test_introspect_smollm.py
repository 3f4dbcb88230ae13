"""Hook points on the real SmolLM2 against HF transformers on the same GGUF file.

The reference runs with eager attention (the only implementation that returns attention
weights), switched on for this module and restored afterwards, since the model is a
session fixture shared with other tests.
"""

import pytest
import torch
from prompts import PROMPTS

from lucidlm.introspect import lens_logits, logit_lens

pytestmark = pytest.mark.slow

TEXTS = {"france": "The capital of France is", "prose": PROMPTS["prose"]}


@pytest.fixture(scope="module")
def eager_reference(hf_smollm_model, hf_smollm_tokenizer):
    previous = hf_smollm_model.config._attn_implementation
    hf_smollm_model.set_attn_implementation("eager")
    try:
        out = {}
        with torch.inference_mode():
            for name, text in TEXTS.items():
                ids = hf_smollm_tokenizer(text).input_ids
                out[name] = (ids, hf_smollm_model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True))
        yield out
    finally:
        hf_smollm_model.set_attn_implementation(previous)


@pytest.mark.parametrize("name", list(TEXTS))
def test_patterns_and_residual_streams_equal_reference(lucid_smollm, eager_reference, name):
    ids, ref = eager_reference[name]
    logits, cache = lucid_smollm.run_with_cache(ids, names=lambda n: "hook_pattern" in n or "resid_pre" in n
                                                or n == "hook_final_norm")
    L = lucid_smollm.config.n_layers
    assert len(ref.attentions) == L and len(ref.hidden_states) == L + 1
    for i in range(L):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], ref.attentions[i], atol=1e-4, rtol=0)
        # The residual stream grows to hundreds in a few dimensions: compare relative to its scale.
        expected = ref.hidden_states[i]
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_pre"], expected,
                                   atol=1e-4 * float(expected.abs().max()), rtol=0)
    torch.testing.assert_close(cache["hook_final_norm"], ref.hidden_states[L], atol=1e-3, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=1e-3, rtol=0)


def test_logit_lens_ends_at_the_models_answer(lucid_smollm):
    tokens = lucid_smollm.token_batch(TEXTS["france"])
    logits, cache = lucid_smollm.run_with_cache(tokens, names="blocks.29.hook_resid_post")
    torch.testing.assert_close(lens_logits(lucid_smollm.model, cache["blocks.29.hook_resid_post"]), logits,
                               atol=1e-5, rtol=0)
    reading = logit_lens(lucid_smollm.model, tokens, k=1)
    assert lucid_smollm.tokenizer.decode([int(reading.top_ids[-1, -1, 0])]) == " Paris"
    assert float(reading.top_probs[-1, -1, 0]) == pytest.approx(float(logits[0, -1].softmax(-1).max()), abs=1e-6)
