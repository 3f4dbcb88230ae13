"""Looking up a token id in a vocabulary table, for ids a model can produce but the tokenizer lacks.

Checkpoints often pad their embedding table and LM head beyond the tokenizer's vocabulary
(Phi-3: 32064 rows for 32011 tokens; Qwen2: 151936 for 151665), so a model can emit an id
the tokenizer has no entry for. Such an id stands for no text: it decodes to nothing, as
HF's `tokenizers` decodes it. A negative id is a caller's mistake, and a Python list would
silently wrap it around to the end of the table: it is an error.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

from lucidlm.errors import InvalidArgumentError

Entry = TypeVar("Entry")


def vocabulary_entry(table: Sequence[Entry], token_id: int, past_the_end: Entry) -> Entry:
    """table[token_id]; `past_the_end` for an id at or beyond len(table)."""
    if 0 <= token_id < len(table):
        return table[token_id]
    if token_id < 0:
        raise InvalidArgumentError(f"token id {token_id} is negative")
    return past_the_end
