"""Pre-tokenizers: how text is cut into words before BPE merges run inside each word.

A byte-level BPE vocabulary only reproduces its training-time tokens if text is split the
way it was split during training, so each model family ships its own splitting regex. A
GGUF file names that choice in `tokenizer.ggml.pre`; `pre_tokenizer_for` turns the name
into a `PreTokenizer`.

We use the third-party `regex` module rather than `re` because the patterns need Unicode
classes (\\p{L} letters, \\p{N} numbers), and because its `\\s` matches the same characters
as the reference tokenizers (`re` also counts U+001C..U+001F as whitespace).
"""

from dataclasses import dataclass

import regex

from lucidlm.errors import UnsupportedError

# GPT-2: English contractions, then runs of letters, numbers or other symbols (each may
# carry one leading space), then whitespace. `\s+(?!\S)` leaves the last space of a run
# to start the next word, so " word" stays one piece.
GPT2_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)

# Llama 3 (the GPT-4 "cl100k" style): case-insensitive contractions, a letter run may
# carry any one non-letter/non-digit prefix, numbers split into groups of at most three
# digits, and newlines are kept apart from other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen 2: as Llama 3, but every digit is its own piece.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_NUMBER_CHAR = regex.compile(r"(\p{N})")


@dataclass(frozen=True)
class PreTokenizer:
    """A named splitting rule: an optional digit-isolation pass, then a word regex."""

    name: str
    pattern: regex.Pattern
    # SmolLM2 (like StarCoder) first cuts out every number character as its own piece
    # and only then applies the GPT-2 regex to the text between them. Doing it in two
    # passes matters: in "a   1" the GPT-2 regex alone would leave one space to join the
    # digit, while cutting the digit out first keeps the three spaces together.
    isolate_digits: bool = False

    def split(self, text: str) -> list[str]:
        """Cut `text` into the words that BPE will merge within."""
        if not self.isolate_digits:
            return self.pattern.findall(text)
        words: list[str] = []
        # With a capturing group, split() alternates: text between digits, a digit, ...
        for index, chunk in enumerate(_NUMBER_CHAR.split(text)):
            if index % 2:
                words.append(chunk)
            elif chunk:
                words.extend(self.pattern.findall(chunk))
        return words


def _build_table() -> dict[str, PreTokenizer]:
    gpt2 = regex.compile(GPT2_PATTERN)
    llama3 = regex.compile(LLAMA3_PATTERN)
    qwen2 = regex.compile(QWEN2_PATTERN)
    return {
        "default": PreTokenizer("default", gpt2),
        "gpt2": PreTokenizer("gpt2", gpt2),
        "smollm": PreTokenizer("smollm", gpt2, isolate_digits=True),
        "llama-bpe": PreTokenizer("llama-bpe", llama3),
        "llama3": PreTokenizer("llama3", llama3),
        "qwen2": PreTokenizer("qwen2", qwen2),
    }


PRE_TOKENIZERS: dict[str, PreTokenizer] = _build_table()


def pre_tokenizer_for(name: str) -> PreTokenizer:
    """The pre-tokenizer a GGUF's `tokenizer.ggml.pre` names; UnsupportedError if unknown."""
    try:
        return PRE_TOKENIZERS[name]
    except KeyError:
        supported = ", ".join(sorted(PRE_TOKENIZERS))
        raise UnsupportedError(
            f"unsupported pre-tokenizer {name!r} (tokenizer.ggml.pre); supported: {supported}"
        ) from None
