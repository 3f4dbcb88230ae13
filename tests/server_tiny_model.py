"""A tiny random Llama with SmolLM2's real tokenizer and chat template, for the server tests
that do not need a real model's text (validation, queueing, disconnects, fuzzing): it loads
in a second and decodes a step in about a millisecond. `step_seconds` slows every forward
pass down, to keep a request running long enough to disconnect from it or fill the queue.
"""

from __future__ import annotations

import functools
import time

import torch

from lucidlm.api import LucidModel
from lucidlm.models.llama import Llama, LlamaConfig
from lucidlm.tokenizers import load_tokenizer


class PacedLlama(Llama):
    step_seconds = 0.0
    failure: Exception | None = None  # raised by every forward pass while set (a bug, simulated)

    def forward(self, tokens, cache=None, valid=None, last_only=False):
        if self.failure is not None:
            raise self.failure
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return super().forward(tokens, cache, valid, last_only=last_only)


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer():
    return load_tokenizer("smollm2")


def tiny_chat_model(seed: int = 0, context_length: int = 512, step_seconds: float = 0.0) -> LucidModel:
    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=64, context_length=context_length)
    model = PacedLlama(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # large enough weights that the next-token distributions are far from uniform
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5 * 3)
    model.step_seconds = step_seconds
    return LucidModel(model.eval(), tokenizer, "tiny-smollm2")
