"""Normalizers: the text rewrites a tokenizer applies before it splits anything.

A `tokenizer.json` names its normalizer (BERT's cleaning and lower-casing, Unicode NFC,
Llama 2's "prepend ▁ and turn spaces into ▁"...); `normalizer_from_json` turns that entry
into a plain `str -> str` function. Each rewrite follows the documented behaviour of the
Hugging Face tokenizers component of the same name.
"""

import unicodedata
from collections.abc import Callable
from functools import partial

import regex

from lucidlm.errors import UnsupportedError

Normalizer = Callable[[str], str]

# Rust's `char::is_whitespace` (the Unicode White_Space property), which BERT's cleaning
# and pre-tokenizer use. Python's str.isspace differs: it also counts U+001C..U+001F.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                       "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")

# Code point blocks BERT treats as Chinese characters (CJK ideographs, not kana or hangul).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def _is_control(char: str) -> bool:
    # Tab, newline and carriage return are control characters that BERT keeps as spaces.
    # Unassigned code points (Cn) are kept: the reference's tables do not flag them.
    return char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cf", "Co")


def strip_accents(text: str) -> str:
    """Decompose (NFD) and drop the combining marks: "Crème" -> "Creme"."""
    return "".join(char for char in unicodedata.normalize("NFD", text) if unicodedata.category(char) != "Mn")


def lowercase(text: str) -> str:
    # Character by character, as the reference does: Python's str.lower on a whole string
    # would turn a word-final Σ into ς, which BERT's vocabulary spells σ.
    return "".join(char.lower() for char in text)


def bert_normalize(text: str, clean_text: bool = True, handle_chinese_chars: bool = True,
                   strip_accents_: bool | None = None, lowercase_: bool = True) -> str:
    """BERT's normalizer. `strip_accents_` None means "strip when lower-casing"."""
    if clean_text:
        # Drop NUL, U+FFFD and control/format characters; every whitespace becomes a space.
        text = "".join(" " if char in WHITESPACE else char for char in text
                       if char not in "\x00\ufffd" and not _is_control(char))
    if handle_chinese_chars:
        # Each CJK ideograph becomes its own word: Chinese is written without spaces.
        text = "".join(f" {char} " if is_cjk(char) else char for char in text)
    if lowercase_ if strip_accents_ is None else strip_accents_:
        text = strip_accents(text)
    if lowercase_:
        text = lowercase(text)
    return text


def _prepend(prefix: str, text: str) -> str:
    return prefix + text if text else text


def _replace(pattern: regex.Pattern, content: str, text: str) -> str:
    return pattern.sub(lambda _: content, text)


def _strip(left: bool, right: bool, text: str) -> str:
    if left:
        text = text.lstrip()
    if right:
        text = text.rstrip()
    return text


def _sequence(steps: list[Normalizer], text: str) -> str:
    for step in steps:
        text = step(text)
    return text


def pattern_from_json(spec: dict) -> regex.Pattern:
    """A tokenizer.json pattern: {"String": literal} or {"Regex": expression}."""
    if "String" in spec:
        return regex.compile(regex.escape(spec["String"]))
    if "Regex" in spec:
        return regex.compile(spec["Regex"])
    raise UnsupportedError(f"unsupported pattern in tokenizer.json: {spec!r}")


def normalizer_from_json(spec: dict | None) -> Normalizer | None:
    """The normalizer a tokenizer.json entry describes; None when it does nothing."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [step for step in map(normalizer_from_json, spec["normalizers"]) if step is not None]
        return partial(_sequence, steps) if steps else None
    if kind == "BertNormalizer":
        return partial(bert_normalize, clean_text=spec.get("clean_text", True),
                       handle_chinese_chars=spec.get("handle_chinese_chars", True),
                       strip_accents_=spec.get("strip_accents"), lowercase_=spec.get("lowercase", True))
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return partial(unicodedata.normalize, kind)
    if kind == "Lowercase":
        return lowercase
    if kind == "StripAccents":
        # Unlike BertNormalizer's, this step only drops marks; it expects NFD text.
        return lambda text: "".join(char for char in text if unicodedata.category(char) != "Mn")
    if kind == "Strip":
        return partial(_strip, spec.get("strip_left", True), spec.get("strip_right", True))
    if kind == "Prepend":
        return partial(_prepend, spec["prepend"])
    if kind == "Replace":
        return partial(_replace, pattern_from_json(spec["pattern"]), spec["content"])
    raise UnsupportedError(f"unsupported normalizer in tokenizer.json: {kind!r}")
