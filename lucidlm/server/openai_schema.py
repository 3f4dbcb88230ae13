"""OpenAI request bodies (pydantic models) and their translation into the engine's jobs.

https://platform.openai.com/docs/api-reference/chat/create and .../completions/create.
Types are checked strictly (a string is not a number, 1.0 is not an integer, as OpenAI's
API does); unknown fields are ignored, as clients send extras (`user`, `tools`...). Value
ranges are the library's own: `DecodingOptions` (which builds `SamplingParams` and
`LogitControls`) and `check_fits`, so the server accepts exactly what `generate` accepts.
Only limits that are the server's own are checked here (n against the batch size, how
many alternatives per token, token ids within the vocabulary).

Defaults follow OpenAI, not the library: temperature 1 (the library's default is greedy),
and without `max_tokens` a completion may run to `default_max_tokens` or the end of the
context, whichever comes first.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from ..decoding import DecodingOptions
from ..errors import LucidError
from ..generate import check_fits
from ..tokenizers.chat import CHAT_ROLES
from .engine import GenerationJob
from .http_errors import APIError, from_lucid_error

MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI: 20 for chat, 5 for legacy completions)
OPENAI_TEMPERATURE = 1.0


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationBody(_Body):
    """Fields shared by both generation endpoints. None means "not given"."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not in OpenAI's API; as in vLLM and llama.cpp
    min_p: float | None = None  # idem
    repetition_penalty: float | None = None  # idem
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a JSON key) -> added to its logit
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal[CHAT_ROLES]
    content: str | list[TextPart] | None = None  # None only in an assistant turn (OpenAI's tool calls)

    @model_validator(mode="after")
    def _has_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs its content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens


class CompletionRequest(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # legacy: how many alternatives per token
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def _given(value, default):
    return default if value is None else value


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param} holds token id {bad}, outside the vocabulary [0, {vocab_size})", param=param)


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    return [{"role": m.role, "content": m.text()} for m in messages]


class JobBuilder:
    """Turns validated request bodies into GenerationJobs for one served model."""

    def __init__(self, model, *, max_batch: int, max_queue: int, default_max_tokens: int):
        self.model, self.max_batch, self.default_max_tokens = model, max_batch, default_max_tokens
        self.max_prompts = max_queue  # each prompt waits in the queue as one job
        self.context_length = model.config.context_length
        self.vocab_size = model.tokenizer.vocab_size

    def chat(self, req: ChatCompletionRequest) -> list[GenerationJob]:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        fields = set(ChatCompletionRequest.model_fields)
        try:
            prompt = self.model.tokenizer.encode(self.model.apply_chat_template(chat_messages(req.messages)))
        except LucidError as e:
            raise from_lucid_error(e, fields) from None
        logprobs = _given(req.top_logprobs, 0) if req.logprobs else None
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        return [self._job(req, prompt, "messages", max_tokens, logprobs, 0, fields,
                          {"max_new_tokens": param, "logprobs": "top_logprobs"})]

    def completion(self, req: CompletionRequest) -> list[GenerationJob]:
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != _given(req.n, 1):
            raise APIError(400, "best_of is not supported (it must equal n)", param="best_of")
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompts) > self.max_prompts:
            raise APIError(400, f"at most {self.max_prompts} prompts per request on this server, got {len(prompts)}",
                           param="prompt")
        n = _given(req.n, 1)
        fields = set(CompletionRequest.model_fields)
        jobs = []
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            if isinstance(prompt, str):
                ids = self.model.tokenizer.encode(prompt)
            else:
                check_token_ids(prompt, self.vocab_size, "prompt")
                ids = list(prompt)
            jobs.append(self._job(req, ids, "prompt", req.max_tokens, req.logprobs, i * n, fields,
                                  {"max_new_tokens": "max_tokens"}))
        return jobs

    def _job(self, req: _GenerationBody, prompt_ids: list[int], prompt_param: str, max_tokens: int | None,
             logprobs: int | None, first_index: int, fields: set[str], aliases: dict[str, str]) -> GenerationJob:
        """One job; `aliases` map the library's parameter names to this request's."""
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            param = aliases.get("logprobs", "logprobs")
            raise APIError(400, f"{param} must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", param=param)
        if req.n is not None and req.n > self.max_batch:
            raise APIError(400, f"n must be at most {self.max_batch} on this server, got {req.n}", param="n")
        if len(prompt_ids) >= self.context_length:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context holds "
                                f"{self.context_length}, including the tokens to generate",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:  # as far as the default allows and the context has room
            max_tokens = min(self.default_max_tokens, self.context_length - len(prompt_ids))
        bias = self._logit_bias(req.logit_bias)
        try:
            check_fits(len(prompt_ids), max_tokens, self.context_length)
            options = DecodingOptions.from_kwargs(
                max_new_tokens=max_tokens, temperature=_given(req.temperature, OPENAI_TEMPERATURE),
                top_p=_given(req.top_p, 1.0), top_k=_given(req.top_k, 0), min_p=_given(req.min_p, 0.0),
                repetition_penalty=_given(req.repetition_penalty, 1.0), seed=req.seed, stop=req.stop,
                n=_given(req.n, 1), presence_penalty=_given(req.presence_penalty, 0.0),
                frequency_penalty=_given(req.frequency_penalty, 0.0), logit_bias=bias, logprobs=_given(logprobs, 0))
        except LucidError as e:
            raise from_lucid_error(e, fields, aliases) from None
        return GenerationJob(prompt_ids, max_tokens, options.sampling,
                             options.controls if options.controls.active else None, options.n, options.stop,
                             logprobs, first_index)

    def _logit_bias(self, logit_bias: dict[str, float] | None) -> dict[int, float]:
        bias = {}
        for key, value in (logit_bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
            check_token_ids([token_id], self.vocab_size, "logit_bias")
            bias[token_id] = value
        return bias
