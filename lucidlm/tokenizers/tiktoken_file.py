"""tiktoken-format byte-level BPE (OpenAI's cl100k_base, used by GPT-4 and GPT-3.5).

A `.tiktoken` file is the whole vocabulary: one line per token, its bytes in base64 and
its rank (which is also its id), e.g. "IGhlbGxv 24748" for b" hello". There is no merge
list: to encode a word, start from its single bytes and repeatedly join the adjacent pair
whose joined bytes have the lowest rank, until no joined pair is in the vocabulary.

The file holds neither the pre-tokenization regex nor the special tokens; they belong to
the encoding's definition, which for cl100k_base is published with tiktoken and copied
below (`CL100K_PATTERN`, `CL100K_SPECIAL_TOKENS`).
"""

import base64
import binascii
from functools import lru_cache
from pathlib import Path

import regex

from lucidlm.errors import InvalidArgumentError, ModelFileError
from lucidlm.tokenizers.byte_level import bytes_to_unicode, unicode_to_bytes
from lucidlm.tokenizers.merge import bpe_merge
from lucidlm.tokenizers.whole_tokens import WholeTokens

# cl100k_base's split: contractions, letter runs with one optional leading non-letter,
# numbers in groups of up to three digits, punctuation runs with trailing newlines,
# newline runs, and whitespace. `?+`, `++` and `*+` are possessive (never give back).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}

_WORD_CACHE_SIZE = 1 << 16


def read_tiktoken_file(path: str | Path) -> dict[bytes, int]:
    """The token bytes -> rank table of a `.tiktoken` file; ModelFileError if it is not one."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the tiktoken file ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ModelFileError(
                f"{path}: line {number} is not '<base64 token> <rank>' - not a .tiktoken file"
            ) from None
    if not ranks:
        raise ModelFileError(f"{path}: the tiktoken file is empty")
    return ranks


class TiktokenTokenizer:
    """Byte-level BPE ranked by tiktoken's rules: text <-> token ids, with the BPETokenizer interface.

    `ranks` maps token bytes to rank (= id); `special_tokens` maps text to id; `pattern` is
    the pre-tokenization regex. Special tokens found in the text are always encoded as
    such (tiktoken's `allowed_special="all"`); tiktoken adds no BOS or EOS.
    """

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str,
                 name: str = "tiktoken"):
        self.name = name
        self._ranks = dict(ranks)
        self._bytes_of = {rank: token for token, rank in self._ranks.items()}
        self._special_tokens = dict(special_tokens)
        self._special_text = {token_id: text for text, token_id in self._special_tokens.items()}
        self._pattern = regex.compile(pattern)
        self._whole_tokens = WholeTokens(self._special_tokens)
        self.special_ids = frozenset(self._special_tokens.values())
        self.bos_id = None
        self.eos_id = self._special_tokens.get("<|endoftext|>")
        self.unk_id = None
        self.pad_id = None
        self.add_bos = False
        self.add_eos = False
        self.chat_template: str | None = None
        self._vocab_size = max(max(self._bytes_of), max(self.special_ids, default=-1)) + 1
        self._word_ids = lru_cache(maxsize=_WORD_CACHE_SIZE)(self._bpe_word_ids)

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: dict[str, int] | None = None,
                  pattern: str = CL100K_PATTERN) -> "TiktokenTokenizer":
        """Read a `.tiktoken` file; the pattern and special tokens default to cl100k_base's."""
        specials = CL100K_SPECIAL_TOKENS if special_tokens is None else special_tokens
        return cls(read_tiktoken_file(path), specials, pattern, name=Path(path).stem)

    # ----- vocabulary -----

    @property
    def vocab_size(self) -> int:
        """One more than the highest id (cl100k_base leaves ids 100261-100275 unassigned)."""
        return self._vocab_size

    def id_to_piece(self, token_id: int) -> str:
        """The token spelled like a GPT-2 vocabulary entry ("Ġworld"), or a special token's text."""
        if token_id in self._special_text:
            return self._special_text[token_id]
        spelling = bytes_to_unicode()
        return "".join(spelling[byte] for byte in self._token_bytes_checked(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece spelled as `id_to_piece` spells it, or None."""
        if piece in self._special_tokens:
            return self._special_tokens[piece]
        alphabet = unicode_to_bytes()
        if not all(char in alphabet for char in piece):
            return None
        return self._ranks.get(bytes(alphabet[char] for char in piece))

    def is_special(self, token_id: int) -> bool:
        """Whether the token is one of the encoding's special tokens (`<|endoftext|>`...)."""
        return token_id in self.special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text this token stands for."""
        if token_id in self._special_text:
            return self._special_text[token_id].encode("utf-8")
        return self._token_bytes_checked(token_id)

    def _token_bytes_checked(self, token_id: int) -> bytes:
        try:
            return self._bytes_of[token_id]
        except KeyError:
            raise InvalidArgumentError(f"token id {token_id} is not in the {self.name} vocabulary") from None

    # ----- encoding -----

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids for `text` (`add_special` is accepted for the common interface: tiktoken adds nothing)."""
        ids: list[int] = []
        for span, special_id in self._whole_tokens.split(text):
            if special_id is not None:
                ids.append(special_id)
                continue
            for word in self._pattern.findall(span):
                ids.extend(self._word_ids(word))
        return ids

    def _bpe_word_ids(self, word: str) -> tuple[int, ...]:
        data = word.encode("utf-8")
        ranks = self._ranks
        if data in ranks:
            return (ranks[data],)
        pieces = bpe_merge([bytes([byte]) for byte in data], lambda left, right: ranks.get(left + right))
        return tuple(ranks[piece] for piece in pieces)

    # ----- decoding -----

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """The text for `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
