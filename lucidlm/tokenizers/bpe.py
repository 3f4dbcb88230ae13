"""Byte-level BPE tokenizer (GPT-2 style), built from a GGUF file's tokenizer metadata.

Encoding runs in four steps:
1. cut the text on special tokens (`<|im_start|>`...), which are matched whole;
2. cut each remaining span into words with the model's pre-tokenizer regex;
3. spell each word's UTF-8 bytes in the byte-level alphabet (see byte_level.py);
4. inside each word, repeatedly join the adjacent pair that comes first in the merge
   list, until no listed pair is left; the resulting pieces are vocabulary entries.
"""

import heapq
from functools import lru_cache

from lucidlm.errors import UnsupportedError
from lucidlm.tokenizers.byte_level import bytes_to_unicode, unicode_to_bytes
from lucidlm.tokenizers.normalize import Normalizer
from lucidlm.tokenizers.pretokenize import PreTokenizer, PreTokenizerPipeline, pre_tokenizer_for
from lucidlm.tokenizers.vocab import vocabulary_entry
from lucidlm.tokenizers.whole_tokens import WholeTokens

# Values of `tokenizer.ggml.token_type` (llama.cpp's token attributes).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Distinct words whose BPE result we remember. Real text repeats a small set of words,
# so this keeps encoding fast without letting a huge, varied input grow memory forever.
_WORD_CACHE_SIZE = 1 << 16

# Latin-1 decoding turns each byte into the code point of the same value; translating those
# code points through the byte-level alphabet spells a whole word in one C-level call.
_SPELL_LATIN1 = str.maketrans({byte: char for byte, char in bytes_to_unicode().items()})


class BPETokenizer:
    """A byte-level BPE tokenizer: text <-> token ids, matching the model's reference tokenizer.

    `tokens` are vocabulary strings in the byte-level spelling, indexed by id; `merges` are
    "left right" pairs, best first; `token_types` uses GGUF's codes (None: all normal);
    `pre` names the pre-tokenizer (see pretokenize.py) or is one. `unk_id` and `pad_id` are
    recorded for callers: every byte has a token in a complete byte-level vocabulary, so
    encoding never needs an unknown token.

    Options a tokenizer.json may set: `normalizer` rewrites each span before splitting (Qwen 2:
    NFC); with `ignore_merges`, a word that is itself a token is not merged (Llama 3);
    `whole_tokens` replaces the control/user-defined tokens as the ones matched whole.
    """

    def __init__(
        self,
        tokens: list[str],
        merges: list[str],
        token_types: list[int] | None,
        pre: str,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        add_eos: bool = False,
        unk_id: int | None = None,
        pad_id: int | None = None,
        normalizer: Normalizer | None = None,
        ignore_merges: bool = False,
        whole_tokens: WholeTokens | None = None,
    ):
        self._tokens = list(tokens)
        self._token_to_id = {token: index for index, token in enumerate(self._tokens)}
        # Each merge is "left right"; its position in the list is its priority (lower first).
        # Both sides are vocabulary strings: the pair holds the vocabulary's own str objects
        # rather than two new copies (~5 MiB less for a 49k-token vocabulary).
        self._merge_ranks = {}
        for rank, merge in enumerate(merges):
            left, right = merge.split(" ", 1)
            self._merge_ranks[self._vocabulary_string(left), self._vocabulary_string(right)] = rank
        types = list(token_types) if token_types is not None else [TOKEN_TYPE_NORMAL] * len(self._tokens)
        if isinstance(pre, (PreTokenizer, PreTokenizerPipeline)):
            self._pre_tokenizer, self.pre = pre, pre.name
        else:
            self._pre_tokenizer, self.pre = pre_tokenizer_for(pre), pre
        self._normalizer = normalizer
        self._ignore_merges = ignore_merges
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.unk_id = unk_id
        self.pad_id = pad_id
        self.chat_template: str | None = None

        self.special_ids = frozenset(i for i, kind in enumerate(types) if kind == TOKEN_TYPE_CONTROL)
        # Control and user-defined tokens are matched whole in the input text.
        matched_whole = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        whole_ids = {i for i, kind in enumerate(types) if kind in matched_whole and self._tokens[i]}
        if whole_tokens is None:
            whole_tokens = WholeTokens({self._tokens[i]: i for i in sorted(whole_ids)})
        else:
            whole_ids = set(whole_tokens.ids.values())
        self._whole_tokens = whole_tokens
        self._token_bytes = [self._spelled_bytes(i, i in whole_ids) for i in range(len(self._tokens))]
        self._word_ids = lru_cache(maxsize=_WORD_CACHE_SIZE)(self._bpe_word_ids)

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "BPETokenizer":
        """Build the tokenizer from a GGUF's key -> value metadata (`tokenizer.ggml.*` keys)."""
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedError(
                f"BPETokenizer reads byte-level BPE vocabularies (tokenizer.ggml.model 'gpt2'), not {model!r}"
            )
        tokenizer = cls(
            tokens=meta["tokenizer.ggml.tokens"],
            merges=meta.get("tokenizer.ggml.merges", []),
            token_types=meta.get("tokenizer.ggml.token_type"),
            # Files written before pre-tokenizers were recorded use the GPT-2 regex.
            pre=meta.get("tokenizer.ggml.pre", "default"),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
        tokenizer.chat_template = meta.get("tokenizer.chat_template")
        return tokenizer

    # ----- vocabulary -----

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary."""
        return len(self._tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The token's vocabulary string, as stored (byte-level spelling, e.g. "Ġworld");
        "" for an id past the vocabulary (a model's padding rows, see `tokenizers.vocab`)."""
        return vocabulary_entry(self._tokens, token_id, "")

    def _vocabulary_string(self, piece: str) -> str:
        """The vocabulary's own str object equal to `piece` (`piece` itself if it is not a token)."""
        token_id = self._token_to_id.get(piece)
        return piece if token_id is None else self._tokens[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary string, or None if it is not in the vocabulary."""
        return self._token_to_id.get(piece)

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a control token (BOS, EOS, `<|im_start|>`...)."""
        return token_id in self.special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text this token stands for (none for an id past the vocabulary)."""
        return vocabulary_entry(self._token_bytes, token_id, b"")

    # ----- encoding -----

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids for `text`; with `add_special`, add BOS/EOS as the model's metadata asks."""
        ids: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            ids.append(self.bos_id)
        for span, whole_id in self._whole_tokens.split(text):
            if whole_id is not None:
                ids.append(whole_id)
                continue
            if self._normalizer is not None:
                span = self._normalizer(span)
            for word in self._pre_tokenizer.split(span):
                ids.extend(self._word_ids(word))
        if add_special and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _bpe_word_ids(self, word: str) -> tuple[int, ...]:
        spelled = word.encode("utf-8").decode("latin-1").translate(_SPELL_LATIN1)
        if self._ignore_merges and spelled in self._token_to_id:
            return (self._token_to_id[spelled],)
        ids = []
        for piece in self._merge(spelled):
            token_id = self._token_to_id.get(piece)
            if token_id is not None:
                ids.append(token_id)
            # A piece is missing only when the vocabulary lacks a single-byte token (SmolLM2
            # has none for e.g. 0x04 or 0xF1). The reference tokenizers (HF, llama.cpp) drop
            # such bytes silently, so we do the same rather than invent an id.
        return tuple(ids)

    def _merge(self, symbols: str) -> list[str]:
        """Apply the merges to one spelled word; returns its pieces left to right."""
        if len(symbols) < 2:
            return [symbols]
        # Pieces live in a doubly linked list over the starting positions, and candidate
        # pairs in a heap ordered by (rank, position): the best-ranked pair is merged first,
        # the leftmost one among equals. A popped pair is skipped if either side has changed
        # since it was pushed - pieces only ever grow, so comparing the strings detects that.
        pieces: list[str | None] = list(symbols)
        next_of = list(range(1, len(pieces))) + [-1]
        prev_of = list(range(-1, len(pieces) - 1))
        ranks = self._merge_ranks
        heap = []
        for left in range(len(pieces) - 1):
            rank = ranks.get((pieces[left], pieces[left + 1]))
            if rank is not None:
                heap.append((rank, left, pieces[left], pieces[left + 1]))
        heapq.heapify(heap)
        while heap:
            _, left, left_piece, right_piece = heapq.heappop(heap)
            right = next_of[left]
            if right == -1 or pieces[left] != left_piece or pieces[right] != right_piece:
                continue
            merged = left_piece + right_piece
            pieces[left], pieces[right] = merged, None
            next_of[left] = next_of[right]
            if next_of[left] != -1:
                prev_of[next_of[left]] = left
            for a, b in ((prev_of[left], left), (left, next_of[left])):
                if a != -1 and b != -1:
                    rank = ranks.get((pieces[a], pieces[b]))
                    if rank is not None:
                        heapq.heappush(heap, (rank, a, pieces[a], pieces[b]))
        return [piece for piece in pieces if piece is not None]

    # ----- decoding -----

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """The text for `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def _spelled_bytes(self, token_id: int, matched_whole: bool) -> bytes:
        text = self._tokens[token_id]
        # Special tokens stand for their literal text. So does any token that is not
        # written in the byte alphabet: reference tokenizers treat it as plain UTF-8 text.
        alphabet = unicode_to_bytes()
        if matched_whole or not all(char in alphabet for char in text):
            return text.encode("utf-8")
        return bytes(alphabet[char] for char in text)
