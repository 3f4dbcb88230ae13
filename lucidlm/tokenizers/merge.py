"""The BPE merge loop shared by the tokenizers whose merge order is not a plain pair list.

Every BPE variant encodes a word the same way: start from its smallest units (characters
or bytes), then repeatedly join the adjacent pair with the best priority until no pair
can be joined. They differ only in how a pair's priority is found:

- SentencePiece (GGUF "llama" vocabularies): the score of the joined piece, higher first;
- tokenizer.json BPE: the position of the pair in the merge list, lower first;
- tiktoken: the rank of the joined bytes, lower first.

`bpe_merge` takes that rule as a function returning a sort key (lower merges first) or
None when the pair never merges. Among pairs of equal priority the leftmost merges first,
as in SentencePiece, llama.cpp, Hugging Face tokenizers and tiktoken.
"""

import heapq
from collections.abc import Callable, Sequence
from typing import TypeVar

Piece = TypeVar("Piece", str, bytes)


def bpe_merge(units: Sequence[Piece], priority: Callable[[Piece, Piece], float | None]) -> list[Piece]:
    """Join adjacent pieces of `units` in priority order; returns the final pieces left to right."""
    if len(units) < 2:
        return list(units)
    # Pieces live in a doubly linked list over their starting positions; candidate pairs sit
    # in a heap keyed by (priority, position). A popped pair is stale if either side has
    # changed since it was pushed - pieces only grow, so comparing them detects that.
    pieces: list = list(units)
    next_of = list(range(1, len(pieces))) + [-1]
    prev_of = list(range(-1, len(pieces) - 1))
    heap = []
    for left in range(len(pieces) - 1):
        key = priority(pieces[left], pieces[left + 1])
        if key is not None:
            heap.append((key, left, pieces[left], pieces[left + 1]))
    heapq.heapify(heap)
    while heap:
        _, left, left_piece, right_piece = heapq.heappop(heap)
        right = next_of[left]
        if right == -1 or pieces[left] != left_piece or pieces[right] != right_piece:
            continue
        pieces[left], pieces[right] = left_piece + right_piece, None
        next_of[left] = next_of[right]
        if next_of[left] != -1:
            prev_of[next_of[left]] = left
        for a, b in ((prev_of[left], left), (left, next_of[left])):
            if a != -1 and b != -1:
                key = priority(pieces[a], pieces[b])
                if key is not None:
                    heapq.heappush(heap, (key, a, pieces[a], pieces[b]))
    return [piece for piece in pieces if piece is not None]
