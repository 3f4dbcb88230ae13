"""The explorer page of `lucid serve` and the JSON endpoints that look inside the model for it.

    GET  /                   the page (static/explorer.html, .js, .css: hand-written, no libraries, no CDN)
    GET  /explore/info       model name, number of layers and heads, the token limit below
    POST /explore/attention  {text | ids | messages, layer, head} -> tokens and the (T, T) attention pattern
    POST /explore/lens       {text | ids | messages, k, last_only} -> after every layer, the top-k next tokens

The page streams its tokens from the OpenAI endpoints (`/v1/completions`, `/v1/chat/completions`
with logprobs); the endpoints here only look inside. `messages` is a chat: the tokens are those
the model saw, i.e. the chat template of all turns but a final assistant one, followed by that
reply's text. Every model call runs through `engine.run_exclusive`, on the engine thread between
decode steps, so the hook listeners never see the forward passes of requests being generated.
Mistakes raise `APIError`s, which the app answers with a 400 in OpenAI's error format.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import LucidError
from ..introspect.attention import attention_patterns
from ..introspect.lens import logit_lens
from ..introspect.token_labels import token_text
from ..tokenizers.chat import CHAT_ROLES
from .engine import EngineClosedError
from .http_errors import APIError, error_response

STATIC = Path(__file__).with_name("static")
PAGE_FILES = {"explorer.js": "text/javascript", "explorer.css": "text/css"}
MAX_TOKENS = 512  # a (T, T) pattern of 512 tokens is ~2 MB of JSON; the lens reads L x T x k tokens
MAX_K = 20
MAX_CHARS = 100_000  # longer text is refused before tokenizing it (on the engine thread)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def explorer_routes(engine) -> list[Route]:
    """The page and its endpoints; `engine.model` is the LucidModel being served."""
    m = engine.model
    model_id = os.path.basename(m.name)  # as /v1/models lists it by default: no directories

    async def page(request: Request) -> Response:
        return Response((STATIC / "explorer.html").read_bytes(), media_type="text/html; charset=utf-8")

    async def page_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in PAGE_FILES:
            return error_response(404, f"no such file: {name}", code="not_found")
        return Response((STATIC / name).read_bytes(), media_type=PAGE_FILES[name] + "; charset=utf-8")

    async def info(request: Request) -> Response:
        cfg = m.config
        return JSONResponse({"model": model_id, "architecture": cfg.architecture, "n_layers": cfg.n_layers,
                             "n_heads": cfg.n_heads, "context_length": cfg.context_length,
                             "max_tokens": min(MAX_TOKENS, cfg.context_length), "decoder": not m.is_encoder})

    async def attention(request: Request) -> Response:
        body = await _json_body(request)
        key, value = _subject(m, body)
        layer = _int(body, "layer", 0, m.config.n_layers - 1)
        head = "mean" if body.get("head") == "mean" else _int(body, "head", 0, m.config.n_heads - 1)

        def work():
            ids = _encode(m, key, value)
            patterns = attention_patterns(m.model, m.token_batch(ids), [layer])[0]  # (H, T, T)
            pattern = patterns.mean(0) if head == "mean" else patterns[head]  # (T, T)
            return ids, pattern.tolist()

        ids, pattern = await _run(engine, work, key)
        return JSONResponse({"model": model_id, "layer": layer, "head": head, "ids": ids,
                             "tokens": [token_text(m.tokenizer, i) for i in ids],
                             "pattern": [[round(w, 5) for w in row] for row in pattern]})

    async def lens(request: Request) -> Response:
        body = await _json_body(request)
        key, value = _subject(m, body)
        k = _int(body, "k", 1, MAX_K, default=5)
        last_only = body.get("last_only", False)
        if not isinstance(last_only, bool):
            raise bad_request("'last_only' must be true or false", "last_only")

        def work():
            ids = _encode(m, key, value)
            reading = logit_lens(m.model, m.token_batch(ids), k)  # (L, T, k) ids and probabilities
            if last_only:
                return ids, reading.top_ids[:, -1:], reading.top_probs[:, -1:]
            return ids, reading.top_ids, reading.top_probs

        ids, top_ids, top_probs = await _run(engine, work, key)
        texts: dict[int, str] = {}  # each distinct token decoded once
        top_ids = top_ids.tolist()
        return JSONResponse({
            "model": model_id, "k": k, "ids": ids, "tokens": [token_text(m.tokenizer, i) for i in ids],
            # position p's reading predicts the token after ids[p]; with last_only only the last position
            "positions": [len(ids) - 1] if last_only else list(range(len(ids))),
            "top_ids": top_ids,  # (L, positions, k)
            "top_tokens": [[[texts.setdefault(i, token_text(m.tokenizer, i)) for i in cell] for cell in row]
                           for row in top_ids],
            "top_probs": [[[round(p, 5) for p in cell] for cell in row] for row in top_probs.tolist()],
        })

    return [
        Route("/", page, methods=["GET"]),
        Route("/explore/static/{name}", page_file, methods=["GET"]),
        Route("/explore/info", info, methods=["GET"]),
        Route("/explore/attention", attention, methods=["POST"]),
        Route("/explore/lens", lens, methods=["POST"]),
    ]


async def _run(engine, work, param: str):
    """`work()` on the engine thread; a LucidError it raises (a failing chat template...) becomes a 400."""
    if engine.model.is_encoder:
        raise bad_request(f"{engine.model.name} is an encoder: the explorer needs a model that predicts tokens")
    try:
        return await engine.run_exclusive(work)
    except LucidError as e:
        raise bad_request(str(e), param) from None
    except EngineClosedError as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # (RecursionError: arrays nested thousands deep)
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _int(body: dict, key: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(key, default)
    if value is None:
        raise bad_request(f"'{key}' is required", key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer, got {value!r}", key)
    if not low <= value <= high:
        raise bad_request(f"'{key}' is {value}: it must be between {low} and {high}", key)
    return value


def _subject(m, body: dict) -> tuple[str, object]:
    """Which of body["text"], body["ids"] or body["messages"] was given (exactly one), checked."""
    given = [key for key in ("text", "ids", "messages") if body.get(key) is not None]
    if len(given) != 1:
        raise bad_request("give exactly one of 'text', 'ids' or 'messages'", given[1] if given else "text")
    key = given[0]
    value = body[key]
    if key == "text" and (not isinstance(value, str) or not value):
        raise bad_request("'text' must be a non-empty string", "text")
    if key == "ids" and (not isinstance(value, list) or not value or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < m.config.vocab_size for i in value)):
        raise bad_request(f"'ids' must be a non-empty list of token ids between 0 and {m.config.vocab_size - 1}",
                          "ids")
    if key == "messages" and (not isinstance(value, list) or not value or any(
            not isinstance(msg, dict) or msg.get("role") not in CHAT_ROLES
            or not isinstance(msg.get("content"), str) for msg in value)):
        raise bad_request("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} with string "
                          f"content and a role among {', '.join(CHAT_ROLES)}", "messages")
    if key == "messages" and value[-1]["role"] == "assistant" and len(value) == 1:
        raise bad_request("'messages' needs a turn before the assistant's reply", "messages")
    if len(str(value)) > MAX_CHARS:  # refused before tokenizing it
        raise bad_request(f"the {key} is over {MAX_CHARS} characters long; the explorer reads at most "
                          f"{MAX_TOKENS} tokens", key)
    return key, value


def _encode(m, key: str, value) -> list[int]:
    """The token ids of a checked subject (on the engine thread: tokenizing may take a moment)."""
    if key == "ids":
        ids = value
    elif key == "text":
        ids = m.tokenizer.encode(value)
    else:
        ids = m.tokenizer.encode(_chat_text(m, value))
    limit = min(MAX_TOKENS, m.config.context_length)
    if not ids or len(ids) > limit:
        raise bad_request(f"the {key} is {len(ids)} tokens long; the explorer reads 1 to {limit}", key)
    return ids


def _chat_text(m, messages: list[dict]) -> str:
    """What the model read for a chat: the template of the turns with the generation prompt, then
    the text of a final assistant reply (if any) exactly as generated, without an end-of-turn token."""
    if messages[-1]["role"] == "assistant":
        return m.apply_chat_template(messages[:-1]) + messages[-1]["content"]
    return m.apply_chat_template(messages)
