"""SentencePiece-style BPE with byte fallback (Llama 2, Gemma, Mistral, Phi-3).

These vocabularies are written in characters, not bytes: a space is spelled "▁" (U+2581)
and most pieces are ordinary text ("▁world", "漢字"). Encoding runs in four steps:

1. cut the text on control and user-defined tokens (`<start_of_turn>`, Gemma's "\\n\\n"),
   which are matched whole (see whole_tokens.py);
2. normalize each remaining span: spaces become "▁", and a leading "▁" is added when the
   vocabulary asks for a space prefix (GGUF `tokenizer.ggml.add_space_prefix`, or a
   tokenizer.json's Prepend normalizer / Metaspace pre-tokenizer);
3. BPE over the span's characters: repeatedly join the adjacent pair whose joined piece
   merges first. In a GGUF ("llama" model) the merge order is implicit: the joined piece
   with the highest score wins, as in SentencePiece and llama.cpp. A tokenizer.json lists
   its merges instead, and the pair listed first wins;
4. a character with no token of its own falls back to one `<0xNN>` token per UTF-8 byte.

Decoding reverses this: "▁" becomes a space, `<0xNN>` tokens become raw bytes. With a
space prefix, decode drops the one leading space that encoding added. `token_bytes` (and
so the streaming decoder) keeps it: a streamed continuation's first token needs its space.
"""

from dataclasses import dataclass
from functools import lru_cache, partial

import regex

from lucidlm.errors import UnsupportedError
from lucidlm.tokenizers.merge import bpe_merge
from lucidlm.tokenizers.normalize import Normalizer
from lucidlm.tokenizers.vocab import vocabulary_entry
from lucidlm.tokenizers.whole_tokens import WholeTokens

# Values of `tokenizer.ggml.token_type` (llama.cpp's, after SentencePiece's piece types).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

SPACE = "\u2581"  # "▁", SentencePiece's visible spelling of a space
BYTE_PIECE = regex.compile(r"<0x([0-9A-Fa-f]{2})>")
_BEFORE_SPACE = regex.compile(f"(?={SPACE})")

# Spans whose BPE result we remember (see bpe.py's word cache).
_SPAN_CACHE_SIZE = 1 << 14


def escape_whitespace(text: str, add_space_prefix: bool) -> str:
    """SentencePiece's view of a span: spaces spelled "▁", optionally one prepended."""
    text = text.replace(" ", SPACE)
    return SPACE + text if add_space_prefix and text else text


@dataclass(frozen=True)
class Metaspace:
    """tokenizers' Metaspace pre-tokenizer: spaces become "▁"; a "▁" is prepended unless the
    span starts with one ("always"; "first": only to a span at the very start of the text;
    "never"); with `split`, every "▁" starts a new word and merges stay inside words."""

    prepend_scheme: str = "always"
    split: bool = True

    def words(self, span: str, at_text_start: bool) -> list[str]:
        text = span.replace(" ", SPACE)
        prepend = self.prepend_scheme == "always" or (self.prepend_scheme == "first" and at_text_start)
        if prepend and not text.startswith(SPACE):
            text = SPACE + text
        if not self.split:
            return [text]
        # Cut before each "▁"; a run of them leaves single "▁" words and the last one joins the word after it.
        return [word for word in _BEFORE_SPACE.split(text) if word]


class SentencePieceBPETokenizer:
    """A SentencePiece-style BPE tokenizer: text <-> token ids, with the BPETokenizer interface.

    `tokens` are the vocabulary strings by id and `token_types` their GGUF types (control,
    user-defined, byte...). The merge order comes from `scores` (GGUF: higher merges first)
    or `merges` (tokenizer.json: (left, right) pairs, earlier first) - exactly one of them.
    `normalizer` rewrites each span before BPE (GGUF: `escape_whitespace`); `metaspace`, if
    given, then splits it into words. `prefix_ids` / `suffix_ids` are added by `encode`
    when `add_special` is true (BOS, EOS...). With `byte_fallback`, characters missing from
    the vocabulary become byte tokens, otherwise `unk_id` (consecutive ones fused into one).
    `ignore_merges`: a word that is itself a token is not merged (a tokenizer.json option).
    `strip_leading_space`: decode removes one leading space (the prefix encode added).
    """

    def __init__(
        self,
        tokens: list[str],
        token_types: list[int] | None = None,
        *,
        scores: list[float] | None = None,
        merges: list[tuple[str, str]] | None = None,
        normalizer: Normalizer | None = None,
        metaspace: Metaspace | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        prefix_ids: tuple[int, ...] = (),
        suffix_ids: tuple[int, ...] = (),
        byte_fallback: bool = True,
        ignore_merges: bool = False,
        strip_leading_space: bool = False,
        whole_tokens: WholeTokens | None = None,
    ):
        if (scores is None) == (merges is None):
            raise ValueError("give exactly one of scores (GGUF) or merges (tokenizer.json)")
        self._tokens = list(tokens)
        self._token_to_id = {token: index for index, token in enumerate(self._tokens)}
        types = list(token_types) if token_types is not None else [TOKEN_TYPE_NORMAL] * len(self._tokens)
        self.token_types = types
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.prefix_ids, self.suffix_ids = tuple(prefix_ids), tuple(suffix_ids)
        self.chat_template: str | None = None
        self._normalizer = normalizer
        self._metaspace = metaspace
        self._byte_fallback = byte_fallback
        self._ignore_merges = ignore_merges
        self._strip_leading_space = strip_leading_space

        if merges is not None:
            ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
            self._priority = lambda left, right: ranks.get((left, right))
        else:
            # SentencePiece only builds normal (and user-defined/unused) pieces by merging:
            # never a control token or a `<0xNN>` byte token, whatever their score.
            # Looked up through the vocabulary at each candidate pair rather than kept in a
            # token -> score dict of its own (Gemma 3's 262k pieces: ~16 MiB less).
            mergeable = (TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED)
            token_to_id, scores = self._token_to_id, list(scores)

            def priority(left: str, right: str) -> float | None:
                index = token_to_id.get(left + right)
                return None if index is None or types[index] not in mergeable else -scores[index]

            self._priority = priority

        self.special_ids = frozenset(i for i, kind in enumerate(types) if kind == TOKEN_TYPE_CONTROL)
        if whole_tokens is None:
            matched_whole = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
            whole_tokens = WholeTokens({self._tokens[i]: i for i, kind in enumerate(types)
                                        if kind in matched_whole and self._tokens[i]})
        self._whole_tokens = whole_tokens
        self._byte_ids = [self._token_to_id.get(f"<0x{byte:02X}>") for byte in range(256)]
        # Most pieces are text ("▁" for a space); only "<0x..>" pieces may stand for one byte.
        self._token_bytes = [piece.replace(SPACE, " ").encode("utf-8") for piece in self._tokens]
        for i, piece in enumerate(self._tokens):
            if piece.startswith("<0x"):
                self._token_bytes[i] = self._spelled_bytes(i)
        self._word_ids = lru_cache(maxsize=_SPAN_CACHE_SIZE)(self._bpe_word_ids)

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "SentencePieceBPETokenizer":
        """Build the tokenizer from a GGUF's metadata (`tokenizer.ggml.model` "llama")."""
        model = meta.get("tokenizer.ggml.model")
        if model != "llama":
            raise UnsupportedError("SentencePieceBPETokenizer reads SentencePiece vocabularies "
                                   f"(tokenizer.ggml.model 'llama'), not {model!r}")
        tokens = meta["tokenizer.ggml.tokens"]
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        # llama.cpp adds BOS, and a space prefix, to SentencePiece vocabularies that do not say otherwise.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer = cls(
            tokens,
            meta.get("tokenizer.ggml.token_type"),
            scores=scores,
            normalizer=partial(escape_whitespace, add_space_prefix=add_space_prefix),
            bos_id=bos_id,
            eos_id=eos_id,
            unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            prefix_ids=(bos_id,) if add_bos and bos_id is not None else (),
            suffix_ids=(eos_id,) if add_eos and eos_id is not None else (),
            strip_leading_space=add_space_prefix,
        )
        tokenizer.chat_template = meta.get("tokenizer.chat_template")
        return tokenizer

    # ----- vocabulary -----

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary."""
        return len(self._tokens)

    @property
    def add_bos(self) -> bool:
        return self.bos_id is not None and self.bos_id in self.prefix_ids

    @property
    def add_eos(self) -> bool:
        return self.eos_id is not None and self.eos_id in self.suffix_ids

    def id_to_piece(self, token_id: int) -> str:
        """The token's vocabulary string, as stored ("▁world", "<0xE6>", "<start_of_turn>");
        "" for an id past the vocabulary (a model's padding rows, see `tokenizers.vocab`)."""
        return vocabulary_entry(self._tokens, token_id, "")

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary string, or None if it is not in the vocabulary."""
        return self._token_to_id.get(piece)

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a control token (BOS, EOS, `<start_of_turn>`...)."""
        return token_id in self.special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text this token stands for ("▁" as a space, `<0xNN>` as that byte; none
        for an id past the vocabulary)."""
        return vocabulary_entry(self._token_bytes, token_id, b"")

    def _spelled_bytes(self, token_id: int) -> bytes:
        piece = self._tokens[token_id]
        byte = BYTE_PIECE.fullmatch(piece)
        if byte is not None and (self.token_types[token_id] == TOKEN_TYPE_BYTE or self._byte_fallback):
            return bytes([int(byte.group(1), 16)])
        return piece.replace(SPACE, " ").encode("utf-8")

    # ----- encoding -----

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids for `text`; with `add_special`, add BOS/EOS as the vocabulary asks."""
        ids: list[int] = list(self.prefix_ids) if add_special else []
        for index, (span, whole_id) in enumerate(self._whole_tokens.split(text)):
            if whole_id is not None:
                ids.append(whole_id)
                continue
            if self._normalizer is not None:
                span = self._normalizer(span)
            words = self._metaspace.words(span, at_text_start=index == 0) if self._metaspace else [span]
            for word in words:
                ids.extend(self._word_ids(word))
        if add_special:
            ids.extend(self.suffix_ids)
        return ids

    def _bpe_word_ids(self, word: str) -> tuple[int, ...]:
        if self._ignore_merges and word in self._token_to_id:
            return (self._token_to_id[word],)
        ids: list[int] = []
        for piece in bpe_merge(word, self._priority):
            token_id = self._token_to_id.get(piece)
            if token_id is not None:
                ids.append(token_id)
                continue
            # Only a single character can be missing: merged pieces are vocabulary entries.
            byte_ids = [self._byte_ids[byte] for byte in piece.encode("utf-8")]
            if self._byte_fallback and None not in byte_ids:
                ids.extend(byte_ids)
            elif self.unk_id is not None and not (ids and ids[-1] == self.unk_id):
                ids.append(self.unk_id)
        return tuple(ids)

    # ----- decoding -----

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """The text for `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        text = b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text
