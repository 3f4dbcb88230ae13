"""OpenAI response bodies, whole and streamed, built from the engine's `Delta`s.

Chat (https://platform.openai.com/docs/api-reference/chat/object and .../chat/streaming):
    choices[i] = {"index", "message": {"role": "assistant", "content"}, "logprobs", "finish_reason"}
    streamed:   {"index", "delta": {"role"?, "content"?}, "logprobs", "finish_reason"}, first a delta with
                the role, last an empty delta with the finish reason
    logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
Completions (legacy, https://platform.openai.com/docs/api-reference/completions/object):
    choices[i] = {"index", "text", "logprobs", "finish_reason"}, streamed chunks alike
    logprobs = {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}
`text_offset` counts characters from the start of the completion (no echo); a streamed
chunk's log-probs cover exactly the tokens of its text.
"""

from __future__ import annotations

import time
import uuid

from .choices import Delta, TokenInfo
from .engine import Usage


def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def chat_logprobs(tokens: list[TokenInfo]) -> dict:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes),
                         "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": list(a.bytes)}
                                          for a in t.top]}
                        for t in tokens]}


def legacy_logprobs(tokens: list[TokenInfo]) -> dict:
    """The legacy format. Each `top_logprobs` dict holds the k most likely tokens, plus the
    chosen one when it is not among them (OpenAI: "up to logprobs + 1 elements"); tokens
    that decode to the same text share one key, the most likely one's."""
    tops = []
    for t in tokens:
        top: dict[str, float] = {}
        for a in t.top:
            top.setdefault(a.text, a.logprob)
        if t.top:
            top.setdefault(t.text, t.logprob)
        tops.append(top)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": [t.offset for t in tokens]}


class _Choice:
    """A choice's parts, gathered from its deltas for a whole (not streamed) response."""

    def __init__(self):
        self.text: list[str] = []
        self.tokens: list[TokenInfo] = []
        self.finish_reason: str | None = None


class ResponseBuilder:
    """Bodies of one request: `chunks(delta)` while streaming, `whole(deltas, usage)` at once.

    kind: "chat" or "completion"; with_logprobs: whether the request asked for them (then
    `logprobs` is an object, else null).
    """

    def __init__(self, kind: str, model: str, with_logprobs: bool):
        self.kind, self.model, self.with_logprobs = kind, model, with_logprobs
        prefix, self.object = ("chatcmpl", "chat.completion") if kind == "chat" else ("cmpl", "text_completion")
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, tokens: list[TokenInfo]) -> dict | None:
        if not self.with_logprobs:
            return None
        return chat_logprobs(tokens) if self.kind == "chat" else legacy_logprobs(tokens)

    # ----- streamed -----

    def _chunk(self, choice: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", [choice])

    def opening_chunks(self, n_choices: int) -> list[dict]:
        """Chat streams start with each choice's role."""
        if self.kind != "chat":
            return []
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for i in range(n_choices)]

    def chunks(self, delta: Delta) -> list[dict]:
        """The chunks for one delta: its text (with log-probs), then for chat a separate
        closing chunk with the finish reason, as OpenAI sends it."""
        out = []
        if self.kind == "chat":
            if delta.text or delta.tokens:
                out.append(self._chunk({"index": delta.index, "delta": {"content": delta.text},
                                        "logprobs": self._logprobs(delta.tokens), "finish_reason": None}))
            if delta.finish_reason is not None:
                out.append(self._chunk({"index": delta.index, "delta": {}, "logprobs": None,
                                        "finish_reason": delta.finish_reason}))
        else:
            out.append(self._chunk({"index": delta.index, "text": delta.text,
                                    "logprobs": self._logprobs(delta.tokens), "finish_reason": delta.finish_reason}))
        return out

    def usage_chunk(self, usage: Usage) -> dict:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
        chunk = self._chunk({})
        chunk["choices"], chunk["usage"] = [], usage_body(usage)
        return chunk

    # ----- whole -----

    def whole(self, deltas: list[Delta], n_choices: int, usage: Usage) -> dict:
        choices = [_Choice() for _ in range(n_choices)]
        for delta in deltas:
            choice = choices[delta.index]
            choice.text.append(delta.text)
            choice.tokens += delta.tokens
            choice.finish_reason = delta.finish_reason or choice.finish_reason
        bodies = []
        for i, c in enumerate(choices):
            text = "".join(c.text)
            body = ({"index": i, "message": {"role": "assistant", "content": text}} if self.kind == "chat"
                    else {"index": i, "text": text})
            bodies.append(body | {"logprobs": self._logprobs(c.tokens), "finish_reason": c.finish_reason})
        return self._envelope(self.object, bodies) | {"usage": usage_body(usage)}
