"""Pre-tokenizers: how text is cut into words before BPE merges run inside each word.

A byte-level BPE vocabulary only reproduces its training-time tokens if text is split the
way it was split during training, so each model family ships its own splitting regex. A
GGUF file names that choice in `tokenizer.ggml.pre`; `pre_tokenizer_for` turns the name
into a `PreTokenizer`. A tokenizer.json describes its splitting as a pipeline of steps
instead; `pre_tokenizer_from_json` builds a `PreTokenizerPipeline` with the same `split`.

We use the third-party `regex` module rather than `re` because the patterns need Unicode
classes (\\p{L} letters, \\p{N} numbers), and because its `\\s` matches the same characters
as the reference tokenizers (`re` also counts U+001C..U+001F as whitespace).
"""

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import regex

from lucidlm.errors import UnsupportedError
from lucidlm.tokenizers.normalize import WHITESPACE, pattern_from_json

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


# ----- pre-tokenizers described by a tokenizer.json -----

Step = Callable[[str], list[str]]

_SPLIT_BEHAVIORS = ("removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous")


def split_on_pattern(pattern: regex.Pattern, behavior: str = "isolated", invert: bool = False) -> Step:
    """A splitting step in the manner of tokenizers' `Split`: the pattern's matches are the
    delimiters (with `invert`, the text between them is), and `behavior` says what becomes of
    each delimiter: dropped, its own piece, glued to the piece before or after it, or, for
    "contiguous", joined with neighbouring runs of the same kind."""
    behavior = behavior.lower().replace("mergedwith", "merged_with_")
    if behavior not in _SPLIT_BEHAVIORS:
        raise UnsupportedError(f"unsupported split behavior {behavior!r} in tokenizer.json")

    def step(text: str) -> list[str]:
        # (text, is_delimiter) runs covering the whole input, in order.
        runs: list[tuple[str, bool]] = []
        start = 0
        for match in pattern.finditer(text):
            if match.start() == match.end():
                continue
            if match.start() > start:
                runs.append((text[start:match.start()], invert))
            runs.append((match.group(), not invert))
            start = match.end()
        if start < len(text):
            runs.append((text[start:], invert))
        return _combine(runs, behavior)

    return step


def _combine(runs: list[tuple[str, bool]], behavior: str) -> list[str]:
    if behavior == "removed":
        return [run for run, is_delimiter in runs if not is_delimiter]
    if behavior == "isolated":
        return [run for run, _ in runs]
    # The merging behaviours glue a delimiter to one neighbour, and only to a neighbour that
    # is not itself a delimiter: with the pattern "▁", "▁▁hi" merged with next is "▁", "▁hi".
    if behavior == "merged_with_next":
        runs, pieces = runs[::-1], _glue(runs[::-1], lambda delimiter, piece: delimiter + piece)
        return pieces[::-1]
    if behavior == "merged_with_previous":
        return _glue(runs, lambda delimiter, piece: piece + delimiter)
    # contiguous: neighbouring runs of the same kind form one piece.
    pieces: list[str] = []
    previous_was_delimiter = False
    for run, is_delimiter in runs:
        if is_delimiter == previous_was_delimiter and pieces:
            pieces[-1] += run
        else:
            pieces.append(run)
        previous_was_delimiter = is_delimiter
    return pieces


def _glue(runs: list[tuple[str, bool]], join) -> list[str]:
    """Walk `runs` in order, joining each delimiter onto the piece just before it (if any,
    and if that piece is not a delimiter); `join` puts the two together."""
    pieces: list[str] = []
    previous_was_delimiter = False
    for run, is_delimiter in runs:
        if is_delimiter and not previous_was_delimiter and pieces:
            pieces[-1] = join(run, pieces[-1])
        else:
            pieces.append(run)
        previous_was_delimiter = is_delimiter
    return pieces


def byte_level_step(add_prefix_space: bool, use_regex: bool) -> Step:
    """tokenizers' `ByteLevel` pre-tokenizer: an optional leading space, then the GPT-2 regex.
    (Spelling the bytes in the byte alphabet happens later, in the BPE tokenizer.)"""
    gpt2 = split_on_pattern(regex.compile(GPT2_PATTERN))

    def step(text: str) -> list[str]:
        if add_prefix_space and not text.startswith(" "):
            text = " " + text
        return gpt2(text) if use_regex else [text]

    return step


def is_bert_punctuation(char: str) -> bool:
    """ASCII punctuation (which includes symbols like $ + < = > ^ ` |) or any Unicode P* character."""
    return (char.isascii() and not char.isalnum() and char.isprintable() and char != " ") or (
        unicodedata.category(char).startswith("P"))


def bert_split(text: str) -> list[str]:
    """BERT's pre-tokenizer: split on whitespace (dropped), then make each punctuation mark a word."""
    words: list[str] = []
    current: list[str] = []
    for char in text:
        if char in WHITESPACE or is_bert_punctuation(char):
            if current:
                words.append("".join(current))
                current = []
            if char not in WHITESPACE:
                words.append(char)
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    return words


@dataclass(frozen=True)
class PreTokenizerPipeline:
    """A pre-tokenizer read from a tokenizer.json: each step is applied to every piece the
    previous step produced. Same `split` as `PreTokenizer`."""

    name: str
    steps: tuple[Step, ...]

    def split(self, text: str) -> list[str]:
        words = [text] if text else []
        for step in self.steps:
            words = [piece for word in words for piece in step(word) if piece]
        return words


def pre_tokenizer_from_json(spec: dict | None) -> PreTokenizerPipeline:
    """The pre-tokenizer a tokenizer.json's `pre_tokenizer` entry describes (None: no splitting).

    Metaspace, SentencePiece's pre-tokenizer, is handled by the SentencePiece tokenizer itself.
    """
    return PreTokenizerPipeline(_describe(spec), tuple(_steps_from_json(spec)))


def _describe(spec: dict | None) -> str:
    if spec is None:
        return "none"
    if spec.get("type") == "Sequence":
        return "+".join(_describe(part) for part in spec["pretokenizers"])
    return spec.get("type", "?")


def _steps_from_json(spec: dict | None) -> list[Step]:
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [step for part in spec["pretokenizers"] for step in _steps_from_json(part)]
    if kind == "ByteLevel":
        return [byte_level_step(spec.get("add_prefix_space", True), spec.get("use_regex", True))]
    if kind == "Split":
        return [split_on_pattern(pattern_from_json(spec["pattern"]), spec.get("behavior", "Isolated"),
                                 spec.get("invert", False))]
    if kind == "Digits":
        digits = regex.compile(r"\p{N}" if spec.get("individual_digits", False) else r"\p{N}+")
        return [split_on_pattern(digits)]
    if kind == "BertPreTokenizer":
        return [bert_split]
    if kind == "WhitespaceSplit":
        return [split_on_pattern(regex.compile(r"\s+"), "removed")]
    if kind == "Whitespace":
        return [split_on_pattern(regex.compile(r"\w+|[^\w\s]+"), "removed", invert=True)]
    if kind == "Punctuation":
        punctuation = regex.compile(r"[\p{P}\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e]")
        return [split_on_pattern(punctuation, spec.get("behavior", "Isolated"))]
    raise UnsupportedError(f"unsupported pre-tokenizer in tokenizer.json: {kind!r}")
