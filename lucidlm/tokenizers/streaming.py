"""Turn a stream of token ids into text as it is generated, one safe piece at a time.

One token can end in the middle of a UTF-8 character (an emoji is often spread over three
tokens), so decoding each token on its own would print garbage. `IncrementalDecoder`
keeps the bytes of an unfinished character until the token that completes it arrives.
"""

import codecs


class IncrementalDecoder:
    """Decode token ids one at a time, never returning half a character.

    Everything returned by `push` plus `flush` equals `tokenizer.decode(all_ids, skip_special)`.
    """

    def __init__(self, tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        # The standard library's incremental UTF-8 decoder does exactly the buffering we
        # need: it holds back a trailing incomplete sequence, and emits U+FFFD for a byte
        # sequence as soon as no continuation could make it valid - the same replacements
        # that decoding all the bytes at once produces.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End the stream; return what is left, with an unfinished character as U+FFFD."""
        return self._utf8.decode(b"", final=True)
