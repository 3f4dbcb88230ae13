"""Showing a tokenization to a person: each token's text above its id, in aligned columns.

Used by `lucid tokenize`. A token's text is what it stands for, with invisible characters
made visible (space "␣", newline "↵", tab "⇥"); bytes that are only part of a character
(byte-level BPE often splits an emoji over several tokens) are shown as \\xNN escapes.
WordPiece tokens are shown as their vocabulary pieces ("##ing"), which is how BERT users
read them.
"""

import unicodedata

from lucidlm.tokenizers.wordpiece import WordPieceTokenizer

_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})

# Alternating background colours for neighbouring tokens (black text), and a colour for special tokens.
_COLOURS = ("\x1b[30;46m", "\x1b[30;43m")
_ID_COLOURS = ("\x1b[36m", "\x1b[33m")
_SPECIAL = "\x1b[35m"
_RESET = "\x1b[0m"


def token_text(tokenizer, token_id: int) -> str:
    """A token's text as we show it (see the module docstring)."""
    if isinstance(tokenizer, WordPieceTokenizer) or tokenizer.is_special(token_id):
        return tokenizer.id_to_piece(token_id)
    text = tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace")
    text = "".join(char if char.isprintable() or char in " \n\t\r" else f"\\u{ord(char):04x}" for char in text)
    return text.translate(_VISIBLE)


def display_width(text: str) -> int:
    """Terminal columns `text` takes: wide (CJK, most emoji) characters two, combining marks none."""
    width = 0
    for char in text:
        if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def _pad(text: str, width: int) -> str:
    return text + " " * (width - display_width(text))


def format_tokenization(name: str, tokenizer, ids: list[int], colour: bool, width: int = 100) -> str:
    """A header line, then rows of token texts over their ids, wrapped at `width` columns."""
    header = f"{name}: {len(ids)} tokens  (vocabulary {tokenizer.vocab_size:,}, {type(tokenizer).__name__})"
    lines = [header]
    texts = [token_text(tokenizer, token_id) for token_id in ids]
    # One column per token, as wide as the wider of its text and its id; columns are
    # separated by a space, or, with colour, told apart by alternating backgrounds.
    gap = "" if colour else " "
    row_texts, row_ids, used = [], [], 2
    for index, (text, token_id) in enumerate(zip(texts, ids)):
        column = max(display_width(text), len(str(token_id)))
        if row_texts and used + column + len(gap) > width:
            lines += ["  " + gap.join(row_texts), "  " + gap.join(row_ids)]
            row_texts, row_ids, used = [], [], 2
        cell_text, cell_id = _pad(text, column), _pad(str(token_id), column)
        if colour:
            if tokenizer.is_special(token_id):
                cell_text, cell_id = f"{_SPECIAL}{cell_text}{_RESET}", f"{_SPECIAL}{cell_id}{_RESET}"
            else:
                cell_text = f"{_COLOURS[index % 2]}{cell_text}{_RESET}"
                cell_id = f"{_ID_COLOURS[index % 2]}{cell_id}{_RESET}"
        row_texts.append(cell_text)
        row_ids.append(cell_id)
        used += column + len(gap)
    if row_texts:
        lines += ["  " + gap.join(row_texts), "  " + gap.join(row_ids)]
    return "\n".join(line.rstrip() for line in lines)


def tokenization_record(name: str, tokenizer, ids: list[int]) -> dict:
    """The same information for machines (`lucid tokenize --json`)."""
    return {
        "tokenizer": name,
        "kind": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
        "count": len(ids),
        "ids": ids,
        "pieces": [tokenizer.id_to_piece(token_id) for token_id in ids],
        "texts": [tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace") for token_id in ids],
    }
