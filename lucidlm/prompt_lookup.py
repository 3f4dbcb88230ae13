"""Prompt-lookup decoding: guess the next tokens by copying, check the guesses in one pass.

Generated text often repeats text already in the context: a summary quotes its source, an
edit copies most of the code it changes, a small model falls into a loop. When the last few
tokens occurred earlier, the tokens that followed them then are a good guess for what comes
next. Checking k guesses takes one forward pass over k + 1 positions, and on a CPU a pass
over a few positions costs little more than over one: each weight is read once either way
(SmolLM2 packed, 2 threads: 30 ms for 1 or 2 positions, 35 ms for 3, 57 ms for 5), so K = 2
guesses suit a CPU best (`bench/lookup.py` and `bench/RESULTS.md`: 1.2-2.5x faster decoding
where the text repeats; where it does not, the failed guesses cost little: a sampled story,
3 % of its tokens guessed right, 23.9 vs 24.2 tok/s).

    context  ... the cat sat on the mat . the cat | ?        last n-gram "the cat" seen before,
    draft                                   sat on the        followed by "sat on the"
    pass     [cat] sat on  the  -> logits after each          one forward pass, 4 positions
    accept   draw from each row in turn while it equals the draft; the first draw that differs
             is kept too, the positions after it are dropped from the KV cache

The output follows the model's distribution exactly: each token is drawn by the usual
sampler from the model's distribution given the tokens actually accepted before it, and a
draft token counts only when the draw equals it (speculative decoding, Leviathan et al. 2023,
arXiv:2211.17192, with a draft that puts all its probability on one token: acceptance with
probability p(draft) is what drawing and comparing does). Greedy decoding gives ordinary greedy
decoding's tokens, up to floating-point differences between a one- and a k-position pass. The
idea and its name: Saxena, "Prompt Lookup Decoding" (2023); Hugging Face calls the option
`prompt_lookup_num_tokens`, llama.cpp "lookup decoding".

This module keeps the guessing (`NgramIndex`); the loop that feeds and checks the guesses is the
ordinary one, `generate.generate_tokens(..., prompt_lookup=K)`: a plain decode step is a pass
with no guesses.
"""

from __future__ import annotations

from typing import Iterable

MAX_NGRAM = 3  # longest suffix looked up; a longer match is a more specific (better) guess


class NgramIndex:
    """Where each n-gram (n <= max_n) of a growing token sequence last occurred, for drafting.

    `follows[ngram]` is the position just after the latest occurrence of `ngram` that has a
    token after it, so a lookup of the sequence's own suffix finds its previous occurrence.
    Kept up to date token by token: a lookup costs max_n dictionary probes, not a scan.
    """

    def __init__(self, ids: Iterable[int] = (), max_n: int = MAX_NGRAM):
        self.max_n = max_n
        self.ids: list[int] = []
        self.follows: dict[tuple[int, ...], int] = {}
        self.extend(ids)

    def extend(self, ids: Iterable[int]) -> None:
        for token in ids:
            end = len(self.ids)  # the position `token` takes: it follows the n-grams ending here
            self.ids.append(int(token))
            for n in range(1, min(self.max_n, end) + 1):
                self.follows[tuple(self.ids[end - n:end])] = end

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix
        (of at most max_n tokens) seen before; [] when even the last token is new."""
        for n in range(min(self.max_n, len(self.ids)), 0, -1):
            start = self.follows.get(tuple(self.ids[-n:]))
            if start is not None:
                return self.ids[start:start + k]
        return []
