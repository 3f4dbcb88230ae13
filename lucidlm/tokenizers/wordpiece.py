"""WordPiece (BERT and its descendants: MiniLM, DistilBERT...), read from a tokenizer.json.

Encoding runs in four steps:
1. cut the text on the added tokens (`[CLS]`, `[MASK]`...), which are matched whole;
2. normalize each remaining span (BERT: drop control characters, put spaces around CJK
   ideographs, strip accents and lower-case; see normalize.py);
3. split it into words on whitespace, with each punctuation mark a word of its own;
4. cut each word greedily into the longest vocabulary entries, left to right: the first
   piece as is, every later one spelled with the continuation prefix ("##ing"). A word
   that cannot be covered this way, or is longer than `max_input_chars_per_word`,
   becomes the unknown token as a whole.
Then the post-processor's template adds `[CLS]` before and `[SEP]` after.

WordPiece is lossy (case, accents and spacing are gone), so `decode` rebuilds readable
text the way the reference decoder does: pieces joined by spaces, "##" pieces glued to the
previous one, and a space before common punctuation removed.
"""

from collections.abc import Callable
from functools import lru_cache

from lucidlm.tokenizers.normalize import Normalizer
from lucidlm.tokenizers.whole_tokens import WholeTokens

# The reference decoder's `cleanup`, applied to each piece with its leading space.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

_WORD_CACHE_SIZE = 1 << 16


def cleanup(text: str) -> str:
    for before, after in _CLEANUP:
        text = text.replace(before, after)
    return text


class WordPieceTokenizer:
    """A WordPiece tokenizer: text <-> token ids, with the BPETokenizer interface.

    `tokens` is the vocabulary by id; `special_ids` the added tokens marked special (they
    are matched whole in the text, as are the other added tokens in `whole_tokens`).
    `prefix_ids` / `suffix_ids` come from the post-processor template ([CLS] ... [SEP]);
    `bos_id` / `eos_id` name them for callers. `cleanup` is the decoder's option.
    """

    def __init__(
        self,
        tokens: list[str],
        *,
        unk_id: int,
        normalizer: Normalizer | None,
        pre_tokenizer: Callable[[str], list[str]],
        whole_tokens: WholeTokens,
        special_ids: frozenset[int],
        prefix_ids: tuple[int, ...] = (),
        suffix_ids: tuple[int, ...] = (),
        continuing_prefix: str = "##",
        max_input_chars_per_word: int = 100,
        cleanup: bool = True,
        pad_id: int | None = None,
    ):
        self._tokens = list(tokens)
        self._token_to_id = {token: index for index, token in enumerate(self._tokens)}
        self.unk_id, self.pad_id = unk_id, pad_id
        self.prefix_ids, self.suffix_ids = tuple(prefix_ids), tuple(suffix_ids)
        self.bos_id = self.prefix_ids[0] if self.prefix_ids else None
        self.eos_id = self.suffix_ids[-1] if self.suffix_ids else None
        self.special_ids = frozenset(special_ids)
        self.chat_template: str | None = None
        self._normalizer = normalizer
        self._pre_tokenizer = pre_tokenizer
        self._whole_tokens = whole_tokens
        self._prefix = continuing_prefix
        self._max_chars = max_input_chars_per_word
        self._cleanup = cleanup
        self._word_ids = lru_cache(maxsize=_WORD_CACHE_SIZE)(self._wordpiece_ids)

    # ----- vocabulary -----

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary."""
        return len(self._tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The token's vocabulary string, as stored ("hello", "##ing", "[CLS]")."""
        return self._tokens[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary string, or None if it is not in the vocabulary."""
        return self._token_to_id.get(piece)

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a special token ([CLS], [SEP], [PAD], [UNK], [MASK])."""
        return token_id in self.special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """This token's text as decode writes it after another token: a continuation piece
        without its "##", any other piece after a space (then cleaned up, so " ." is ".").
        Streaming these gives decode's text with one extra leading space, at most."""
        piece = self._tokens[token_id]
        text = piece[len(self._prefix):] if piece.startswith(self._prefix) else " " + piece
        return (cleanup(text) if self._cleanup else text).encode("utf-8")

    # ----- encoding -----

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids for `text`; with `add_special`, wrap them as the template says ([CLS] ... [SEP])."""
        ids: list[int] = list(self.prefix_ids) if add_special else []
        for span, whole_id in self._whole_tokens.split(text):
            if whole_id is not None:
                ids.append(whole_id)
                continue
            if self._normalizer is not None:
                span = self._normalizer(span)
            for word in self._pre_tokenizer(span):
                ids.extend(self._word_ids(word))
        if add_special:
            ids.extend(self.suffix_ids)
        return ids

    def _wordpiece_ids(self, word: str) -> tuple[int, ...]:
        if len(word) > self._max_chars:
            return (self.unk_id,)
        ids = []
        start = 0
        while start < len(word):
            # The longest vocabulary entry starting here; later pieces carry the prefix.
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self._prefix + word[start:end]
                token_id = self._token_to_id.get(piece)
                if token_id is not None:
                    break
            else:
                return (self.unk_id,)
            ids.append(token_id)
            start = end
        return tuple(ids)

    # ----- decoding -----

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Readable text for `ids`: pieces joined by spaces, "##" pieces glued on."""
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        parts = []
        for position, token_id in enumerate(ids):
            piece = self._tokens[token_id]
            if position > 0:
                piece = piece[len(self._prefix):] if piece.startswith(self._prefix) else " " + piece
            parts.append(cleanup(piece) if self._cleanup else piece)
        return "".join(parts)
