"""The GPT-2 byte <-> unicode alphabet that byte-level BPE vocabularies are written in.

Byte-level BPE works on raw UTF-8 bytes, but its vocabulary and merge list are stored as
text. GPT-2 solved this by giving each of the 256 byte values a printable stand-in
character: bytes that already are printable, non-space Latin-1 characters stand for
themselves, and every other byte (control codes, space, 0x7F-0xA0, 0xAD) is moved up to
U+0100 and beyond, in order. That is why a space shows up as "Ġ" (U+0120) and a newline
as "Ċ" (U+010A) in every GPT-2-style vocabulary.
"""

from functools import cache


@cache
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte value 0..255 to the character that spells it in a byte-level vocab."""
    # Bytes that are visible Latin-1 characters keep their own code point, so ASCII words
    # read naturally in the vocabulary ("hello" is spelled "hello").
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in kept}
    # The rest get the next unused code points from U+0100 upward, in byte order.
    next_code_point = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return dict(sorted(mapping.items()))


@cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`: stand-in character -> byte value."""
    return {char: byte for byte, char in bytes_to_unicode().items()}
