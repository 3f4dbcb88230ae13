"""One choice's tokens -> the text deltas a client receives, with stop strings and log-probs.

The engine pushes every token of a choice (one row of the batch) into a `ChoiceText`, which
hands back a `Delta`: the text that is now safe to send, the tokens it came from and, at the
end, the finish reason. It follows `generate.TextStream` exactly, so the server's text is
the library's text for the same tokens:

- a token may end inside a UTF-8 character: `IncrementalDecoder` keeps its bytes until the
  character is complete;
- a stop id ends the choice without its text; a stop string ends it with the text cut just
  before the stop string; text that may be the start of a stop string is held back until it
  is clear that it is not;
- a token is handed out with the delta that completes its text, so the log-probs of a
  streamed chunk belong to the text of that chunk. `TokenInfo.offset` is where the token's
  text starts in the choice's text (the legacy API's `text_offset`).

Log-probs are those of the model's raw distribution (`Step.logprobs`, before penalties,
temperature and filters), as in `lucidlm.decoding`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..decoding import top_logprobs
from ..generate import Step, longest_stop_prefix
from ..tokenizers import IncrementalDecoder

# JSON has no -inf; OpenAI reports impossible tokens with this floor.
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str  # the token decoded on its own (U+FFFD where it holds part of a character)
    bytes: bytes  # the bytes it stands for
    logprob: float
    top: list[TopToken]  # the most likely tokens at this step, most likely first
    offset: int  # where its text starts in the choice's text


@dataclass
class Delta:
    """New output of one choice: text, its tokens (when log-probs were asked for), and the
    finish reason ("stop" or "length") once the choice has ended."""

    index: int
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None


class ChoiceText:
    """The text state of one choice; `push` one token at a time (see the module docstring)."""

    def __init__(self, index: int, tokenizer, stop_ids: set[int], stop_strings: tuple[str, ...],
                 logprobs: int | None):
        self.index = index
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_ids = stop_ids
        self.stops = [s for s in stop_strings if s]
        self.logprobs = logprobs  # None: no log-probs; k: with the k most likely alternatives
        self.text = ""  # everything decoded so far, held-back text included
        self.sent = 0  # characters of `text` already handed out
        self.pending: list[tuple[int, int, TokenInfo | None]] = []  # (start, end, info) not yet handed out
        self.generated = 0  # tokens the model produced for this choice (a final stop id included)
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, step: Step, finish_reason: str | None) -> Delta | None:
        """Add the next token; `finish_reason` is the batch's ("stop" on a stop id, "length",
        or None). Returns what can be sent now, or None when nothing can yet."""
        self.generated += 1
        if step.token_id in self.stop_ids:
            self.text += self.decoder.flush()
            return self._hand_out(len(self.text), "stop")
        start = len(self.text)
        self.text += self.decoder.push(step.token_id)
        self.pending.append((start, len(self.text), self._info(step, start)))
        unsent = self.text[self.sent:]
        cut = min((i for i in (unsent.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return self._hand_out(self.sent + cut, "stop")
        if finish_reason is not None:
            self.text += self.decoder.flush()
            return self._hand_out(len(self.text), finish_reason)
        return self._hand_out(len(self.text) - longest_stop_prefix(unsent, self.stops), None)

    def _hand_out(self, end: int, finish_reason: str | None) -> Delta | None:
        """Text up to character `end`, with its tokens: those whose text is complete by `end`
        while running; at the end those whose text starts before `end` (a stop string may cut
        through a token), and the rest are dropped."""
        if finish_reason is None:
            ready = [p for p in self.pending if p[1] <= end]
        else:
            ready = [p for p in self.pending if p[0] < end or end == len(self.text)]
        self.pending = self.pending[len(ready):] if finish_reason is None else []
        text, self.sent = self.text[self.sent:end], end
        self.finish_reason = finish_reason
        tokens = [info for _, _, info in ready if info is not None]
        if not text and not tokens and finish_reason is None:
            return None
        return Delta(self.index, text, tokens, finish_reason)

    def _info(self, step: Step, start: int) -> TokenInfo | None:
        if self.logprobs is None:
            return None
        tok = self.tokenizer
        top = [TopToken(t.id, t.token, tok.token_bytes(t.id), max(t.logprob, LOGPROB_FLOOR))
               for t in (top_logprobs(step.logprobs, self.logprobs, self._token_text) if self.logprobs else [])]
        logprob = max(float(step.logprobs[step.token_id]), LOGPROB_FLOOR)
        return TokenInfo(step.token_id, self._token_text(step.token_id), tok.token_bytes(step.token_id), logprob,
                         top, start)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
