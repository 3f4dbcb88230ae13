"""Helpers shared by the tokenizer tests: streaming decode, and comparing with an oracle."""

from lucidlm.tokenizers import IncrementalDecoder


def stream(tokenizer, ids, skip_special=False) -> str:
    """The text IncrementalDecoder produces for `ids`, pushed one at a time."""
    decoder = IncrementalDecoder(tokenizer, skip_special=skip_special)
    return "".join([decoder.push(i) for i in ids] + [decoder.flush()])


def mismatches(ours, reference, texts) -> list:
    """(text, ours, reference) for every text where the two functions disagree."""
    found = []
    for text in texts:
        got, expected = ours(text), reference(text)
        if got != expected:
            found.append((text, got, expected))
    return found
