"""Tokens as text people can read in tables, axis labels and pages."""

from __future__ import annotations


def token_text(tokenizer, token_id: int) -> str:
    """The text of one token (a token holding part of a UTF-8 character decodes to U+FFFD)."""
    return tokenizer.decode([int(token_id)])


def visible(text: str) -> str:
    """Spaces as '␣' and unprintable characters escaped ('\\n', '\\x00'), so ' Paris' and 'Paris'
    look different and no token is blank."""
    return "".join("␣" if ch == " " else ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    return [visible(token_text(tokenizer, i)) for i in ids]
