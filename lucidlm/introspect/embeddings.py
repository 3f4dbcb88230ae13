"""One vector per word, for maps of where words sit in the model's space.

- input embeddings: the rows of the embedding table for the word's tokens, averaged
  (a word split into several tokens has no single row);
- contextual (`contextual=True`): the model's last-layer states (`hook_final_norm`, what
  the LM head reads, like Hugging Face's `last_hidden_state`) for the word run alone,
  averaged over its tokens.

Words are tokenized as given: "king" and " king" are different tokens in byte-level BPE
vocabularies (the second is how the word appears mid-sentence).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..models.layers import model_device
from .capture import run_with_cache


def check_words(words: list[str]) -> None:
    if not words:
        raise InvalidArgumentError("no words given: name at least two words to place on the map")
    if any(not w for w in words):
        raise InvalidArgumentError("empty word in the word list")
    if len(words) < 2:
        raise InvalidArgumentError(f"a map needs at least two words, got only '{words[0]}'")


@torch.inference_mode()
def word_vectors(model: nn.Module, tokenizer, words: list[str], contextual: bool = False) -> torch.Tensor:
    """words -> (N, C) float32, one averaged vector per word."""
    check_words(words)
    prefix = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    device = model_device(model)
    vectors = []
    for word in words:
        ids = tokenizer.encode(word, add_special=False)
        if not contextual:
            vectors.append(model.embed_tokens(torch.tensor(ids, device=device)).float().mean(dim=0))  # (C,)
            continue
        tokens = torch.tensor([prefix + ids], device=device)  # (1, T)
        _, cache = run_with_cache(model, tokens, names=["hook_final_norm"])
        vectors.append(cache["hook_final_norm"][0, len(prefix):].float().mean(dim=0))
    return torch.stack(vectors)
