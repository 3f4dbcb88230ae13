"""String arrays in GGUF metadata (vocabularies: 50k-260k strings), read by `GGUFFile`.

`_Cursor.strings` decodes a whole array at once (length prefixes turned into NUL runs, one
decode, one split) after finding where each string starts in a fast pass that assumes
strings shorter than 256 bytes. Each shortcut has a fallback; these tests take every path
and compare with the plain definition: each string is its bytes decoded as UTF-8, invalid
bytes replaced by U+FFFD (what `_Cursor.string` does for a single string).
"""

from __future__ import annotations

import struct

import pytest

from lucidlm.errors import ModelFileError
from lucidlm.loading.gguf import GGUFFile


def _string(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def _file_with_strings(tmp_path, items: list[bytes]):
    """A GGUF file with no tensors and two keys: `test.strings` (an array holding `items`)
    and then `test.after` (a string), which parses right only if the array's end was found."""
    kv = _string(b"test.strings") + struct.pack("<IIQ", 9, 8, len(items)) + b"".join(map(_string, items))
    kv += _string(b"test.after") + struct.pack("<I", 8) + _string(b"after")
    path = tmp_path / "strings.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kv)
    return path


def _expected(items: list[bytes]) -> list[str]:
    return [item.decode("utf-8", "replace") for item in items]


CASES = {
    "ascii": [b"hello", b"world", b"", b"<|im_start|>", b"\n", b" " * 31],
    "multibyte": ["▁the".encode(), "日本語".encode(), "😀".encode(), b"", "é".encode() * 100],
    "one long string": [b"a", b"x" * 256, b"b", "é".encode() * 300, b""],  # >= 256 bytes: the exact pass
    "nul inside": [b"a\x00b", b"\x00", b"c" * 8, b"\x00" * 8, b""],  # NULs: one decode per string
    "invalid utf-8": [b"ok", b"\xff\xfe", b"\xc3", b"\xa9", "日".encode()[:2], b"end"],
    "split sequence": ["é".encode()[:1], "é".encode()[1:]],  # valid only when joined
    "only empty": [b"", b"", b""],
}


@pytest.mark.parametrize("items", list(CASES.values()), ids=list(CASES))
def test_string_arrays_decode_each_string(tmp_path, items):
    gguf = _file_with_strings(tmp_path, items)
    metadata = GGUFFile(gguf).metadata
    assert metadata["test.strings"] == _expected(items)
    assert metadata["test.after"] == "after"


def test_a_large_vocabulary(tmp_path):
    items = [f"tok{i}".encode() + "▁é日😀".encode()[: i % 14] for i in range(70_000)]
    assert GGUFFile(_file_with_strings(tmp_path, items)).metadata["test.strings"] == _expected(items)


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
def test_truncated_string_array(tmp_path, cut):
    path = _file_with_strings(tmp_path, [b"abc", b"x" * 300, b"defgh"])
    data = path.read_bytes()
    end_of_array = data.index(b"defgh") + 5
    path.write_bytes(data[: end_of_array - cut])
    with pytest.raises(ModelFileError, match="truncated"):
        GGUFFile(path)


def test_string_length_past_the_end(tmp_path):
    path = _file_with_strings(tmp_path, [b"abc", b"def"])
    data = bytearray(path.read_bytes())
    at = data.index(_string(b"def"))
    data[at : at + 8] = struct.pack("<Q", 10**6)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="truncated"):
        GGUFFile(path)
